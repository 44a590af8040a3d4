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


def test_a_runtime_that_compiles_top_k_away_shows_its_fused_lookups_alone() -> None:
    """AOTInductor lowers an unfused ``topk`` into its own code (no dispatcher call), so
    only the fused retrieves are recorded: they are compared, the rest is said to be
    unobservable, and a model with no lookup compares outputs alone."""
    from ultramem.compiler.parity.compare import TOLERANCES
    from ultramem.compiler.parity.selections import RetrieveRecord, Site, SitePlan, TopkRecord
    from ultramem.compiler.parity.stages import compare_lookups

    tol = TOLERANCES[torch.float32]
    n, k = 8, 2
    rows, cols = torch.randn(1, 1, n, 1), torch.randn(1, 1, n, 1)
    cores = torch.ones(1, 1, 1, 1)
    slots = torch.tensor([[[3 * n + 1, 2 * n + 5]]])
    retrieve = RetrieveRecord(torch.zeros(1, 1, k, 1), slots, rows, cols, cores)
    plan = SitePlan(
        (Site("row", 0), Site("col", 0), Site("final", 0), Site("retrieve", 1)), ("a", "b")
    )
    unfused = [
        TopkRecord(torch.zeros(1, 2), torch.tensor([[3, 2]]), n),
        TopkRecord(torch.zeros(1, 2), torch.tensor([[1, 5]]), n),
        TopkRecord(torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 3]]), 4),
    ]
    reference = [*unfused, retrieve]
    out = compare_lookups("t", reference, plan, [retrieve], plan, tol)
    assert [c.passed for c in out] == [True, True]
    assert out[0].rows == 0 and "not observable" in out[0].message
    assert out[1].rows == 1 and out[1].differing == 0
    # a stage that recorded some top-ks but not all is still a misalignment
    assert not compare_lookups("t", reference, plan, [unfused[0], retrieve], plan, tol)[0].passed
    # no lookup at all (a router's top-k): nothing to align
    router = SitePlan((Site("other"),), ())
    assert compare_lookups("t", [unfused[0]], router, [], router, tol) == []
