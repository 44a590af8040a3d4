"""Csordás et al.'s PKM baseline ("Approximating Two-Layer Feedforward Networks"), as its code is.

Source read (not copied): https://github.com/RobertCsordas/moe,
`layers/lowrank_approximate_2layer.py` (`LowrankApproximate2Layer`, `SparseAddress`).
Habits kept:

- a `SparseAddress` dataclass (scores + indices) with `cat`/`stack`/`view` helpers that
  every step passes around;
- keys in an `nn.ParameterList` of two [heads, n_keys, k_dim // 2] tensors (one per
  side), side scores by `F.linear(q_half, key)`;
- ONE query projection to `n_dim * n_heads` (k_dim = n_dim), `unbind` per head, a Python
  loop over heads;
- the selection runs under `torch.no_grad()` with `topk(..., sorted=False)`, and the
  selected scores are then RECOMPUTED with grad from the full side scores:
  `scores1.gather(-1, idx // n) + scores2.gather(-1, idx % n)` (`get_score`);
- `randomize_indices`: head i's slot ids are shifted by `head_shift[i + 1]` modulo the
  table size (the source's off-by-one: head 0 gets head 1's shift, the last head none);
- ReLU (not softmax) on the scores, `nn.EmbeddingBag(mode="sum")` read with
  `per_sample_weights=scores.type_as(weight)`, a `usage_count` buffer kept for logging.

`merged_topk=True` is the variant of `head_merge_topk` that this code base hints at
(`SparseAddress.cat` over heads before `self.topk`): each head is its own product-key memory
(own query, own keys) whose knn² candidate grid is NOT reduced per head; the grids of all
heads are concatenated and ONE top-k picks the knn slots over all of them, read from the
shared table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._trained import factory, fan_in, float_inputs, normal, seeded


@dataclass
class SparseAddress:
    scores: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def cat(cls, addresses: Sequence[SparseAddress], dim: int) -> SparseAddress:
        return SparseAddress(
            torch.cat([a.scores for a in addresses], dim),
            torch.cat([a.indices for a in addresses], dim),
        )

    @classmethod
    def stack(cls, addresses: Sequence[SparseAddress], dim: int) -> SparseAddress:
        return SparseAddress(
            torch.stack([a.scores for a in addresses], dim),
            torch.stack([a.indices for a in addresses], dim),
        )

    def view(self, *shape: int) -> SparseAddress:
        return SparseAddress(self.scores.view(*shape), self.indices.view(*shape))


class LowrankApproximate2Layer(nn.Module):
    def __init__(
        self,
        n_dim: int,
        n_keys: int,
        n_heads: int = 1,
        knn: int = 32,
        k_dim: int | None = None,
        query_bias: bool = False,
        randomize_indices: bool = False,
        merged_topk: bool = False,
        activation=F.relu,
    ) -> None:
        super().__init__()
        self.input_dim = n_dim
        self.k_dim = k_dim or n_dim
        self.v_dim = n_dim
        self.key_sizes = [n_keys, n_keys]
        self.size = int(np.prod(self.key_sizes))
        self.heads = n_heads
        self.knn = knn
        self.merged_topk = merged_topk
        self.activation = activation

        self.values = torch.nn.EmbeddingBag(self.size, self.v_dim, mode="sum")
        self.keys = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.empty(self.heads, s, self.k_dim // 2))
                for s in self.key_sizes
            ]
        )
        self.query_proj = torch.nn.Linear(n_dim, self.k_dim * n_heads, bias=query_bias)

        self.register_buffer(
            "usage_count", torch.zeros(self.size, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "head_shift",
            (torch.arange(self.heads, dtype=torch.float) * (self.key_sizes[0] / n_heads)).long(),
            persistent=False,
        )
        self.randomize_indices = randomize_indices and self.heads > 1

    def topk(self, x: torch.Tensor, dim: int = -1, k: int | None = None) -> SparseAddress:
        k = k or self.knn
        return SparseAddress(*x.contiguous().topk(k, dim=dim, sorted=False))

    def index_combine(self, indices1: torch.Tensor, indices2: torch.Tensor) -> torch.Tensor:
        return indices1 * self.key_sizes[-1] + indices2

    def combine_address_product(self, addr1: SparseAddress, addr2: SparseAddress) -> SparseAddress:
        return SparseAddress(
            (addr1.scores.unsqueeze(-1) + addr2.scores.unsqueeze(-2)).flatten(start_dim=-2),
            self.index_combine(addr1.indices.unsqueeze(-1), addr2.indices.unsqueeze(-2)).flatten(
                start_dim=-2
            ),
        )

    def merge_sub_address(self, addr1: SparseAddress, addr2: SparseAddress) -> SparseAddress:
        addr = self.combine_address_product(addr1, addr2)
        addr2 = self.topk(addr.scores)
        addr2.indices = addr.indices.gather(-1, addr2.indices)
        return addr2

    def get_score(self, scores1: torch.Tensor, scores2: torch.Tensor, indices: torch.Tensor):
        i1 = indices // self.key_sizes[-1]
        i2 = indices % self.key_sizes[-1]
        return scores1.gather(-1, i1) + scores2.gather(-1, i2)

    def score_project(self, query: torch.Tensor, key1: torch.Tensor, key2: torch.Tensor):
        assert query.dim() == 2 and query.size(1) == self.k_dim
        half = self.k_dim // 2
        q1 = query[:, :half]
        q2 = query[:, half:]
        scores1 = F.linear(q1, key1, bias=None)  # (bs, n_keys)
        scores2 = F.linear(q2, key2, bias=None)
        return scores1, scores2

    def _get_indices(self, query, key1, key2, head_index: int) -> SparseAddress:
        scores1, scores2 = self.score_project(query, key1, key2)
        if self.merged_topk:
            # every head hands over its whole knn x knn candidate grid
            addr1 = self.topk(scores1)
            addr2 = self.topk(scores2)
            return self.combine_address_product(addr1, addr2)
        with torch.no_grad():
            addr1 = self.topk(scores1)  # (bs, knn)
            addr2 = self.topk(scores2)
            addr1.indices = addr1.indices % self.key_sizes[0]
            addr2.indices = addr2.indices % self.key_sizes[1]
            res = self.merge_sub_address(addr1, addr2)
        res.scores = self.get_score(scores1, scores2, res.indices)
        return res

    def get_head_specific_queries(self, query: torch.Tensor) -> list[torch.Tensor]:
        return list(query.view(-1, self.heads, self.k_dim).unbind(-2))

    def get_indices(self, query: torch.Tensor) -> SparseAddress:
        queries = self.get_head_specific_queries(query)
        outputs = [
            self._get_indices(queries[i], self.keys[0][i], self.keys[1][i], i)
            for i in range(self.heads)
        ]
        if self.randomize_indices:
            for i in range(self.heads - 1):
                outputs[i].indices = (outputs[i].indices + self.head_shift[i + 1]) % self.size
        if self.merged_topk:
            addr = SparseAddress.cat(outputs, -1)  # (bs, heads * knn**2)
            addr2 = self.topk(addr.scores)
            addr2.indices = addr.indices.gather(-1, addr2.indices)
            return addr2
        return SparseAddress.stack(outputs, -2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        assert input.shape[-1] == self.input_dim
        prefix_shape = input.shape[:-1]
        bs = math.prod(prefix_shape)

        query = self.query_proj(input)
        addr = self.get_indices(query)
        addr = addr.view(bs, self.knn) if self.merged_topk else addr.view(bs, -1)

        addr.scores = self.activation(addr.scores)
        output = self.values(
            addr.indices, per_sample_weights=addr.scores.type_as(self.values.weight)
        )
        if self.training:
            self.usage_count.index_add_(
                0,
                addr.indices.flatten(),
                torch.ones(1, dtype=torch.long, device=addr.indices.device).expand(
                    addr.indices.nelement()
                ),
            )
        return output.view_as(input)


class PreLNKVMemBlock(nn.Module):
    """The `preln_kvmem` transformer variant's feed-forward slot: x + pkm(norm(x))."""

    def __init__(self, dim: int, pkm: LowrankApproximate2Layer) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pkm = pkm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pkm(self.norm(x))


