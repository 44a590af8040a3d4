"""XLM's product-key memory (`HashingMemoryProductFast`), written with XLM's habits.

Source read (not copied): https://github.com/facebookresearch/XLM,
`xlm/model/memory/memory.py`, `query.py`, `utils.py`. Habits kept:

- configuration through an argparse-like `params` object (`AttrDict`) with XLM's
  `register_args` defaults, the keys created by XLM's numpy `get_uniform_keys(seed=2i+j)`
  at construction (then overwritten with trained-looking keys);
- a query network `mlp([input_dim, heads · k_dim])` = Linear (bias) + `BatchNorm1d`
  (eval mode: running statistics of real queries, not 0/1) producing [bs · heads, k_dim];
- heads handled in a Python loop: `_get_indices(query[:, i], knn, keys[i][0], keys[i][1])`
  per head, joined with `torch.cat([s.unsqueeze(1) ...], 1).view(bs, knn)`;
- per side `F.linear(q, keys)`, candidates by `topk(sorted=True)`, the m × m grid with
  `view/expand` sums, final `topk` + `gather`; optional L2-normalised query halves
  (`mem_normalize_query`), temperature, softmax in float;
- optional per-head `head_permutations` of the slot ids (`mem_shuffle_indices`) and
  `indices % mem_modulo_size` (a table smaller than the grid);
- `nn.EmbeddingBag(mode="sum")` called with `per_sample_weights=scores.to(weight.data)`
  and `.to(scores)` after, F.dropout on input, query and output (inactive in eval);
- eval-mode usage statistics stored on the module during forward
  (`self.last_indices = indices.view(...).detach().cpu()`), a side effect a capture has
  to tolerate.

One deliberate change: XLM's `get_indices` and `QueryMLP` read the flattened token count
with `len(query)` / `len(input)`; under `torch.export` that becomes a hidden guard
`B·T == example B·T` (the export succeeds, the program rejects other shapes). Here it is
`query.size(0)`; `pinned_shapes.py` keeps XLM's `len()` as a case of its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._trained import (
    factory,
    fan_in,
    float_inputs,
    gains,
    normal,
    permutation,
    private_global_rng,
    seeded,
)


class AttrDict(dict):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__ = self


def get_uniform_keys(n_keys: int, dim: int, normalized: bool, seed: int) -> np.ndarray:
    """Random uniform keys (same initialization as nn.Linear)."""
    rng = np.random.RandomState(seed)
    bound = 1 / math.sqrt(dim)
    X = rng.uniform(-bound, bound, (n_keys, dim))
    if normalized:
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def xlm_params(**overrides) -> AttrDict:
    """XLM's `HashingMemory.register_args` defaults (+ `check_params`), with overrides."""
    params = AttrDict(
        mem_implementation="pq_fast",
        mem_grouped_conv=False,
        mem_sparse=False,
        mem_input2d=False,
        mem_k_dim=256,
        mem_v_dim=-1,
        mem_heads=4,
        mem_knn=32,
        mem_share_values=False,
        mem_shuffle_indices=False,
        mem_shuffle_query=False,
        mem_modulo_size=-1,
        mem_keys_type="uniform",
        mem_n_keys=512,
        mem_keys_normalized_init=False,
        mem_keys_learn=True,
        mem_use_different_keys=True,
        mem_query_detach_input=False,
        mem_query_layer_sizes="0,0",
        mem_query_bias=True,
        mem_query_batchnorm=False,
        mem_query_net_learn=True,
        mem_multi_query_net=False,
        mem_value_zero_init=False,
        mem_normalize_query=False,
        mem_temperature=1,
        mem_score_softmax=True,
        mem_score_subtract="",
        mem_score_normalize=False,
        mem_input_dropout=0,
        mem_query_dropout=0,
        mem_value_dropout=0,
    )
    params.update(overrides)
    # check_params
    params.mem_product_quantization = params.mem_implementation != "flat"
    params.n_indices = params.mem_n_keys**2
    params.mem_size = params.n_indices if params.mem_modulo_size == -1 else params.mem_modulo_size
    s = [int(x) for x in filter(None, params.mem_query_layer_sizes.split(","))]
    assert len(s) >= 2 and s[0] == s[-1] == 0
    params.mem_query_layer_sizes = s
    return params


