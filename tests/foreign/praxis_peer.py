"""praxis's `PraxisPEER`: lucidrains-style PEER, BatchNorm on the INPUT, sigmoid scores, head sets.

Source read (not copied): https://github.com/0-5788719150923125/praxis,
`praxis/modules/peer.py`-era `PraxisPEER` ("This class implements the Parameter-Efficient
Expert Retrieval (PEER) mechanism", `__version__ = "0.1.0"`). Habits kept:

- the query net is an `nn.Sequential` of a local `BatchNorm1d` subclass that views
  (b, s, d) -> (b·s, d) and back, applied to the hidden states BEFORE the query Linear,
  then `nn.Unflatten(-1, (2, heads, key_dims))` and a local `Permute` module
  (`permute(2, 0, 1, 3, 4).contiguous()`);
- keys [heads, num_keys, 2, key_dims], `torch.einsum("p b n h d, h k p d -> p b n h k")`
  (spaces in the equation), ONE `sim.topk` over both sides whose (values, indices) pair is
  unpacked per side: `(scores_x, scores_y), (indices_x, indices_y) = sim.topk(...)`;
- flattening with `view(*shape[:-2], math.prod(shape[-2:]))`;
- `offset_heads=True`: one expert set per head, ids shifted by
  `torch.arange(heads) * num_experts` (tables of heads · n² rows);
- `nn.Embedding` down/up tables, `ACT2FN`-style GELU on <x, down>, then
  `F.sigmoid(scores) * act(outputs)` (non-competing sigmoid scores, no softmax), dropout
  on both the activations and the gathered up rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(2, 0, 1, 3, 4).contiguous()


class BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm for combined partitions and heads"""

    def forward(self, x):
        b, s, d = x.shape
        x = x.view(b * s, d)
        x = super().forward(x)
        return x.view(b, s, d)


class PraxisPEER(nn.Module):
    __version__ = "0.1.0"

    def __init__(self, hidden_size, key_dims, k, num_heads, offset_heads, num_experts, dropout=0.1):
        super().__init__()
        self.k = k
        self.num_heads = num_heads
        self.offset_heads = offset_heads
        self.num_experts = num_experts
        self.num_sets = 1 if not self.offset_heads else self.num_heads
        self.num_keys = int(math.sqrt(self.num_experts))
        assert (self.num_experts**0.5).is_integer(), (
            "`self.num_experts` needs to be a perfect square"
        )
        assert (hidden_size % 2) == 0, "`hidden_size` should be divisible by 2"

        self.queries = nn.Sequential(
            BatchNorm1d(hidden_size),
            nn.Linear(hidden_size, key_dims * self.num_heads * 2, bias=False),
            nn.Unflatten(-1, (2, self.num_heads, key_dims)),
            Permute(),
        )
        self.keys = nn.Parameter(torch.randn(self.num_heads, self.num_keys, 2, key_dims))
        self.down = nn.Embedding(self.num_experts * self.num_sets, hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Embedding(self.num_experts * self.num_sets, hidden_size)

    def forward(self, inputs: Tensor):
        queries = self.queries(inputs)  # (2, batch_size, seq_len, heads, dim_key)
        sim = torch.einsum("p b n h d, h k p d -> p b n h k", queries, self.keys)

        (scores_x, scores_y), (indices_x, indices_y) = sim.topk(self.k, dim=-1)

        all_scores = scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)
        all_indices = indices_x.unsqueeze(-1) * self.num_keys + indices_y.unsqueeze(-2)
        all_scores = all_scores.view(*all_scores.shape[:-2], math.prod(all_scores.shape[-2:]))
        all_indices = all_indices.view(*all_indices.shape[:-2], math.prod(all_indices.shape[-2:]))

        scores, pk_indices = all_scores.topk(self.k, dim=-1)
        indices = all_indices.gather(-1, pk_indices)

        if self.offset_heads:
            head_expert_offsets = (
                torch.arange(self.num_heads, device=inputs.device) * self.num_experts
            )
            indices = indices + head_expert_offsets.view(1, 1, -1, 1)

        weights_down = self.down(indices)
        outputs = torch.einsum("b n d, b n h k d -> b n h k", inputs, weights_down)
        outputs = F.sigmoid(scores) * self.act(outputs)
        outputs = self.dropout(outputs)
        weights_up = self.dropout(self.up(indices))
        return torch.einsum("b n h k, b n h k d -> b n d", outputs, weights_up)


class PraxisExpertBlock(nn.Module):
    def __init__(self, hidden_size: int, peer: PraxisPEER) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)
        self.expert = peer

    def forward(self, x: Tensor) -> Tensor:
        return x + self.expert(self.norm(x))


# hidden 64, key_dims 16, k 8, 4 heads with offset heads, 32 x 32 experts per head
# (the source's test configs: 256 hidden, 16 key dims, 4 heads, 64-256 experts)
praxis_peer_inputs = float_inputs(64, seed=821)


@factory
def praxis_peer_offset_heads() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(821)
    peer = PraxisPEER(64, key_dims=16, k=8, num_heads=4, offset_heads=True, num_experts=1024)
    block = PraxisExpertBlock(64, peer)
    with torch.no_grad():
        block.norm.weight.copy_(gains(g, 64))
        x = block.norm(praxis_peer_inputs(4, 16)[0]).reshape(-1, 64)
        bn = peer.queries[0]
        bn.running_mean.copy_(x.mean(0) + 0.05)
        bn.running_var.copy_(x.var(0) * (1.1 + torch.rand(64, generator=g)))
        bn.weight.copy_(gains(g, 64, spread=0.3))
        bn.bias.copy_(normal(g, 64, std=0.1))
        bn.num_batches_tracked.fill_(2_000)
        peer.queries[1].weight.copy_(fan_in(g, 128, 64))
        peer.keys.copy_(normal(g, *peer.keys.shape, std=1 / math.sqrt(16)))
        peer.down.weight.copy_(fan_in(g, *peer.down.weight.shape, gain=1.5))
        peer.up.weight.copy_(normal(g, *peer.up.weight.shape, std=0.5))
    return block.eval(), praxis_peer_inputs(2, 16)
