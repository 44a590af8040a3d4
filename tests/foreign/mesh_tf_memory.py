"""Mesh TensorFlow's `ProductKeyValueMemory` transformer layer, translated to PyTorch.

Source read (not copied): https://github.com/tensorflow/mesh,
`mesh_tensorflow/transformer/memory_layers.py` (`ProductKeyValueMemory`, gin-configurable,
"Implementation of Flat and ProductKey Memory Layers"). Mesh TF names every dimension, so
the torch port keeps its tensor layout literally:

- keys [n_heads, product_key=2, n_keys, key // 2], values an embedding [n_keys², d_model];
- the query is ONE dense layer WITH bias into new dims [h, 2, k] -> [b, l, h, 2, k], then
  `mtf.layers.layer_norm` over k: mean/variance, epsilon 1e-6, a scale variable and no
  bias ("We use layer norm instead of batch norm to normalize queries");
- `mtf.einsum([query, keys])` to [b, l, h, 2, n_keys] (both sides in one op), `mtf.top_k`
  over n_keys -> [b, l, h, 2, knn], `mtf.unstack` along the product dim;
- the cartesian sums with a renamed knn2 dim, replaced by one knn_square dim, a second
  `top_k` and `mtf.gather`;
- `mtf.softmax` over knn, `mtf.gather(values, indices)` -> [b, l, h, knn, d_model] and an
  einsum reducing BOTH h and knn at once.

The layer sits in a mtf `LayerStack` sublayer: `x + layer(rms_norm(x))` (mtf's
`sublayer_rms_norm`, epsilon 1e-6, scale only).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


def mtf_layer_norm(x: torch.Tensor, scale: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = torch.square(x - mean).mean(dim=-1, keepdim=True)
    norm_x = (x - mean) * torch.rsqrt(variance + epsilon)
    return norm_x * scale


class ProductKeyValueMemory(nn.Module):
    """Memory network with product key-value structure."""

    def __init__(self, d_model: int, key_size: int, n_keys: int, n_heads: int, knn: int) -> None:
        super().__init__()
        self.key_size = key_size
        self.n_keys = n_keys
        self.n_values = n_keys**2
        self.n_heads = n_heads
        self.knn = knn
        half = key_size // 2
        self.keys = nn.Parameter(torch.empty(n_heads, 2, n_keys, half))
        self.values = nn.Parameter(torch.empty(self.n_values, d_model))
        # query: dense into [h, 2, k] with bias
        self.query_kernel = nn.Parameter(torch.empty(d_model, n_heads, 2, half))
        self.query_bias = nn.Parameter(torch.zeros(n_heads, 2, half))
        self.layer_norm_scale = nn.Parameter(torch.ones(half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = torch.einsum("bld,dhpk->blhpk", x, self.query_kernel) + self.query_bias
        query = mtf_layer_norm(query, self.layer_norm_scale)  # [b, l, h, 2, k]

        scores, indices = self.get_indices(self.keys, query)  # [b, l, h, knn]
        scores = torch.softmax(scores, dim=-1)
        top_values = self.values[indices]  # [b, l, h, knn, v]
        return torch.einsum("blhkv,blhk->blv", top_values, scores)

    def get_indices(self, keys: torch.Tensor, query: torch.Tensor):
        """Generate score and indices for the query."""
        scores = torch.einsum("blhpk,hpnk->blhpn", query, keys)  # [b, l, h, 2, n_keys]
        scores, indices = torch.topk(scores, self.knn, dim=-1)  # [b, l, h, 2, knn]

        # Computes the top cartesian products and their indices
        scores1, scores2 = torch.unbind(scores, dim=-2)
        all_scores = scores1.unsqueeze(-1) + scores2.unsqueeze(-2)  # [..., knn, knn2]
        all_scores = all_scores.flatten(-2)  # knn_square_dim

        indices1, indices2 = torch.unbind(indices, dim=-2)
        indices1 = indices1 * self.n_keys
        all_indices = (indices1.unsqueeze(-1) + indices2.unsqueeze(-2)).flatten(-2)

        scores, best_indices = torch.topk(all_scores, self.knn, dim=-1)
        return scores, torch.gather(all_indices, -1, best_indices)


class Sublayer(nn.Module):
    """mtf LayerStack sublayers (rms_norm, call, residual)."""

    def __init__(self, d_model: int, layer: nn.Module) -> None:
        super().__init__()
        self.rms_norm_scale = nn.Parameter(torch.ones(d_model))
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = torch.mean(torch.square(x), dim=-1, keepdim=True)
        normed = x * torch.rsqrt(variance + 1e-6) * self.rms_norm_scale
        return x + self.layer(normed)


# d_model 64, key_size 64 (32 per side), 32 x 32 keys, 4 heads, knn 8 (gin-required values)
mesh_inputs = float_inputs(64, seed=791)


@factory
def mesh_tf_product_key_value_memory() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(791)
    mem = ProductKeyValueMemory(64, key_size=64, n_keys=32, n_heads=4, knn=8)
    model = Sublayer(64, mem)
    with torch.no_grad():
        model.rms_norm_scale.copy_(gains(g, 64))
        mem.keys.copy_(normal(g, *mem.keys.shape, std=1 / math.sqrt(32)))
        mem.values.copy_(normal(g, *mem.values.shape, std=0.5))
        mem.query_kernel.copy_(fan_in(g, 4 * 2 * 32, 64).t().reshape(64, 4, 2, 32))
        mem.query_bias.copy_(normal(g, 4, 2, 32, std=0.3))
        mem.layer_norm_scale.copy_(gains(g, 32))
    return model.eval(), mesh_inputs(2, 16)
