"""Stacked MoE routers are not memory lookups, whatever their sizes.

A router's top-k depends on the previous layer's router (through the residual stream),
so it has one "candidate" top-k behind it; with experts = k² (OLMoE: 64 experts, top 8)
its ranked axis has the length a joint product-key grid would. It must still anchor no
lookup, also when its batch is symbolic with an example of 2 (a decode step's capture).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.export import Dim

from ultramem.passes.lookups import find_lookups


class TwoRoutedLayers(nn.Module):
    def __init__(self, hidden: int = 8, experts: int = 4, top: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.top = top
        self.gates = nn.ModuleList(nn.Linear(hidden, experts, bias=False) for _ in range(2))
        self.experts = nn.Parameter(torch.randn(2, experts, hidden, hidden) * 0.1)

    def forward(self, x: Tensor) -> Tensor:  # x [batch, 1, hidden]
        for layer, gate in enumerate(self.gates):
            weights, chosen = gate(x).softmax(-1).topk(self.top, dim=-1)
            expert = self.experts[layer][chosen]  # [batch, 1, top, hidden, hidden]
            mixed = torch.einsum("btk,btkij,btj->bti", weights, expert, x)
            x = x + mixed
        return x


def test_stacked_routers_with_experts_k_squared_anchor_no_lookup() -> None:
    model = TwoRoutedLayers().eval()
    x = torch.randn(2, 1, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", max=64)},))
    assert [n for n in program.graph.nodes if n.target is torch.ops.aten.topk.default]
    assert find_lookups(program.graph) == []
