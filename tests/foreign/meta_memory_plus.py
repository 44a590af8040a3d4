"""Meta's memory+ ("Memory Layers at Scale"), written the way lingua's product_key code is.

Source read (not copied): https://github.com/facebookresearch/memory,
`lingua/product_key/memory.py` (`HashingMemory`, `QueryMLP`) and
`lingua/product_key/colwise_embedding_bag.py` (`xFormerEmbeddingBag`). Habits kept:

- keys are ONE flat parameter [2 · heads · n_keys, k_dim / 2], viewed as
  (heads, 2, n_keys, half) inside `get_indices`;
- queries from `QueryMLP` (Linear with bias, optionally `BatchNorm1d` — in eval its
  running statistics are folded constants), shaped [bs · heads, k_dim];
- per-side scores by `einsum("blh, lkh->blk")`, candidates by `topk`, the m × m grid by
  `view(...).expand(...)` sums, final `topk` then `gather`;
- softmax in float32 (`F.softmax(scores.float()).type_as(scores)`), heads merged into one
  bag of heads · knn rows: `F.embedding_bag(indices, weight, per_sample_weights=scores,
  mode="sum")` inside a small values module (`xFormerEmbeddingBag`'s fallback);
- the memory+ output: `value_proj(output * F.silu(swilu_projection(input)))` (both Linear
  with bias), optional sigmoid gate `mem_gated`;
- `mem_share_values`: one values module shared by every memory layer of the model (Meta
  does it through a class attribute; here the model hands the same module to each layer,
  so it appears under two names in the state dict).

One deliberate change: lingua reads the flattened token count with `len(tensor)`, which
under `torch.export` turns the dynamic B·T into a hidden runtime guard `B·T == 32` (the
export succeeds, the program then rejects every other shape); here it is `.shape[0]`.
`pinned_shapes.py` keeps the `len()` habit as a case of its own.

`joint_topk=True` is the variant that scores both sides in one einsum into
[bs, heads, 2, n_keys] and takes ONE `topk` over the last axis for both sides, then
`unbind(2)` (the `[..., 2, n]` habit of the product-key re-implementations).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


class EmbeddingBagValues(nn.Module):
    """Value table read as a weighted bag (`xFormerEmbeddingBag` without xformers)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dim))

    def forward(self, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.weight, per_sample_weights=scores, mode="sum")


