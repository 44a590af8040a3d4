"""Selections as parity reads them: the same slots, ranked by the same scores, from the
original model's top-ks and from a fused ``retrieve``; an MoE router is no memory layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ultramem.compiler.capture import capture
from ultramem.compiler.parity.selections import (
    layer_selections,
    memory_layer_names,
    run_recording_sites,
    site_plan,
)
from ultramem.compiler.rewrite import rewrite
from ultramem.models.config import UltraMemConfig
from ultramem.models.ultramem import UltraMemLayer


def _selections(module: nn.Module, plan: object, x: Tensor) -> list:
    _, records = run_recording_sites(module, (x,))
    selections = layer_selections(records, plan)  # type: ignore[arg-type]
    assert not isinstance(selections, str), selections
    return selections


def test_a_fused_retrieve_is_ranked_by_its_pre_activation_grid_scores() -> None:
    # softmax after the top-k: the op's outputs are activated, but the near-tie verdict
    # must compare what the top-k ranked, the raw grid sums, as the original records them
    cfg = UltraMemConfig(score_activation="softmax", cores=2, heads=2)
    layer = UltraMemLayer(cfg).eval()
    x = torch.randn(2, 16, cfg.d_model)
    cap = capture(layer, (x,))
    res = rewrite(layer, cap, (x,))
    assert res.fused_layers
    x = torch.randn(3, 5, cfg.d_model)
    [original] = _selections(layer, res.plan, x)
    [fused] = _selections(res.program.module(), site_plan(res.program.graph), x)
    order_o, order_f = original.slots.argsort(-1), fused.slots.argsort(-1)
    assert torch.equal(original.slots.gather(-1, order_o), fused.slots.gather(-1, order_f))
    torch.testing.assert_close(
        fused.values.gather(-1, order_f), original.values.gather(-1, order_o), atol=1e-5, rtol=0
    )
    # and those are not the activated scores the op returns (which sum to 1 per core)
    assert not torch.allclose(fused.values.sum(-1), torch.ones(()), atol=1e-3)


class RouterBesideNothing(nn.Module):
    """A top-2 MoE router: a top-k, but no grid of candidates, so no memory layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(16, 8)
        self.experts = nn.Parameter(torch.randn(8, 16, 16) / 4)

    def forward(self, x: Tensor) -> Tensor:
        weights, experts = self.gate(x).softmax(-1).topk(2, dim=-1)
        chosen = self.experts[experts]  # [B, L, 2, 16, 16]
        return torch.einsum("blk,blkij,blj->bli", weights, chosen, x)


def test_a_router_top_k_is_not_a_memory_layer() -> None:
    model = RouterBesideNothing().eval()
    x = torch.randn(2, 6, 16)
    graph = capture(model, (x,)).program.graph
    assert memory_layer_names(graph) == []
    plan = site_plan(graph)
    assert [site.role for site in plan.sites] == ["other"] and plan.names == ()
