"""A `PEERBlock` with GLU experts: three expert tables (up, down, gate) behind XLM product keys.

Source read (not copied): a public PyTorch PEER reproduction on GitHub (`PEERBlock`, "Algorithm
from the paper", XLM's `get_uniform_keys` and `_get_indices` copied from
https://github.com/facebookresearch/XLM/blob/main/PKM-layer.ipynb; the search index that
served it did not name its repository). Habits kept:

- `num_experts` is the keys per side and is SQUARED in `__init__`;
- three `nn.Embedding` expert tables `w_up_embed`, `w_down_embed`, `w_gate_embed`
  ([n², d_model] each);
- keys from numpy `RandomState` uniform init, one [heads, 2, n_keys, k_dim // 2] parameter;
- the query net `Linear(bias=True)` + `BatchNorm1d`, built with `nn.Sequential(*filter(None,
  [...]))`;
- a Python loop over heads calling XLM's `_get_indices` (`F.linear` per side, `view` +
  `expand` grids), joined with `torch.cat`, and `einops.rearrange("(b t) h k -> b t h k")`
  with the batch and sequence sizes passed in;
- GLU experts with `einops.einsum`: `act(<x, down[slot]>) * <x, gate[slot]>`, times the
  softmax of the scores, then `einsum(h, up, "b t h k, b t h k d -> b t d")`;
- `forward` returns `(hidden_states, all_scores)`, the knn² grid scores for an aux loss.

Two deliberate changes: the source reads `bs = len(query)`, which pins B·T under
`torch.export`; here it is `query.shape[0]`. And the source flattens `hidden_states` in place
and `reshape`s it back to (b, t, d) before the experts, which makes torch 2.13's export emit
an unprovable contiguity guard on the token dim (`t·min(d, d·t) == d·t`) and refuse the
dynamic capture; here the flat view gets its own name and the experts read the original.
"""

from __future__ import annotations

import math

import einops
import numpy as np
import torch
from einops import einsum
from torch import nn
from torch.nn import functional as F

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


# copied from https://github.com/facebookresearch/XLM/blob/main/PKM-layer.ipynb
def get_uniform_keys(n_keys, dim, seed):
    """
    Generate random uniform keys (same initialization as nn.Linear).
    """
    rng = np.random.RandomState(seed)
    bound = 1 / math.sqrt(dim)
    keys = rng.uniform(-bound, bound, (n_keys, dim))
    return keys.astype(np.float32)


