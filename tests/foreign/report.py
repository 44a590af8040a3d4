"""Print the README's table of foreign memory layers: what fused and the parity figures.

    .venv/bin/python -m ultramem.tests.foreign.report [--speed] [CASE_ID ...] > /tmp/foreign.md

For each case: the model is compiled and exported to ONNX (and a TensorRT engine built
where ``tensorrt_rtx`` is installed) exactly as ``ultramem export`` does, into a
temporary folder. The figures are the export's own parity report: the worst max abs
error over the parity inputs, per stage, and selections that differ from the original's.

``--speed`` also exports the AOTInductor package and times ONNX Runtime and it against
eager at one token (batch 1; the example's sizes where the capture pinned them), as
``ultramem bench`` does: parity on the bench's inputs first, then interleaved rounds, the
same thread count for every backend. A speed pass that misses a weight shows there.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from ultramem.compiler.bench.run import make_backends, run_bench
from ultramem.compiler.formats import ExportOptions
from ultramem.compiler.pipeline import Compiled, compile_model, export_model
from ultramem.models.builtin import LoadedModel
from ultramem.tests.foreign.cases import CASES, ForeignCase

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


SPEED_BACKENDS = ("eager", "onnxruntime-cpu", "aotinductor")
SPEED_BUDGET_S = 2.0
SPEED_THREADS = 2


def speedups(compiled: Compiled, folder: Path, formats: tuple[str, ...]) -> list[str]:
    """ONNX Runtime's and AOTInductor's p50 speed-up over eager at one token, or why not."""
    batch_axis, token_axis = compiled.capture.axis(0, "batch"), compiled.capture.axis(0, "tokens")
    first = next(x for x in compiled.loaded.example_inputs if isinstance(x, torch.Tensor))
    batch = 1 if batch_axis is None or batch_axis.dynamic else int(first.shape[0])
    tokens = 1 if token_axis is None or token_axis.dynamic else int(first.shape[1])
    backends = make_backends(
        compiled, folder, list(SPEED_BACKENDS), formats, native_code=True, threads=SPEED_THREADS
    )
    report = run_bench(
        compiled, backends, [tokens], batch, SPEED_BUDGET_S, lambda _: None, SPEED_THREADS
    )
    by_name = {b["name"]: b for b in report["backends"]}
    cells = []
    for name in SPEED_BACKENDS[1:]:
        entry = by_name[name]
        first = (entry["results"] or [{}])[0]
        ratio = first.get("speedup_vs_eager")
        cells.append(
            f"{ratio:.2f}×" if ratio is not None else first.get("status") or entry["reason"]
        )
    if tokens != 1 or batch != 1:
        cells = [f"{c} (at {batch}×{tokens})" for c in cells]
    return cells


def row(case: ForeignCase, speed: bool = False) -> str:
    model, example = case.build()
    metadata = {"max_tokens": case.max_tokens} if case.max_tokens else {}
    loaded = LoadedModel(model, example, case.id, metadata)
    start = time.perf_counter()
    formats = ("onnx", "tensorrt") if HAS_RTX else ("onnx",)
    formats += ("aoti",) if speed else ()
    timed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_model(loaded)
        manifest, report = export_model(
            loaded, Path(tmp) / "out", formats=formats, options=ExportOptions(), compiled=compiled
        )
        seconds = time.perf_counter() - start
        if speed:
            timed = speedups(compiled, Path(tmp) / "out", formats)
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
    speed_cells = "".join(f" {c} |" for c in timed)
    return (
        f"| `{case.id}` | {case.implementation} | {fused} | {torch_err:.1e} | {ort_err:.1e} "
        f"| {flipped} | {engine} | {status} | {seconds:.0f} s |{speed_cells}"
    )


def main(args: list[str]) -> int:
    speed = "--speed" in args
    ids = [a for a in args if a != "--speed"]
    unknown = set(ids) - {c.id for c in CASES}
    if unknown:
        print(f"unknown case ids: {sorted(unknown)}", file=sys.stderr)
        return 2
    extra = " ONNX Runtime × eager, 1 token | AOTInductor × eager, 1 token |" if speed else ""
    print(
        "| case | implementation | fused | max abs, fused ops | max abs, ONNX Runtime "
        f"| selections differing | TensorRT engine | parity | time |{extra}"
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if speed else ""))
    for case in CASES:
        if not ids or case.id in ids:
            print(row(case, speed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