def _retrain(block: PreLNKVMemBlock, g: torch.Generator, key_std: float) -> None:
    pkm = block.pkm
    with torch.no_grad():
        block.norm.weight.copy_(1.0 + 0.15 * normal(g, pkm.input_dim))
        block.norm.bias.copy_(normal(g, pkm.input_dim, std=0.05))
        pkm.query_proj.weight.copy_(fan_in(g, *pkm.query_proj.weight.shape))
        for k in pkm.keys:
            k.copy_(normal(g, *k.shape, std=key_std))
        pkm.values.weight.copy_(normal(g, *pkm.values.weight.shape, std=0.5))


# D 64 (= k_dim, 32 per side), 2 heads, 32 x 32 keys (source default 64+), knn 8 (32)
rescore_inputs = float_inputs(64, seed=701)


@factory
def csordas_pkm_nograd_rescore() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two heads, no_grad sorted=False selection, rescored by gather, ReLU, randomized ids."""
    g = seeded(701)
    pkm = LowrankApproximate2Layer(64, 32, n_heads=2, knn=8, randomize_indices=True)
    block = PreLNKVMemBlock(64, pkm)
    _retrain(block, g, key_std=1 / math.sqrt(32))
    return block.eval(), rescore_inputs(2, 16)


# D 48 (= k_dim, 24 per side), 2 memories of 24 x 24 keys on one 576-row table, knn 8
merged_inputs = float_inputs(48, seed=702)


@factory
def csordas_two_memories_one_topk() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two product-key memories whose candidate grids meet in ONE top-k over one table."""
    g = seeded(702)
    pkm = LowrankApproximate2Layer(
        48, 24, n_heads=2, knn=8, randomize_indices=True, merged_topk=True
    )
    block = PreLNKVMemBlock(48, pkm)
    _retrain(block, g, key_std=1 / math.sqrt(24))
    return block.eval(), merged_inputs(2, 16)
