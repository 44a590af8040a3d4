"""The orchestration behind ``ultramem export`` and ``ultramem check``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ultramem.compiler.artifacts import (
    ArtifactError,
    ArtifactWriter,
    read_manifest,
    verify_artifacts,
)
from ultramem.compiler.capture import DEFAULT_MAX_TOKENS, CaptureResult, capture
from ultramem.compiler.export_aoti import AOTI_FILE, export_aoti, load_aoti
from ultramem.compiler.export_onnx import count_nodes, export_onnx
from ultramem.compiler.inspection import Inspection, fused_layer_table
from ultramem.compiler.parity import ParityReport
from ultramem.compiler.rewrite import RewriteResult, op_counts, rewrite
from ultramem.compiler.run_onnx import OnnxRunner
from ultramem.compiler.selections import SiteRecord, TopkRecord, memory_layer_names
from ultramem.compiler.stages import Stage, parity_inputs, run_parity, torch_stage
from ultramem.models.builtin import LoadedModel

ProgressFn = Callable[[str], None]
PARITY_FILE = "parity.json"
ONNX_FILE = "model.onnx"


def _quiet(_: str) -> None:
    pass


@contextmanager
def step(progress: ProgressFn, what: str) -> Iterator[None]:
    start = time.perf_counter()
    progress(f"{what} ...")
    yield
    progress(f"{what} done ({time.perf_counter() - start:.1f} s)")


@dataclass
class Compiled:
    loaded: LoadedModel
    capture: CaptureResult
    layers: list[str]
    rewrite: RewriteResult

    @property
    def layer_table(self) -> list[dict[str, Any]]:
        return fused_layer_table(self.layers, self.rewrite)


def compile_model(loaded: LoadedModel, progress: ProgressFn = _quiet) -> Compiled:
    max_tokens = int(loaded.metadata.get("max_tokens", DEFAULT_MAX_TOKENS))
    with step(progress, "capturing with torch.export (dynamic batch and tokens)"):
        captured = capture(loaded.model, loaded.example_inputs, max_tokens=max_tokens)
    for note in captured.notes:
        progress(f"note: {note}")
    layers = memory_layer_names(captured.program.graph)
    progress(f"memory layers found: {len(layers)} ({', '.join(layers) or 'none'})")
    with step(progress, "folding weight-only maths and fusing memory lookups"):
        rewritten = rewrite(loaded.model, captured, loaded.example_inputs, layers)
    progress(f"fused {len(rewritten.fused_layers)} of {len(layers)} memory layers")
    for final, reason in rewritten.rolled_back.items():
        progress(f"rolled back {final}: {reason}")
    return Compiled(loaded, captured, layers, rewritten)


def inspect_model(loaded: LoadedModel, progress: ProgressFn = _quiet) -> Inspection:
    compiled = compile_model(loaded, progress)
    return Inspection(
        loaded.source,
        compiled.layer_table,
        compiled.rewrite.log_json(),
        op_counts(compiled.capture.program),
        op_counts(compiled.rewrite.program),
    )


def onnx_stage(path: Path) -> Stage:
    runner = OnnxRunner(path)

    def run(inputs: tuple[Any, ...], ref_records: list[SiteRecord]) -> Any:
        sizes = [r.input_size for r in ref_records if isinstance(r, TopkRecord)]
        return runner(inputs, sizes)

    return Stage("onnxruntime-cpu", run)


def artifact_stages(directory: Path) -> list[Stage]:
    """One parity stage per artifact found in ``directory``."""
    stages = []
    if (directory / ONNX_FILE).is_file():
        stages.append(onnx_stage(directory / ONNX_FILE))
    if (directory / AOTI_FILE).is_file():
        stages.append(torch_stage("aotinductor", load_aoti(directory / AOTI_FILE)))
    return stages


def run_checks(compiled: Compiled, directory: Path, progress: ProgressFn) -> ParityReport:
    inputs = parity_inputs(compiled.loaded.example_inputs, compiled.capture)
    stages = [
        torch_stage("torch.export", compiled.capture.program.module()),
        torch_stage("fused-ops", compiled.rewrite.program.module()),
        *artifact_stages(directory),
    ]
    with step(progress, f"parity of {len(stages)} stages on {len(inputs)} inputs"):
        report = run_parity(compiled.loaded.model, stages, inputs, compiled.layers)
    for line in report.summary_lines():
        progress(line)
    return report


FORMATS = ("onnx", "aoti")


def export_model(
    loaded: LoadedModel,
    out: Path,
    progress: ProgressFn = _quiet,
    opset: int = 20,
    formats: tuple[str, ...] = ("onnx",),
) -> tuple[dict[str, Any], ParityReport]:
    """Capture, rewrite, write each format, check parity; publish only when all steps ran."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ArtifactError(
            f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}"
        )
    with ArtifactWriter(out) as writer:
        compiled = compile_model(loaded, progress)
        if "onnx" in formats:
            with step(progress, "exporting ONNX"):
                files = export_onnx(compiled.capture, writer.path(ONNX_FILE), opset=opset)
            for f in files:
                writer.add(f.name, "onnx" if f.name == ONNX_FILE else "onnx-external-data")
        if "aoti" in formats:
            with step(progress, "compiling the AOTInductor package"):
                export_aoti(compiled.rewrite.program, writer.path(AOTI_FILE))
            writer.add(AOTI_FILE, "aoti")
        report = run_checks(compiled, writer.staging, progress)
        writer.path(PARITY_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        model_proto = onnx.load(str(writer.path(ONNX_FILE)), load_external_data=False)
        manifest = {
            "source": {"model": loaded.source},
            "capture": compiled.capture.to_json(),
            "memory_layers": compiled.layer_table,
            "passes": compiled.rewrite.log_json(),
            "ops": {
                "before": op_counts(compiled.capture.program),
                "after": op_counts(compiled.rewrite.program),
            },
            "onnx": {
                "opset": opset,
                "nodes": len(model_proto.graph.node),
                "op_counts": count_nodes(model_proto),
            },
            "parity": _parity_summary(report),
        }
        manifest = writer.publish(manifest, extra_files=(PARITY_FILE,))
        progress(f"wrote {out}")
    return manifest, report


def check_artifacts(
    loaded: LoadedModel, directory: Path, progress: ProgressFn = _quiet
) -> ParityReport:
    """Re-run parity of the artifacts in ``directory`` and write ``parity.json`` there."""
    manifest = read_manifest(directory)
    verify_artifacts(directory, manifest)
    compiled = compile_model(loaded, progress)
    report = run_checks(compiled, directory, progress)
    tmp = directory / f".{PARITY_FILE}.tmp"
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    tmp.replace(directory / PARITY_FILE)
    return report


def _parity_summary(report: ParityReport) -> dict[str, Any]:
    return {
        "passed": report.passed,
        "stages": {
            s.stage: {
                "executed": s.executed,
                "passed": s.passed,
                "max_abs": max((c.max_abs for c in s.outputs), default=None),
                "selections_differing": sum(c.differing for c in s.selections),
                "selections_compared": sum(c.rows for c in s.selections),
            }
            for s in report.stages
        },
    }
