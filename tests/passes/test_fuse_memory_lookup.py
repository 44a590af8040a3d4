"""fuse_memory_lookup on the reference layer's variants; what it must leave alone; how the
pipeline proves it, rolls it back and reports it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ultramem.compiler.capture import CaptureResult, capture
from ultramem.compiler.inspection import fused_layer_table
from ultramem.compiler.parity.selections import layer_selections, run_recording_sites, site_plan
from ultramem.compiler.rewrite import RewriteResult, op_counts, rewrite
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM
from ultramem.models.ultramem import UltraMemLayer

LOOKUP_OPS = ("topk", "gather", "scatter_add", "scatter.src", "index.Tensor", "linalg_svd")
BOTH = ["selection", "aggregation"]

VARIANTS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(heads=2, cores=2, expansion=4, query_conv=3), id="H2-M2-E4-conv"),
    pytest.param(dict(score_activation="relu", query_norm="rmsnorm", topk=5), id="relu-rms-k<m"),
    pytest.param(dict(score_activation="softmax", slot_mapping="identity"), id="softmax-identity"),
    pytest.param(dict(query_norm="none", key_norm=False, tucker_rank=3, topm=6), id="r3-no-norms"),
    pytest.param(dict(rank1_from_svd_in_forward=True, cores=2, heads=2), id="svd-in-forward"),
    pytest.param(dict(output_proj=False, value_dim=16, expansion=4), id="no-out-proj"),
]


def _fuse(model: nn.Module, x: torch.Tensor) -> tuple[CaptureResult, RewriteResult]:
    cap = capture(model, (x,), max_tokens=256)
    return cap, rewrite(model, cap, (x,))


def _parts(res: RewriteResult) -> list[list[str]]:
    return [entry["fused"] for entry in fused_layer_table(res)]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_reference_layer_variants_fuse_both_parts_selection_exact(overrides: dict) -> None:
    cfg = UltraMemConfig(**overrides)
    layer = UltraMemLayer(cfg).eval()
    cap, res = _fuse(layer, torch.randn(2, 16, cfg.d_model))
    assert _parts(res) == [BOTH] and not res.rolled_back and not res.disabled_passes
    counts = op_counts(res.program)
    assert counts["ultramem.retrieve"] == 1 and counts["ultramem.aggregate"] == 1
    assert not [op for op in counts if op.startswith(LOOKUP_OPS)], counts
    assert sum(counts.values()) < sum(op_counts(cap.program).values())
    fused_plan = site_plan(res.program.graph)
    for shape in ((1, 1), (3, 11)):
        x = torch.randn(*shape, cfg.d_model)
        ref, ref_sites = run_recording_sites(layer, (x,))
        out, sites = run_recording_sites(res.program.module(), (x,))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        [ref_sel] = layer_selections(ref_sites, res.plan)  # type: ignore[misc]
        [sel] = layer_selections(sites, fused_plan)  # type: ignore[misc]
        assert torch.equal(ref_sel.slots.sort(-1).values, sel.slots.sort(-1).values)


def _pkm_softmax_in_float() -> nn.Module:
    from ultramem.tests.passes.foreign_models import PKMStyle

    return PKMStyle()  # softmax(scores.float()).type_as(scores), an assert on the scores


ACTIVATED = [
    pytest.param(lambda: UltraMemLayer(UltraMemConfig(score_activation="softmax")), id="M1"),
    # the scores reach the softmax through a permute ([T, M, H, k] -> [T, H, k, M])
    pytest.param(
        lambda: UltraMemLayer(UltraMemConfig(score_activation="softmax", cores=2, heads=2)),
        id="M2-permuted",
    ),
    pytest.param(_pkm_softmax_in_float, id="float-then-type_as"),
]


@pytest.mark.parametrize("build", ACTIVATED)
def test_the_score_activation_becomes_the_ops_own(build: Any) -> None:
    model = build().eval()
    width = model.values.shape[-1] if not hasattr(model, "cfg") else model.cfg.d_model
    x = torch.randn(2, 16, width)
    _, res = _fuse(model, x)
    [entry] = fused_layer_table(res)
    assert entry["fused"] == BOTH and entry["selection"]["activation"] == "softmax"
    counts = op_counts(res.program)
    assert "softmax.int" not in counts and "topk" not in counts, counts
    x = torch.randn(3, 7, width)
    torch.testing.assert_close(res.program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_lm_with_skip_layer_placement_fuses_every_layer() -> None:
    cfg = LMConfig(
        memory=UltraMemConfig(heads=2, cores=2, expansion=4),
        memory_layers={0: 2, 1: 1, 2: 2},
        n_layers=3,
    )
    model = UltraMemLM(cfg).eval()
    _, res = _fuse(model, torch.randint(0, 64, (2, 16)))
    assert _parts(res) == [BOTH] * 3 and res.parity is not None and res.parity.passed
    x = torch.randint(0, 64, (1, 37))
    torch.testing.assert_close(res.program.module()(x), model(x), atol=1e-5, rtol=1e-5)


class TopkThenMean(nn.Module):
    """A real selection (two candidate top-ks, a grid top-k) whose rows are averaged with
    no weights at all: an unweighted mean is not what the aggregate computes."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 32)
        self.keys = nn.Parameter(torch.randn(2, 16, 16))
        self.values = nn.Parameter(torch.randn(256, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (2, 16))
        s_row = torch.einsum("bld,nd->bln", q[..., 0, :], self.keys[0])
        s_col = torch.einsum("bld,nd->bln", q[..., 1, :], self.keys[1])
        _, i_row = s_row.topk(4, dim=-1)
        _, i_col = s_col.topk(4, dim=-1)
        grid = s_row.gather(-1, i_row).unsqueeze(-1) + s_col.gather(-1, i_col).unsqueeze(-2)
        _, pos = grid.flatten(-2).topk(4, dim=-1)
        slot = i_row.gather(-1, pos // 4) * 16 + i_col.gather(-1, pos % 4)
        return self.values[slot].mean(-2)


def test_a_part_that_is_no_lookup_is_refused_and_the_other_still_fuses() -> None:
    model = TopkThenMean().eval()
    _, res = _fuse(model, torch.randn(2, 8, 16))
    [entry] = fused_layer_table(res)
    assert entry["fused"] == ["selection"]
    assert "aggregate" in entry["aggregation"]["reason"]
    counts = op_counts(res.program)
    assert counts.get("ultramem.retrieve") == 1 and "ultramem.aggregate" not in counts
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(res.program.module()(x), model(x), atol=1e-6, rtol=1e-6)


def test_model_without_memory_passes_through_with_a_note() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    cap, res = _fuse(model, torch.randn(2, 4, 8))
    assert res.fusion.matched == [] and "no memory lookup" in res.fusion.details["note"]
    assert op_counts(res.program) == op_counts(cap.program)
    assert res.parity is not None and res.parity.passed  # checked, even with nothing fused


def test_a_layer_that_fails_parity_after_fusion_is_rolled_back_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sabotage the second layer's row map past verification: parity must catch it, roll
    back that layer only, and keep the first one fused."""
    import ultramem.passes.fuse_memory_lookup as fuse_module

    real = fuse_module.fuse_aggregation

    def sabotaged(gm: Any, binding: Any, prefix: str) -> Any:
        if "memories.1" in str(binding.table.target):  # the second layer's table
            binding.row_map = binding.row_map.flip(-1).contiguous()
        return real(gm, binding, prefix)

    monkeypatch.setattr(fuse_module, "fuse_aggregation", sabotaged)
    cfg = LMConfig(memory=UltraMemConfig(heads=2, expansion=4), memory_layers={0: 1, 1: 1})
    model = UltraMemLM(cfg).eval()
    _, res = _fuse(model, torch.randint(0, 64, (2, 16)))
    assert res.fused_layers == ["topk_2"]
    assert list(res.rolled_back) == ["topk_5"] and "parity" in res.rolled_back["topk_5"]
    assert res.parity is not None and res.parity.passed


def test_a_pass_that_changes_the_numbers_is_left_out_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parity runs even when nothing fuses: a pass that corrupts the graph is found,
    disabled, and the export goes on with the model's own numbers."""
    import ultramem.compiler.rewrite as rewrite_module
    from ultramem.passes.base import PassResult

    def corrupt_weights(gm: Any, ctx: Any) -> PassResult:
        """Scales the model's output by 1.5: a rewrite that changes every number."""
        output = next(n for n in gm.graph.nodes if n.op == "output")
        (result,) = output.args[0]
        with gm.graph.inserting_before(output):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (result, 1.5))
        output.args = ((scaled,),)
        gm.recompile()
        return PassResult(gm, "corrupt_weights")

    pipeline = [corrupt_weights, *rewrite_module.PIPELINE]
    monkeypatch.setattr(rewrite_module, "PIPELINE", pipeline)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    _, res = _fuse(model, torch.randn(2, 4, 8))
    assert list(res.disabled_passes) == ["corrupt_weights"]
    assert "changed the model's numbers" in res.disabled_passes["corrupt_weights"]
    assert res.parity is not None and res.parity.passed


def test_a_binder_error_is_reported_as_a_bug_not_as_no_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ultramem.passes.fuse_memory_lookup as fuse_module

    def broken(*args: Any) -> Any:
        raise TypeError("simulated bug")

    monkeypatch.setattr(fuse_module, "bind_selection", broken)
    cfg = UltraMemConfig()
    _, res = _fuse(UltraMemLayer(cfg).eval(), torch.randn(2, 16, cfg.d_model))
    [entry] = fused_layer_table(res)
    assert entry["fused"] == []
    assert (
        "internal error" in entry["selection"]["reason"]
        and "simulated bug" in (entry["selection"]["reason"])
    )
    assert res.parity is not None and res.parity.passed
