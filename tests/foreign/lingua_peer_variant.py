"""Meta lingua's `HashingMemory` with `peer_variant=True`: PEER experts behind product keys.

Source read (not copied): https://github.com/facebookresearch/memory,
`lingua/product_key/memory.py` (`HashingMemory`, `QueryMLP`, `ProductKeyArgs.peer_variant`),
as it circulates in single-GPU copies ("Simplified for single GPU - no distributed
training"). With `peer_variant` the value bag is replaced by two `nn.Embedding` tables,
`values_u` (down) and `values_v` (up), and every selected slot is a one-neuron expert:

    u = values_u(indices)                      # (bs, heads * knn, dim)
    x = F.gelu(torch.einsum("bh, blh->bl", input, u))
    x = x * scores                             # softmax over each head's knn
    output = torch.einsum("bl, blh->bh", x, values_v(indices))

Habits kept: the flat key parameter [2 · heads · n_keys, k_dim / 2] viewed per head,
`QueryMLP` (biased Linear), `einsum("blh, lkh->blk")` side scores, `view(...).expand(...)`
grids, `F.softmax(scores.float()).type_as(scores)`, heads merged into heads · knn columns
before the experts; `value_proj` and `swilu_projection` are still built (Memory+'s output
path) and never used by the PEER branch, so they sit unused in the state dict.

One deliberate change, as in `meta_memory_plus.py`: lingua reads the flattened token count
with `len(query)`, which pins B·T under `torch.export`; here it is `.shape[0]`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


class QueryMLP(nn.Module):
    def __init__(self, input_dim, heads, k_dim, sizes, bias=False, batchnorm=False):
        super().__init__()
        self.input_dim = input_dim
        self.heads = heads
        self.k_dim = k_dim
        self.sizes = sizes
        assert sizes[0] == input_dim
        assert sizes[-1] == (heads * k_dim)
        self.query_mlps = QueryMLP.mlp(list(sizes), bias=bias, batchnorm=batchnorm)

    @staticmethod
    def mlp(sizes, bias=True, batchnorm=True):
        pairs = [(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]
        layers = []
        for i, (dim_in, dim_out) in enumerate(pairs):
            layers.append(nn.Linear(dim_in, dim_out, bias=bias))
            if batchnorm:
                layers.append(nn.BatchNorm1d(dim_out))
            if i < len(pairs) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, input):
        assert input.shape[-1] == self.input_dim
        input = input.contiguous().view(-1, self.input_dim) if input.dim() > 2 else input
        bs = input.shape[0]
        query = self.query_mlps(input)
        assert query.shape == (bs, self.heads * self.k_dim)
        return query.view(bs * self.heads, self.k_dim)


class HashingMemory(nn.Module):
    def __init__(
        self,
        input_dim,
        output_dim,
        mem_k_dim=512,
        mem_heads=4,
        mem_knn=32,
        mem_n_keys=1024,
        mem_query_bias=True,
        peer_variant=True,
        swilu_projection=True,
    ):
        assert mem_k_dim % 2 == 0
        assert mem_heads >= 2
        super().__init__()
        self.use_peer_variant = peer_variant
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.size = mem_n_keys**2
        self.k_dim = mem_k_dim
        self.v_dim = output_dim
        self.swilu_proj = swilu_projection
        self.heads = mem_heads
        self.knn = mem_knn

        self.keys = nn.Parameter(torch.empty(2 * self.heads * int(self.size**0.5), self.k_dim // 2))
        # PEER: down (u) and up (v) tables
        self.values_u = nn.Embedding(self.size, self.v_dim)
        self.values_v = nn.Embedding(self.size, self.v_dim)
        # built whatever the variant (unused by the PEER branch)
        self.value_proj = torch.nn.Linear(output_dim, output_dim)
        if self.swilu_proj:
            self.swilu_projection = torch.nn.Linear(self.input_dim, output_dim)

        l_sizes = (self.input_dim, self.heads * self.k_dim)
        self.query_proj = QueryMLP(
            self.input_dim, self.heads, self.k_dim, l_sizes, bias=mem_query_bias
        )

    def forward(self, input):
        B, T, _C = input.shape
        input = input.view(-1, self.input_dim)
        prefix_shape = input.shape[:-1]
        bs = np.prod(prefix_shape)

        query = self.query_proj(input)
        assert query.shape == (bs * self.heads, self.k_dim)

        knn = self.knn
        scores, indices = self.get_indices(query, knn)
        scores = F.softmax(scores.float(), dim=-1).type_as(scores)

        indices = indices.view(bs, self.heads * knn)
        scores = scores.view(bs, self.heads * knn)

        u = self.values_u(indices)
        x = torch.einsum("bh, blh->bl", input, u)
        x = F.gelu(x)
        v = self.values_v(indices)
        x = x * scores
        output = torch.einsum("bl, blh->bh", x, v)

        output = F.dropout(output, p=0.0, training=self.training)
        return output.view(B, T, -1)

    def get_indices(self, query, knn):
        assert query.dim() == 2 and query.size(1) == self.k_dim
        bs = query.shape[0] // self.heads  # lingua: len(query) // self.heads
        query = query.view(-1, self.heads, self.k_dim)
        half = self.k_dim // 2

        keys = self.keys.view(self.heads, 2, -1, half)
        keys1 = keys[:, 0, :, :]
        keys2 = keys[:, 1, :, :]
        n_keys = len(keys[0][0])

        q1 = query[:, :, :half]
        q2 = query[:, :, half:]

        scores1 = torch.einsum("blh, lkh->blk", q1, keys1)
        scores2 = torch.einsum("blh, lkh->blk", q2, keys2)

        scores1, indices1 = scores1.topk(knn, dim=2, largest=True)
        scores2, indices2 = scores2.topk(knn, dim=2, largest=True)

        all_scores = (
            scores1.view(bs, self.heads, knn, 1).expand(bs, self.heads, knn, knn)
            + scores2.view(bs, self.heads, 1, knn).expand(bs, self.heads, knn, knn)
        ).view(bs, self.heads, -1)
        all_indices = (
            indices1.view(bs, self.heads, knn, 1).expand(bs, self.heads, knn, knn) * n_keys
            + indices2.view(bs, self.heads, 1, knn).expand(bs, self.heads, knn, knn)
        ).view(bs, self.heads, -1)

        scores, best_indices = torch.topk(all_scores, k=knn, dim=2, largest=True, sorted=True)
        indices = all_indices.gather(2, best_indices)

        assert scores.shape == indices.shape == (bs, self.heads, knn)
        return scores.view(bs * self.heads, knn), indices.view(bs * self.heads, knn)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TwoFFNLayers(nn.Module):
    """Two lingua feed-forward slots: a dense SwiGLU, then the PEER memory (`layers="1"`)."""

    def __init__(self, dim: int, memory: HashingMemory) -> None:
        super().__init__()
        self.ffn_norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-5) for _ in range(2)])
        self.feed_forwards = nn.ModuleList([FeedForward(dim, 4 * dim), memory])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for norm, ff in zip(self.ffn_norms, self.feed_forwards, strict=True):
            h = h + ff(norm(h))
        return h


# D 64, k_dim 32 (16 per side; 512), 4 heads, 32 x 32 keys (1024²), knn 8 (32)
peer_variant_inputs = float_inputs(64, seed=722)


@factory
def lingua_peer_variant() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(721)
    mem = HashingMemory(64, 64, mem_k_dim=32, mem_heads=4, mem_knn=8, mem_n_keys=32)
    model = TwoFFNLayers(64, mem)
    with torch.no_grad():
        for norm in model.ffn_norms:
            norm.weight.copy_(gains(g, 64))
        ffn = model.feed_forwards[0]
        for lin in (ffn.w1, ffn.w3, ffn.w2):
            lin.weight.copy_(fan_in(g, *lin.weight.shape))
        mem.keys.copy_(normal(g, *mem.keys.shape, std=1 / math.sqrt(16)))
        lin = mem.query_proj.query_mlps[0]
        lin.weight.copy_(fan_in(g, *lin.weight.shape))
        lin.bias.copy_(normal(g, *lin.bias.shape, std=0.1))
        mem.values_u.weight.copy_(fan_in(g, *mem.values_u.weight.shape, gain=1.5))
        mem.values_v.weight.copy_(normal(g, *mem.values_v.weight.shape, std=0.5))
        for lin in (mem.value_proj, mem.swilu_projection):
            lin.weight.copy_(fan_in(g, *lin.weight.shape))
            lin.bias.copy_(normal(g, *lin.bias.shape, std=0.1))
    return model.eval(), peer_variant_inputs(2, 16)