class PEERBlock(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        num_experts_per_tok: int,
        num_heads: int,
        key_dim: int,
        batch_norm: bool = True,
        hidden_act: nn.Module | None = None,
        glu: bool = True,
    ):
        super().__init__()
        self.hidden_size = d_model
        self.num_experts = num_experts**2
        self.num_experts_per_tok = num_experts_per_tok
        self.heads = num_heads
        assert math.sqrt(self.num_experts).is_integer()
        self.num_keys = int(math.sqrt(self.num_experts))
        self.k_dim = key_dim
        self.glu = glu
        self.w_up_embed = nn.Embedding(self.num_experts, self.hidden_size)
        self.w_down_embed = nn.Embedding(self.num_experts, self.hidden_size)
        self.w_gate_embed = nn.Embedding(self.num_experts, self.hidden_size)
        self.act_fn = hidden_act if hidden_act is not None else nn.ReLU()
        self.initialize_keys()
        self.query_proj = nn.Sequential(
            *filter(
                None,
                [
                    nn.Linear(self.hidden_size, self.heads * self.k_dim, bias=True),
                    nn.BatchNorm1d(self.heads * self.k_dim) if batch_norm else None,
                ],
            )
        )

    def initialize_keys(self):
        half = self.k_dim // 2
        keys = nn.Parameter(
            torch.from_numpy(
                np.array(
                    [
                        get_uniform_keys(self.num_keys, half, seed=(2 * i + j))
                        for i in range(self.heads)
                        for j in range(2)
                    ]
                )
            ).view(self.heads, 2, self.num_keys, half)
        )
        self.keys = nn.Parameter(keys)

    def _get_indices(self, query, subkeys, top_k):
        assert query.dim() == 2 and query.size(1) == self.k_dim
        bs = query.size(0)
        knn = top_k
        half = self.k_dim // 2
        n_keys = len(subkeys[0])

        q1 = query[:, :half]
        q2 = query[:, half:]

        scores1 = F.linear(q1, subkeys[0], bias=None)
        scores2 = F.linear(q2, subkeys[1], bias=None)
        scores1, indices1 = scores1.topk(knn, dim=1)
        scores2, indices2 = scores2.topk(knn, dim=1)

        all_scores = (
            scores1.view(bs, knn, 1).expand(bs, knn, knn)
            + scores2.view(bs, 1, knn).expand(bs, knn, knn)
        ).view(bs, -1)
        all_indices = (
            indices1.view(bs, knn, 1).expand(bs, knn, knn) * n_keys
            + indices2.view(bs, 1, knn).expand(bs, knn, knn)
        ).view(bs, -1)

        scores, best_indices = torch.topk(all_scores, k=knn, dim=1)
        indices = all_indices.gather(1, best_indices)

        assert scores.shape == indices.shape == (bs, knn)
        return indices, scores, all_scores

    def get_indices(self, query, bsz, seq_len):
        assert query.dim() == 2 and query.size(1) == self.k_dim
        query = query.view(-1, self.heads, self.k_dim)
        bs = query.shape[0]  # source: len(query)
        outputs = [
            self._get_indices(query[:, i], self.keys[i], self.num_experts_per_tok)
            for i in range(self.heads)
        ]
        s = torch.cat([s.view(bs, 1, self.num_experts_per_tok) for _, s, _ in outputs], 1)
        i = torch.cat([i.view(bs, 1, self.num_experts_per_tok) for i, _, _ in outputs], 1)
        all_scores = torch.cat(
            [a.view(bs, 1, self.num_experts_per_tok**2) for _, _, a in outputs], 1
        )
        i = einops.rearrange(i, "(b t) h k -> b t h k", b=bsz, t=seq_len)
        s = einops.rearrange(s, "(b t) h k -> b t h k", b=bsz, t=seq_len)
        return i, s, all_scores.view(-1, self.num_experts_per_tok**2)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat_states = hidden_states.view(-1, hidden_dim)  # source: hidden_states = ...view(...)
        indices, scores, all_scores = self.get_indices(
            self.query_proj(flat_states).view(
                batch_size * sequence_length * self.heads, self.k_dim
            ),
            batch_size,
            sequence_length,
        )
        w_up = self.w_up_embed(indices)
        if self.glu:
            w_down = self.w_down_embed(indices)
        w_gate = self.w_gate_embed(indices)
        gate = einsum(hidden_states, w_gate, "b t d , b t h k d -> b t h k ")
        hidden_states = einsum(hidden_states, w_down, "b t d , b t h k d -> b t h k ")
        hidden_states = (
            self.act_fn(hidden_states) * gate if self.glu else self.act_fn(hidden_states)
        )
        hidden_states = hidden_states * F.softmax(scores, dim=-1)
        hidden_states = einsum(hidden_states, w_up, "b t h k, b t h k d -> b t d")
        return hidden_states, all_scores


def _retrain(block: PEERBlock, g: torch.Generator, calibration: torch.Tensor) -> None:
    with torch.no_grad():
        block.keys.copy_(normal(g, *block.keys.shape, std=1 / math.sqrt(block.k_dim // 2)))
        lin = block.query_proj[0]
        lin.weight.copy_(fan_in(g, *lin.weight.shape))
        lin.bias.copy_(normal(g, *lin.bias.shape, std=0.1))
        bn = block.query_proj[1]
        q = lin(calibration.reshape(-1, block.hidden_size))
        bn.running_mean.copy_(q.mean(0) + 0.2)
        bn.running_var.copy_(q.var(0) * (1.2 + torch.rand(q.shape[1], generator=g)))
        bn.weight.copy_(gains(g, bn.weight.shape[0], scale=1.1, spread=0.3))
        bn.bias.copy_(normal(g, *bn.bias.shape, std=0.2))
        bn.num_batches_tracked.fill_(5_000)
        for table in (block.w_down_embed, block.w_gate_embed):
            table.weight.copy_(fan_in(g, *table.weight.shape, gain=1.5))
        block.w_up_embed.weight.copy_(normal(g, *block.w_up_embed.weight.shape, std=0.5))


# d_model 64, 32 x 32 experts (num_experts=32 -> 1,024), 1 head, key_dim 32, top-8, ReLU
glu_one_head_inputs = float_inputs(64, seed=731)


@factory
def peer_block_glu_one_head() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(731)
    block = PEERBlock(64, 32, 8, num_heads=1, key_dim=32, glu=True)
    _retrain(block, g, glu_one_head_inputs(4, 16)[0])
    return block.eval(), glu_one_head_inputs(2, 16)


# d_model 48, 24 x 24 experts, 3 heads, key_dim 24, top-6, SiLU
glu_three_heads_inputs = float_inputs(48, seed=735)


@factory
def peer_block_glu_three_heads() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(732)
    block = PEERBlock(48, 24, 6, num_heads=3, key_dim=24, hidden_act=nn.SiLU(), glu=True)
    _retrain(block, g, glu_three_heads_inputs(4, 16)[0])
    return block.eval(), glu_three_heads_inputs(2, 16)