class QueryMLP(nn.Module):
    def __init__(
        self,
        input_dim: int,
        heads: int,
        k_dim: int,
        sizes: tuple[int, ...],
        bias: bool = False,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.heads = heads
        self.k_dim = k_dim
        self.sizes = sizes
        assert sizes[0] == input_dim
        assert sizes[-1] == (heads * k_dim)
        # lingua stores the bare Sequential and iterates over it in forward, which applies
        # each of its LAYERS to the input (fine for one Linear, broken once BatchNorm is
        # added); one Sequential inside a ModuleList keeps their loop and works with BN
        self.query_mlps = nn.ModuleList([QueryMLP.mlp(list(sizes), bias=bias, batchnorm=batchnorm)])

    @staticmethod
    def mlp(sizes: list[int], bias: bool = True, batchnorm: bool = True) -> nn.Sequential:
        pairs = [(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]
        layers = []
        for i, (dim_in, dim_out) in enumerate(pairs):
            layers.append(nn.Linear(dim_in, dim_out, bias=bias))
            if batchnorm:
                layers.append(nn.BatchNorm1d(dim_out))
            if i < len(pairs) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        assert input.shape[-1] == self.input_dim
        input = input.contiguous().view(-1, self.input_dim) if input.dim() > 2 else input
        bs = input.shape[0]  # lingua: len(input), which pins B·T under torch.export
        outputs = [m(input) for m in self.query_mlps]
        query = torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]
        assert query.shape == (bs, self.heads * self.k_dim)
        return query.view(bs * self.heads, self.k_dim)


class HashingMemory(nn.Module):
    """memory+ layer: product keys, softmax, bag of heads · knn rows, SiLU-gated output."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        values: nn.Module,
        mem_k_dim: int = 512,
        mem_heads: int = 4,
        mem_knn: int = 32,
        mem_n_keys: int = 1024,
        mem_query_bias: bool = True,
        mem_query_batchnorm: bool = False,
        mem_gated: bool = False,
        swilu_projection: bool = True,
        joint_topk: bool = False,
    ) -> None:
        super().__init__()
        assert mem_k_dim % 2 == 0 and mem_heads >= 2
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.size = mem_n_keys**2
        self.k_dim = mem_k_dim
        self.v_dim = output_dim
        self.heads = mem_heads
        self.knn = mem_knn
        self.swilu_proj = swilu_projection
        self.joint_topk = joint_topk

        self.keys = nn.Parameter(torch.empty(2 * self.heads * int(self.size**0.5), self.k_dim // 2))
        self.values = values  # shared (mem_share_values)

        self.value_proj = torch.nn.Linear(output_dim, output_dim)
        if self.swilu_proj:
            self.swilu_projection = torch.nn.Linear(self.input_dim, output_dim)
        self.gating = torch.nn.Linear(input_dim, 1) if mem_gated else None

        l_sizes = (self.input_dim, self.heads * self.k_dim)
        self.query_proj = QueryMLP(
            self.input_dim,
            self.heads,
            self.k_dim,
            l_sizes,
            bias=mem_query_bias,
            batchnorm=mem_query_batchnorm,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        B, T, _C = input.shape
        input = input.view(-1, self.input_dim)
        prefix_shape = input.shape[:-1]
        bs = np.prod(prefix_shape)

        query = self.query_proj(input)  # (bs * heads, k_dim)
        assert query.shape == (bs * self.heads, self.k_dim)

        knn = self.knn
        scores, indices = self.get_indices(query, knn)  # (bs * heads, knn) ** 2

        # re-scoring
        scores = F.softmax(scores.float(), dim=-1).type_as(scores)  # (bs * heads, knn)

        # merge heads / knn (since we sum heads)
        indices = indices.view(bs, self.heads * knn)
        scores = scores.view(bs, self.heads * knn)

        output = self.values(indices, scores)  # (bs, v_dim)
        if self.swilu_proj:
            output = self.value_proj(output * F.silu(self.swilu_projection(input)))
        else:
            output = self.value_proj(output)

        if self.gating is not None:
            output = F.sigmoid(self.gating(input)) * output
        return output.view(B, T, -1)

    def get_indices(self, query: Tensor, knn: int) -> tuple[Tensor, Tensor]:
        assert query.dim() == 2 and query.size(1) == self.k_dim
        bs = query.shape[0] // self.heads  # lingua: len(query) (pins B·T when exported)
        query = query.view(-1, self.heads, self.k_dim)
        half = self.k_dim // 2
        keys = self.keys.view(self.heads, 2, -1, half)
        n_keys = len(keys[0][0])

        if self.joint_topk:
            # both sides at once: (bs, heads, 2, n_keys), one topk, then unbind the side axis
            sides = torch.einsum("blph, lpkh->blpk", query.view(bs, self.heads, 2, half), keys)
            side_scores, side_indices = sides.topk(knn, dim=3, largest=True)
            scores1, scores2 = side_scores.unbind(2)
            indices1, indices2 = side_indices.unbind(2)
        else:
            keys1 = keys[:, 0, :, :]
            keys2 = keys[:, 1, :, :]
            q1 = query[:, :, :half]  # (bs, heads, half)
            q2 = query[:, :, half:]
            scores1 = torch.einsum("blh, lkh->blk", q1, keys1)  # (bs, heads, n_keys)
            scores2 = torch.einsum("blh, lkh->blk", q2, keys2)
            scores1, indices1 = scores1.topk(knn, dim=2, largest=True)  # (bs, heads, knn)
            scores2, indices2 = scores2.topk(knn, dim=2, largest=True)

        # cartesian product on best candidate keys
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


def _retrain_memory(mem: HashingMemory, g: torch.Generator, calibration: torch.Tensor) -> None:
    """Trained-looking keys, query net, projections; BatchNorm stats from real queries."""
    half = mem.k_dim // 2
    with torch.no_grad():
        mem.keys.copy_(normal(g, *mem.keys.shape, std=1 / math.sqrt(half)))
        mlp = mem.query_proj.query_mlps[0]
        lin = mlp[0]
        lin.weight.copy_(fan_in(g, *lin.weight.shape))
        if lin.bias is not None:
            lin.bias.copy_(normal(g, *lin.bias.shape, std=0.1))
        if len(mlp) > 1:
            bn = mlp[1]
            # running stats of a batch of real queries, then "trained" affine params: BN
            # must be folded with these exact numbers, not treated as identity
            q = lin(calibration.reshape(-1, mem.input_dim))
            bn.running_mean.copy_(q.mean(0) + 0.3)
            bn.running_var.copy_(q.var(0) * (1.5 + torch.rand(q.shape[1], generator=g)))
            bn.weight.copy_(gains(g, bn.weight.shape[0], scale=1.2, spread=0.3))
            bn.bias.copy_(normal(g, *bn.bias.shape, std=0.2))
            bn.num_batches_tracked.fill_(10_000)
        for name in ("value_proj", "swilu_projection", "gating"):
            m = getattr(mem, name, None)
            if m is not None:
                m.weight.copy_(fan_in(g, *m.weight.shape))
                m.bias.copy_(normal(g, *m.bias.shape, std=0.1))


# D 64, k_dim 64 (32 per side), 4 heads, 32 × 32 keys, knn 8 (default 1024 keys, knn 32)
memory_plus_inputs = float_inputs(64, seed=401)


@factory
def meta_memory_plus() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """One memory+ layer with lingua's defaults (swilu, query bias, no BN, per-side topk)."""
    g = seeded(401)
    values = EmbeddingBagValues(32 * 32, 64)
    mem = HashingMemory(64, 64, values, mem_k_dim=64, mem_heads=4, mem_knn=8, mem_n_keys=32)
    with torch.no_grad():
        values.weight.copy_(normal(g, *values.weight.shape, std=64**-0.5 * 4))
    _retrain_memory(mem, g, memory_plus_inputs(4, 16)[0])
    return mem.eval(), memory_plus_inputs(2, 16)


class MemoryPlusLM(nn.Module):
    """Two pre-norm blocks whose feed-forwards are memory+ layers sharing one value table."""

    def __init__(self, dim: int, memories: list[HashingMemory]) -> None:
        super().__init__()
        self.feed_forward_norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-5) for _ in memories])
        self.mixers = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in memories])
        self.feed_forwards = nn.ModuleList(memories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mixer, norm, ff in zip(
            self.mixers, self.feed_forward_norms, self.feed_forwards, strict=True
        ):
            x = x + torch.tanh(mixer(x))
            x = x + ff(norm(x))
        return x


# D 64, k_dim 32 (16 per side), 2 heads, 48 × 48 keys, knn 8, BN on queries, sigmoid gate
memory_plus_bn_inputs = float_inputs(64, seed=402)


@factory
def meta_memory_plus_shared_bn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two memory+ layers on one shared nn.EmbeddingBag-style table, BN queries, joint topk."""
    g = seeded(402)
    values = EmbeddingBagValues(48 * 48, 64)
    memories = [
        HashingMemory(
            64,
            64,
            values,
            mem_k_dim=32,
            mem_heads=2,
            mem_knn=8,
            mem_n_keys=48,
            mem_query_batchnorm=True,
            mem_gated=True,
            joint_topk=True,
        )
        for _ in range(2)
    ]
    model = MemoryPlusLM(64, memories)
    calibration = memory_plus_bn_inputs(4, 16)[0]
    with torch.no_grad():
        values.weight.copy_(normal(g, *values.weight.shape, std=0.5))
        for norm in model.feed_forward_norms:
            norm.weight.copy_(gains(g, 64))
        for mixer in model.mixers:
            mixer.weight.copy_(fan_in(g, 64, 64))
        for mem in memories:
            _retrain_memory(mem, g, calibration)
    return model.eval(), memory_plus_bn_inputs(2, 16)
