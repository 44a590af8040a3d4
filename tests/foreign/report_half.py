"""Print the README's table of foreign memory layers in half precision.

    .venv/bin/python -m ultramem.tests.foreign.report_half bfloat16 [CASE_ID ...]

Each case's model and example cast to the dtype (what a bf16 or fp16 checkpoint is),
compiled and exported to ONNX as ``ultramem export`` does. The figures are the export's
own parity report: what fused, selections that differ from the model's (all near-ties
of the dtype's resolution, or after an earlier lookup's flip), and how far the fused
program and the model each are from the model's fp32 maths (relative L2 over every
output and parity input). A model whose own code cannot run in the dtype on a CPU (an
SVD in ``forward``, a float32 scatter target) is listed with the error.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from ultramem.compiler.formats import ExportOptions
from ultramem.compiler.pipeline import compile_model, export_model
from ultramem.models.builtin import LoadedModel
from ultramem.tests.foreign.cases import CASES, ForeignCase


def row(case: ForeignCase, dtype: torch.dtype) -> str:
    model, example = case.build()
    example = tuple(x.to(dtype) if x.is_floating_point() else x for x in example)
    metadata = {"max_tokens": case.max_tokens} if case.max_tokens else {}
    loaded = LoadedModel(model.to(dtype), example, case.id, metadata)
    try:
        with torch.no_grad():
            loaded.model(*example)
    except Exception as exc:
        return (
            f"| `{case.id}` | the model itself does not run: {str(exc).splitlines()[0][:90]} |||||"
        )
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_model(loaded)
        manifest, report = export_model(
            loaded, Path(tmp) / "out", formats=("onnx",), options=ExportOptions(),
            compiled=compiled,
        )  # fmt: skip
    layers = manifest["memory_layers"]
    parts = {p for entry in layers for p in entry["fused"]}
    fused = " + ".join(p for p in ("selection", "aggregation") if p in parts) or "none"
    whole = sum(len(e["fused"]) == 2 for e in layers)
    if whole < len(layers):  # a lookup left unfused: parity rolled it back, or no binding
        fused = f"{whole} of {len(layers)} lookups fused (parity rolled back the rest)"
    stages = {s.stage: s for s in report.stages}
    fused_ops = stages["fused-ops"]
    distances = fused_ops.fp32_distances()
    stage_d, model_d = distances if distances else (0.0, 0.0)
    differing = sum(s.differing for s in fused_ops.selections)
    near = sum(s.near_ties for s in fused_ops.selections)
    after = sum(s.consequential for s in fused_ops.selections)
    rows = sum(s.rows for s in fused_ops.selections)
    ort = stages["onnxruntime-cpu"]
    ort_text = (
        "not executed (no kernel)" if not ort.executed else ("pass" if ort.passed else "FAIL")
    )
    status = "pass" if report.passed else "FAIL"
    return (
        f"| `{case.id}` | {fused} | {differing}/{rows} ({near} near-ties, {after} after a "
        f"flip) | {stage_d:.3g} | {model_d:.3g} | {ort_text} | {status} |"
    )


def main(args: list[str]) -> int:
    if not args or args[0] not in ("bfloat16", "float16"):
        print("usage: report_half bfloat16|float16 [CASE_ID ...]", file=sys.stderr)
        return 2
    dtype, ids = getattr(torch, args[0]), args[1:]
    print(
        "| case | fused | selections differing | fp32 distance, fused | fp32 distance, "
        "model | ONNX Runtime CPU | parity |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        if (not ids or case.id in ids) and not case.lookalike_part and case.memory_layers:
            print(row(case, dtype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