def mlp(sizes: list[int], bias: bool = True, batchnorm: bool = True) -> nn.Sequential:
    """Generate a feedforward neural network."""
    pairs = [(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]
    layers = []
    for i, (dim_in, dim_out) in enumerate(pairs):
        layers.append(nn.Linear(dim_in, dim_out, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(dim_out))
        if i < len(pairs) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class QueryMLP(nn.Module):
    def __init__(
        self,
        input_dim: int,
        heads: int,
        k_dim: int,
        sizes: list[int],
        bias: bool = True,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.heads = heads
        self.k_dim = k_dim
        self.sizes = sizes
        assert sizes[0] == input_dim
        assert sizes[-1] == heads * k_dim
        self.query_mlps = mlp(sizes, bias=bias, batchnorm=batchnorm)

    def forward(self, input: Tensor) -> Tensor:
        assert input.shape[-1] == self.input_dim
        input = input.contiguous().view(-1, self.input_dim) if input.dim() > 2 else input
        bs = input.size(0)  # XLM: len(input)
        query = self.query_mlps(input)
        assert query.shape == (bs, self.heads * self.k_dim)
        return query.view(bs * self.heads, self.k_dim)


class HashingMemory(nn.Module):
    EVAL_MEMORY = True

    def __init__(self, input_dim: int, output_dim: int, params: AttrDict) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.size = params.mem_size
        self.modulo_size = params.mem_modulo_size
        self.n_indices = params.n_indices
        self.k_dim = params.mem_k_dim
        self.v_dim = params.mem_v_dim if params.mem_v_dim > 0 else output_dim
        self.heads = params.mem_heads
        self.knn = params.mem_knn
        self.shuffle_indices = params.mem_shuffle_indices
        self.keys_normalized_init = params.mem_keys_normalized_init
        self.product_quantization = params.mem_product_quantization
        self.keys_type = params.mem_keys_type
        self.learn_keys = params.mem_keys_learn
        self.use_different_keys = params.mem_use_different_keys
        self.normalize_query = params.mem_normalize_query
        self.temperature = params.mem_temperature
        self.score_softmax = params.mem_score_softmax
        self.input_dropout = params.mem_input_dropout
        self.query_dropout = params.mem_query_dropout
        self.value_dropout = params.mem_value_dropout

        self.init_keys()

        self.values = nn.EmbeddingBag(self.size, self.v_dim, mode="sum", sparse=params.mem_sparse)
        nn.init.normal_(self.values.weight, mean=0, std=self.v_dim**-0.5)

        l_sizes = list(params.mem_query_layer_sizes)
        l_sizes[0] = self.input_dim
        l_sizes[-1] = self.heads * self.k_dim
        self.query_proj = QueryMLP(
            self.input_dim,
            self.heads,
            self.k_dim,
            l_sizes,
            bias=params.mem_query_bias,
            batchnorm=params.mem_query_batchnorm,
        )

        if self.shuffle_indices:
            head_permutations = [
                torch.randperm(self.n_indices).unsqueeze(0) for i in range(self.heads)
            ]
            self.register_buffer("head_permutations", torch.cat(head_permutations, 0))

    def forward(self, input: Tensor) -> Tensor:
        """Read from the memory."""
        assert input.shape[-1] == self.input_dim
        prefix_shape = input.shape[:-1]

        bs = np.prod(prefix_shape)
        input = F.dropout(input, p=self.input_dropout, training=self.training)
        query = self.query_proj(input)  # (bs * heads, k_dim)
        query = F.dropout(query, p=self.query_dropout, training=self.training)
        assert query.shape == (bs * self.heads, self.k_dim)

        scores, indices = self.get_indices(query, self.knn)  # (bs * heads, knn) ** 2

        if self.shuffle_indices:
            indices = indices.view(bs, self.heads, -1).chunk(self.heads, 1)
            indices = [p[idx] for p, idx in zip(self.head_permutations, indices, strict=True)]
            indices = torch.cat(indices, 1).view(bs * self.heads, -1)

        if self.modulo_size != -1:
            indices = indices % self.modulo_size

        # re-scoring
        if self.temperature != 1:
            scores = scores / self.temperature
        if self.score_softmax:
            scores = F.softmax(scores.float(), dim=-1).type_as(scores)

        # merge heads / knn (since we sum heads)
        indices = indices.view(bs, self.heads * self.knn)
        scores = scores.view(bs, self.heads * self.knn)

        # weighted sum of values
        output = self.values(indices, per_sample_weights=scores.to(self.values.weight.data)).to(
            scores
        )
        output = F.dropout(output, p=self.value_dropout, training=self.training)

        if len(prefix_shape) >= 2:
            output = output.view(prefix_shape + (self.v_dim,))  # noqa: RUF005

        # store indices / scores (eval mode only - for usage statistics)
        if not self.training and HashingMemory.EVAL_MEMORY:
            self.last_indices = indices.view(bs, self.heads, self.knn).detach().cpu()
            self.last_scores = scores.view(bs, self.heads, self.knn).detach().cpu().float()

        return output


class HashingMemoryProductFast(HashingMemory):
    def create_keys(self) -> Tensor:
        half = self.k_dim // 2
        n_keys = int(self.n_indices**0.5)
        keys = torch.from_numpy(
            np.array(
                [
                    get_uniform_keys(n_keys, half, self.keys_normalized_init, seed=(2 * i + j))
                    for i in range(self.heads)
                    for j in range(2)
                ]
            )
        ).view(self.heads, 2, n_keys, half)
        return keys

    def init_keys(self) -> None:
        keys = self.create_keys()
        if self.learn_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)

    def _get_indices(
        self, query: Tensor, knn: int, keys1: Tensor, keys2: Tensor
    ) -> tuple[Tensor, Tensor]:
        assert query.dim() == 2 and query.size(1) == self.k_dim
        assert len(keys1) == len(keys2)
        bs = query.size(0)
        half = self.k_dim // 2
        n_keys = len(keys1)

        q1 = query[:, :half]  # (bs, half)
        q2 = query[:, half:]  # (bs, half)

        if self.normalize_query:
            q1 = q1 / q1.norm(2, 1, keepdim=True).expand_as(q1)
            q2 = q2 / q2.norm(2, 1, keepdim=True).expand_as(q2)

        scores1 = F.linear(q1, keys1, bias=None)  # (bs, n_keys)
        scores2 = F.linear(q2, keys2, bias=None)
        scores1, indices1 = scores1.topk(knn, dim=1, largest=True, sorted=True)  # (bs, knn) ** 2
        scores2, indices2 = scores2.topk(knn, dim=1, largest=True, sorted=True)

        all_scores = (
            scores1.view(bs, knn, 1).expand(bs, knn, knn)
            + scores2.view(bs, 1, knn).expand(bs, knn, knn)
        ).view(bs, -1)  # (bs, knn ** 2)
        all_indices = (
            indices1.view(bs, knn, 1).expand(bs, knn, knn) * n_keys
            + indices2.view(bs, 1, knn).expand(bs, knn, knn)
        ).view(bs, -1)

        scores, best_indices = torch.topk(all_scores, k=knn, dim=1, largest=True, sorted=True)
        indices = all_indices.gather(1, best_indices)

        assert scores.shape == indices.shape == (bs, knn)
        return scores, indices

    def get_indices(self, query: Tensor, knn: int) -> tuple[Tensor, Tensor]:
        assert query.dim() == 2 and query.size(1) == self.k_dim
        bs = query.size(0)  # XLM: len(query)
        query = query.view(-1, self.heads, self.k_dim)
        outputs = [
            self._get_indices(query[:, i], knn, self.keys[i][0], self.keys[i][1])
            for i in range(self.heads)
        ]
        scores = torch.cat([s.unsqueeze(1) for s, _ in outputs], 1).view(bs, knn)
        indices = torch.cat([idx.unsqueeze(1) for _, idx in outputs], 1).view(bs, knn)
        return scores, indices


def retrain_xlm_memory(mem: HashingMemory, g: torch.Generator, calibration: torch.Tensor) -> None:
    """Trained-looking keys, values, query net; BN running stats from real queries."""
    half = mem.k_dim // 2
    with torch.no_grad():
        # unit-norm query halves (mem_normalize_query) need unit-scale keys for O(1) scores
        key_std = 1.0 if mem.normalize_query else 1 / math.sqrt(half)
        mem.keys.copy_(normal(g, *mem.keys.shape, std=key_std))
        mem.values.weight.copy_(normal(g, *mem.values.weight.shape, std=0.5))
        lin = mem.query_proj.query_mlps[0]
        lin.weight.copy_(fan_in(g, *lin.weight.shape))
        lin.bias.copy_(normal(g, *lin.bias.shape, std=0.1))
        if len(mem.query_proj.query_mlps) > 1:
            bn = mem.query_proj.query_mlps[1]
            q = lin(calibration.reshape(-1, mem.input_dim))
            bn.running_mean.copy_(q.mean(0) + normal(g, q.shape[1], std=0.2))
            bn.running_var.copy_(q.var(0) * (0.5 + torch.rand(q.shape[1], generator=g)))
            bn.weight.copy_(gains(g, bn.weight.shape[0], spread=0.3))
            bn.bias.copy_(normal(g, *bn.bias.shape, std=0.2))
            bn.num_batches_tracked.fill_(50_000)
        if mem.shuffle_indices:
            for h in range(mem.heads):
                mem.head_permutations[h].copy_(permutation(g, mem.n_indices))


# D 64, k_dim 64 (32 per side), 4 heads, 32 × 32 keys, knn 8 (XLM default: 512 keys,
# k_dim 256, knn 32); BN on queries; dropouts 0.1
xlm_inputs = float_inputs(64, seed=501)


@factory
def xlm_hashing_memory() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """XLM pq_fast memory: per-head loop, BN queries, softmax, EmbeddingBag, dropouts."""
    params = xlm_params(
        mem_k_dim=64,
        mem_heads=4,
        mem_knn=8,
        mem_n_keys=32,
        mem_query_batchnorm=True,
        mem_input_dropout=0.1,
        mem_query_dropout=0.1,
        mem_value_dropout=0.1,
    )
    with private_global_rng():
        mem = HashingMemoryProductFast(64, 64, params)
    retrain_xlm_memory(mem, seeded(503), xlm_inputs(4, 16)[0])
    return mem.eval(), xlm_inputs(2, 16)


# D 48, k_dim 48 (24 per side), 2 heads, 32 × 32 keys (1,024 slots) onto 600 rows, knn 16
xlm_shuffled_inputs = float_inputs(48, seed=502)


@factory
def xlm_hashing_shuffled_modulo() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """XLM memory with per-head slot permutations, `% mem_modulo_size`, L2 queries, T = 0.5."""
    params = xlm_params(
        mem_k_dim=48,
        mem_heads=2,
        mem_knn=16,
        mem_n_keys=32,
        mem_shuffle_indices=True,
        mem_modulo_size=600,
        mem_normalize_query=True,
        mem_temperature=0.5,
    )
    with private_global_rng():
        mem = HashingMemoryProductFast(48, 48, params)
    retrain_xlm_memory(mem, seeded(502), xlm_shuffled_inputs(4, 16)[0])
    return mem.eval(), xlm_shuffled_inputs(2, 16)
