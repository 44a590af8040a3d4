"""Print the README's table of foreign memory layers: what fused and the parity figures.

    .venv/bin/python -m ultramem.tests.foreign.report [CASE_ID ...] > /tmp/foreign.md

For each case: the model is compiled and exported to ONNX (and a TensorRT engine built
where ``tensorrt_rtx`` is installed) exactly as ``ultramem export`` does, into a
temporary folder. The figures are the export's own parity report: the worst max abs
error over the parity inputs, per stage, and selections that differ from the original's.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from ultramem.compiler.formats import ExportOptions
from ultramem.compiler.pipeline import compile_model, export_model
from ultramem.models.builtin import LoadedModel
from ultramem.tests.foreign.cases import CASES, ForeignCase

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def row(case: ForeignCase) -> str:
    model, example = case.build()
    metadata = {"max_tokens": case.max_tokens} if case.max_tokens else {}
    loaded = LoadedModel(model, example, case.id, metadata)
    start = time.perf_counter()
    formats = ("onnx", "tensorrt") if HAS_RTX else ("onnx",)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_model(loaded)
        manifest, report = export_model(
            loaded, Path(tmp) / "out", formats=formats, options=ExportOptions(), compiled=compiled
        )
    seconds = time.perf_counter() - start
    layers = manifest["memory_layers"]
    parts = {p for entry in layers for p in entry["fused"]}
    fused = " + ".join(p for p in ("selection", "aggregation") if p in parts) or "none"
    fused += f" ({len(layers)} lookups)" if len(layers) != 1 else ""
    errors = {}
    flipped = 0
    for stage in report.stages:
        if stage.executed:
            errors[stage.stage] = max((o.max_abs for o in stage.outputs), default=0.0)
            flipped += sum(s.differing for s in stage.selections)
    torch_err = errors.get("fused-ops", float("nan"))
    ort_err = errors.get("onnxruntime-cpu", float("nan"))
    engine = "built" if manifest.get("tensorrt", {}).get("engine_bytes") else "—"
    status = "pass" if report.passed else "FAIL"
    return (
        f"| `{case.id}` | {case.implementation} | {fused} | {torch_err:.1e} | {ort_err:.1e} "
        f"| {flipped} | {engine} | {status} | {seconds:.0f} s |"
    )


def main(ids: list[str]) -> int:
    unknown = set(ids) - {c.id for c in CASES}
    if unknown:
        print(f"unknown case ids: {sorted(unknown)}", file=sys.stderr)
        return 2
    print(
        "| case | implementation | fused | max abs, fused ops | max abs, ONNX Runtime "
        "| selections differing | TensorRT engine | parity | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        if not ids or case.id in ids:
            print(row(case), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
