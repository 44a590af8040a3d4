"""A mixture-of-experts feed-forward next to a memory layer, in one block.

An MoE router looks like a memory lookup from far away: a softmax, a `topk` over experts,
then weights read at the selected indices (gathered expert matrices) and a weighted sum.
It is NOT a memory lookup: there is one top-k over a handful of experts, no candidate
top-ks feeding it, no product-key grid. A compiler must fuse the memory layer and leave
the router alone. Two MoE styles:

- `TopTwoGatherMoE` (the Switch/GShard-style code many repos carry): softmax router,
  `probs.topk(2)`, renormalised weights, the selected experts' matrices gathered by
  indexing stacked parameters (`self.w_in[top_idx]` → [T, 2, D, F]) and applied with
  einsums;
- `DenseGatherMoE`: every expert computed densely, the two selected expert OUTPUTS read
  back with `torch.gather` on an `expand`ed index and summed with the router weights —
  the same gather + weighted-sum shape as a lookup's aggregation.

The memory beside them is the paper authors' V1 layer (`authors_v1.py`) in one case and
XLM's product-key memory (`xlm_hashing.py`) in the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._trained import factory, fan_in, float_inputs, gains, normal, private_global_rng, seeded
from .authors_v1 import UltraMemLayerV1
from .xlm_hashing import HashingMemoryProductFast, retrain_xlm_memory, xlm_params


class TopTwoGatherMoE(nn.Module):
    """Softmax router, top-2 of `num_experts`, expert matrices gathered by index."""

    def __init__(self, dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        probs = F.softmax(self.router(tokens), dim=-1)
        top_w, top_idx = probs.topk(2, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        h = F.silu(torch.einsum("td,tkdf->tkf", tokens, self.w_in[top_idx]))
        y = torch.einsum("tkf,tkfd->tkd", h, self.w_out[top_idx])
        return (top_w.unsqueeze(-1) * y).sum(dim=1).reshape(b, t, d)


class DenseGatherMoE(nn.Module):
    """All experts computed; the top-2 outputs gathered back and weighted."""

    def __init__(self, dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                for _ in range(num_experts)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        weights, selected = torch.topk(logits.softmax(dim=-1), k=2, dim=-1)  # [b, t, 2]
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [b, t, E, d]
        index = selected.unsqueeze(-1).expand(*selected.shape, outputs.shape[-1])
        picked = torch.gather(outputs, -2, index)  # [b, t, 2, d]
        return (weights.unsqueeze(-1) * picked).sum(dim=-2)


class MoEMemoryBlock(nn.Module):
    """x + moe(norm(x)) + memory(norm(x)): the two sparse paths side by side."""

    def __init__(self, dim: int, moe: nn.Module, memory: nn.Module) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.moe = moe
        self.memory = memory
        self.out_norm = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.out_norm(x + self.moe(h) + self.memory(h))


def _retrain_block(block: MoEMemoryBlock, g: torch.Generator, keep: nn.Module) -> None:
    kept = {id(p) for p in keep.parameters()}
    with torch.no_grad():
        for name, p in block.named_parameters():
            if id(p) in kept:
                continue
            if name.endswith("norm.weight"):
                p.copy_(gains(g, p.shape[0]))
            elif name.endswith(("w_in", "w_out")):
                p.copy_(normal(g, *p.shape, std=1 / math.sqrt(p.shape[1])))
            elif p.ndim == 2:
                # router rows far apart: the top-2 of 8 experts is never a near-tie
                p.copy_(
                    fan_in(
                        g,
                        *p.shape,
                        gain=3.0 if name.endswith(("router.weight", "gate.weight")) else 1.0,
                    )
                )
            else:
                p.copy_(normal(g, *p.shape, std=0.05))


moe_v1_inputs = float_inputs(64, seed=701)


@factory
def moe_top2_beside_v1() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Top-2-of-8 MoE with gathered expert weights beside a V1 memory (D 64)."""
    memory = UltraMemLayerV1(64, knum=16, kdim=32, vdim=32, knn=8, head=2)
    memory.reset_parameters_trained(seeded(702))
    block = MoEMemoryBlock(64, TopTwoGatherMoE(64, 64, num_experts=8), memory)
    _retrain_block(block, seeded(701), keep=memory)
    return block.eval(), moe_v1_inputs(2, 16)


moe_xlm_inputs = float_inputs(48, seed=703)


@factory
def moe_dense_gather_beside_xlm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Dense 6-expert MoE whose top-2 outputs are gathered, beside an XLM memory (D 48)."""
    params = xlm_params(
        mem_k_dim=32, mem_heads=2, mem_knn=8, mem_n_keys=24, mem_query_batchnorm=True
    )
    with private_global_rng():
        memory = HashingMemoryProductFast(48, 48, params)
        block = MoEMemoryBlock(48, DenseGatherMoE(48, 64, num_experts=6), memory)
    retrain_xlm_memory(memory, seeded(704), moe_xlm_inputs(4, 16)[0])
    _retrain_block(block, seeded(703), keep=memory)
    return block.eval(), moe_xlm_inputs(2, 16)
