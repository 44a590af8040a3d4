"""Memory layers written by other hands (``tests/foreign``), through the whole compiler.

The models were written by a separate session that never read the passes, from the real
packages and the public code of the paper's authors, Meta, XLM and lucidrains. For each:

- every lookup's selection and aggregation are fused (``ultramem::retrieve`` and
  ``::aggregate``), the number of aggregations equal to the model's memory layers (heads
  looped in Python share one); a look-alike keeps the part whose maths is no lookup's;
- parity of the rewritten program against the original model passes with no selection
  flipped, on the example and other sizes the capture admits; and the original module
  itself agrees with the fused program on those sizes (one compile per model serves both);
- the ONNX export runs in stock ONNX Runtime with the same parity, and a TensorRT engine
  builds from it (``tensorrt_rtx``; engines cannot run here).

``check`` of the exported folder is exercised on a representative few (``CHECKED``): it
re-runs what the export ran.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ultramem.compiler.capture import parity_inputs
from ultramem.compiler.formats import ExportOptions
from ultramem.compiler.pipeline import Compiled, check_artifacts, compile_model, export_model
from ultramem.models.builtin import LoadedModel
from ultramem.tests.foreign.cases import CASES, ForeignCase

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
FORMATS = ("onnx", "tensorrt") if HAS_RTX else ("onnx",)
CHECKED = {
    "pypi-ultra-mem-defaults",
    "authors-v2-shared-table",
    "xlm-hashing-memory",
    "memory-plus-exhaustive-grid",  # second round: a rewrite before the fusion
    "multimolecule-rnamsm-pkm",  # second round: a rewrite after it
}
REAL = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]


def loaded(case: ForeignCase) -> LoadedModel:
    model, example = case.build()
    metadata = {"max_tokens": case.max_tokens} if case.max_tokens else {}
    return LoadedModel(model, example, case.id, metadata)


def _fused_parts(table: list[dict]) -> dict[str, set[str]]:
    return {entry["lookup"]: set(entry["fused"]) for entry in table}


@pytest.mark.parametrize("case", REAL)
def test_every_part_fuses_and_every_stage_matches(case: ForeignCase, tmp_path: Path) -> None:
    model = loaded(case)
    compiled = compile_model(model)
    routers = sum(site.role == "other" for site in compiled.rewrite.plan.sites)
    manifest, report = export_model(
        model, tmp_path / "out", formats=FORMATS, options=ExportOptions(), compiled=compiled
    )
    assert report.passed, "\n".join(report.summary_lines())
    table = manifest["memory_layers"]
    parts = _fused_parts(table)
    ops = manifest["ops"]["after"]
    if case.refused:  # no lookup the ops express: said so, left as written, exported
        merged = compiled.rewrite.fusion.details.get("merged_grids", {})
        assert any(case.refused in reason for reason in merged.values()), merged
        assert "ultramem.retrieve" not in ops, table
    elif case.lookalike_part:
        # the part whose maths is not a lookup's is never fused, whatever else is
        if case.lookalike_part in ("selection", "both"):
            assert "ultramem.retrieve" not in ops, table
        if case.lookalike_part in ("aggregation", "both"):
            assert "ultramem.aggregate" not in ops, table
    else:
        missing = {name: sorted({"selection", "aggregation"} - p) for name, p in parts.items()}
        reasons = {e["lookup"]: (e["selection"], e["aggregation"]) for e in table}
        assert parts and all(not m for m in missing.values()), (missing, reasons)
        assert ops.get("ultramem.aggregate") == (case.aggregates or case.memory_layers), ops
        # an MoE router's top-k stays its own, as do candidates the model returns
        assert ops.get("topk", 0) == routers + case.kept_topks, ops
    for stage in report.stages:
        if stage.executed:
            assert all(s.differing == 0 for s in stage.selections), stage.stage
    if "tensorrt" in FORMATS:
        assert manifest["tensorrt"]["engine_bytes"] > 0
    if case.id in CHECKED:
        again = check_artifacts(model, tmp_path / "out")
        assert again.passed, "\n".join(again.summary_lines())
    if not case.lookalike_part and not case.refused:
        _agrees_with_the_module_on_admitted_sizes(compiled)


def _agrees_with_the_module_on_admitted_sizes(compiled: Compiled) -> None:
    fused = compiled.rewrite.program.module()
    for inputs in parity_inputs(compiled.loaded.example_inputs, compiled.capture)[1:]:
        with torch.no_grad():
            want, got = compiled.loaded.model(*inputs), fused(*inputs)
        want = want[0] if isinstance(want, tuple) else want
        got = got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
