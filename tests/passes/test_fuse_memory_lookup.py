"""fuse_memory_lookup on the reference layer's variants; and what it must leave alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ultramem.compiler.capture import capture
from ultramem.compiler.parity.selections import (
    layer_selections,
    memory_layer_names,
    run_recording_sites,
)
from ultramem.compiler.rewrite import op_counts, rewrite
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM
from ultramem.models.ultramem import UltraMemLayer

LOOKUP_OPS = ("topk", "gather", "scatter_add", "scatter.src", "index.Tensor", "linalg_svd")

VARIANTS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(heads=2, cores=2, expansion=4, query_conv=3), id="H2-M2-E4-conv"),
    pytest.param(dict(score_activation="relu", query_norm="rmsnorm", topk=5), id="relu-rms-k<m"),
    pytest.param(dict(score_activation="softmax", slot_mapping="identity"), id="softmax-identity"),
    pytest.param(dict(query_norm="none", key_norm=False, tucker_rank=3, topm=6), id="r3-no-norms"),
    pytest.param(dict(rank1_from_svd_in_forward=True, cores=2, heads=2), id="svd-in-forward"),
    pytest.param(dict(output_proj=False, value_dim=16, expansion=4), id="no-out-proj"),
]


def _fuse(model: nn.Module, x: torch.Tensor) -> tuple[object, object]:
    cap = capture(model, (x,), max_tokens=256)
    return cap, rewrite(model, cap, (x,), memory_layer_names(cap.program.graph))


@pytest.mark.parametrize("overrides", VARIANTS)
def test_reference_layer_variants_fuse_selection_exact(overrides: dict) -> None:
    cfg = UltraMemConfig(**overrides)
    layer = UltraMemLayer(cfg).eval()
    cap, res = _fuse(layer, torch.randn(2, 16, cfg.d_model))
    assert len(res.fused_layers) == 1 and not res.rolled_back
    counts = op_counts(res.program)
    assert counts["ultramem.retrieve"] == 1 and counts["ultramem.aggregate"] == 1
    assert not [op for op in counts if op.startswith(LOOKUP_OPS)], counts
    assert sum(counts.values()) < sum(op_counts(cap.program).values())
    for shape in ((1, 1), (3, 11)):
        x = torch.randn(*shape, cfg.d_model)
        ref, ref_sites = run_recording_sites(layer, (x,))
        out, sites = run_recording_sites(res.program.module(), (x,))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        [ref_sel], [sel] = layer_selections(ref_sites), layer_selections(sites)
        assert torch.equal(ref_sel.slots.sort(-1).values, sel.slots.sort(-1).values)


def test_lm_with_skip_layer_placement_fuses_every_layer() -> None:
    cfg = LMConfig(
        memory=UltraMemConfig(heads=2, cores=2, expansion=4),
        memory_layers={0: 2, 1: 1, 2: 2},
        n_layers=3,
    )
    model = UltraMemLM(cfg).eval()
    _, res = _fuse(model, torch.randint(0, 64, (2, 16)))
    assert len(res.fused_layers) == 3 and res.parity is not None and res.parity.passed
    x = torch.randint(0, 64, (1, 37))
    torch.testing.assert_close(res.program.module()(x), model(x), atol=1e-5, rtol=1e-5)


class TopkThenMean(nn.Module):
    """Looks like a lookup (two candidate top-ks, a grid top-k, a table read) but pools
    with an unweighted mean: not what the fused ops compute."""

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


def test_lookalike_with_other_semantics_is_refused_and_left_exact() -> None:
    model = TopkThenMean().eval()
    _, res = _fuse(model, torch.randn(2, 8, 16))
    assert res.fused_layers == []
    fuse = next(p for p in res.passes if p.name == "fuse_memory_lookup")
    assert len(fuse.refused) == 1 and "no binding" in fuse.refused[0].reason
    assert op_counts(res.program).get("topk") == 3
    x = torch.randn(3, 5, 16)
    assert torch.equal(res.program.module()(x), model(x))


def test_model_without_memory_passes_through_with_a_note() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    cap, res = _fuse(model, torch.randn(2, 4, 8))
    fuse = next(p for p in res.passes if p.name == "fuse_memory_lookup")
    assert fuse.matched == [] and "no memory lookup" in fuse.details["note"]
    assert op_counts(res.program) == op_counts(cap.program)


def test_a_layer_that_fails_parity_after_fusion_is_rolled_back_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sabotage the second layer's binding (wrong slot mapping) past verification: parity
    must catch it, roll back that layer only, and keep the first one fused."""
    import dataclasses

    import ultramem.passes.fuse_memory_lookup as fuse_module

    real_bind = fuse_module._bind

    def sabotaged_bind(gm, region, ctx):  # type: ignore[no-untyped-def]
        binding, error = real_bind(gm, region, ctx)
        if region.name == "topk_5":
            binding = dataclasses.replace(binding, mapping="div")
        return binding, error

    monkeypatch.setattr(fuse_module, "_bind", sabotaged_bind)
    cfg = LMConfig(memory=UltraMemConfig(heads=2, expansion=4), memory_layers={0: 1, 1: 1})
    model = UltraMemLM(cfg).eval()
    _, res = _fuse(model, torch.randint(0, 64, (2, 16)))
    assert res.fused_layers == ["topk_2"]
    assert list(res.rolled_back) == ["topk_5"] and "parity" in res.rolled_back["topk_5"]
    assert res.parity is not None and res.parity.passed
    counts = op_counts(res.program)
    assert counts["ultramem.retrieve"] == 1 and counts["topk"] == 3
    x = torch.randint(0, 64, (3, 9))
    torch.testing.assert_close(res.program.module()(x), model(x), atol=1e-5, rtol=1e-5)
