"""The orchestration behind ``ultramem export``, ``check`` and ``inspect``.

compile (capture → passes → proven rewrite) → each requested format's exporter
(``formats.FORMATS``) → parity of every stage → publish, manifest last. Nothing here knows
a format: the table does.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..models.builtin import LoadedModel
from .artifacts import (
    ArtifactError,
    ArtifactWriter,
    json_text,
    manifest_formats,
    read_manifest,
    verify_artifacts,
)
from .capture import DEFAULT_MAX_TOKENS, CaptureResult, capture, parity_inputs
from .formats import ExportJob, ExportOptions, ProgressFn, engine_profile, resolve
from .inputs.options import GENERATION_TASK
from .inspection import Inspection, fused_layer_table
from .loading import model_fingerprint
from .parity.compare import ParityReport, StageReport
from .parity.selections import memory_layer_names, site_plan
from .parity.stages import Stage, run_parity
from .rewrite import RewriteResult, op_counts, rewrite
from .runners import Programs, RunContext
from .runners import parity_stages as runner_stages
from .runners.torch_programs import FUSED_STAGE
from .tensorrt.package import TensorRTError, import_tensorrt, package_name

PARITY_FILE = "parity.json"


def no_progress(_: str) -> None:
    """The default progress callback: says nothing."""
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
        return fused_layer_table(self.rewrite)


def compile_model(loaded: LoadedModel, progress: ProgressFn = no_progress) -> Compiled:
    max_tokens = int(loaded.metadata.get("max_tokens", DEFAULT_MAX_TOKENS))
    spec = loaded.metadata.get("program_spec")  # a program that names its own axes
    axes = ", ".join(sorted({a.name for a in spec.axes})) if spec else "batch and tokens"
    with step(progress, f"capturing with torch.export (dynamic {axes})"):
        captured = capture(loaded.model, loaded.example_inputs, max_tokens=max_tokens, spec=spec)
    for note in captured.notes:
        progress(f"note: {note}")
    layers = memory_layer_names(captured.program.graph)
    progress(f"memory lookups found: {len(layers)} ({', '.join(layers) or 'none'})")
    with step(progress, "folding weight-only maths and fusing memory lookups"):
        rewritten = rewrite(loaded.model, captured, loaded.example_inputs)
    table = fused_layer_table(rewritten)
    for part in ("selection", "aggregation"):
        count = sum(part in entry["fused"] for entry in table)
        progress(f"fused the {part} of {count} of {len(table)} memory lookups")
    for final, reason in rewritten.fusion.details.get("merged_grids", {}).items():
        progress(f"not a lookup the ops express: {final}: {reason}")
    for final, reason in rewritten.rolled_back.items():
        progress(f"rolled back {final}: {reason}")
    for name, reason in rewritten.disabled_passes.items():
        progress(f"left out pass {name}: {reason}")
    return Compiled(loaded, captured, list(rewritten.plan.names), rewritten)


def inspect_model(loaded: LoadedModel, progress: ProgressFn = no_progress) -> Inspection:
    compiled = compile_model(loaded, progress)
    return Inspection(
        loaded.source,
        compiled.layer_table,
        compiled.rewrite.log_json(),
        op_counts(compiled.capture.program),
        op_counts(compiled.rewrite.program),
    )


def _check_plugin_mode(package: str | None, precision: str) -> int:
    """Plugin engines need a TensorRT that can build them, on a GPU: say why not before
    any work; return the build GPU's SM."""
    from ..plugins.trt_support import plugin_mode_support

    try:
        name = package_name(import_tensorrt(package))
    except TensorRTError as exc:
        raise ArtifactError(str(exc)) from None
    supported, why = plugin_mode_support(name)
    if not supported:
        raise ArtifactError(why)
    if precision != "fp32":
        raise ArtifactError(
            "--trt-mode plugin builds engines in the model's own dtype (the kernel bundle is "
            f"specialised on it), not --precision {precision}; use --trt-mode native for that"
        )
    if not torch.cuda.is_available():
        raise ArtifactError(
            f"--trt-mode plugin with {name} builds on a GPU (the plugins' kernels are picked "
            "for its architecture) and none is visible here"
        )
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def programs_of(compiled: Compiled) -> Programs:
    program = compiled.rewrite.program
    return Programs(
        compiled.loaded.model, compiled.capture.program, program, site_plan(program.graph)
    )


def parity_stages(
    compiled: Compiled,
    directory: Path,
    formats: Collection[str],
    trt_package: str | None = None,
    native_code: bool = False,
) -> list[Stage]:
    """The program as captured, as rewritten, and each of ``formats``' artifacts in
    ``directory``: every stage parity compares with the original model (the runners')."""
    context = RunContext(programs_of(compiled), directory, formats, trt_package, native_code)
    return runner_stages(context)


def run_checks(
    compiled: Compiled,
    directory: Path,
    progress: ProgressFn,
    formats: Collection[str],
    trt_package: str | None = None,
    native_code: bool = False,
    stages: list[Stage] | None = None,
) -> ParityReport:
    inputs = parity_inputs(compiled.loaded.example_inputs, compiled.capture)
    if stages is None:
        stages = parity_stages(compiled, directory, formats, trt_package, native_code)
    with step(progress, f"parity of {len(stages)} stages on {len(inputs)} inputs"):
        report = run_parity(
            compiled.loaded.model, stages, inputs, compiled.rewrite.plan, source=FUSED_STAGE
        )
    for line in report.summary_lines():
        progress(line)
    return report


class Task:
    """What a task adds to the export of its program: the forward task adds nothing.
    ``manifest_task``: the manifest's ``task`` (None: forward); ``source``: the model the
    manifest names (default: the program's own); ``add_files`` writes the task's files
    beside the formats' and returns its manifest sections; ``check`` is its parity."""

    manifest_task: str | None = None

    def source(self, loaded: LoadedModel) -> dict[str, Any]:
        return source_record(loaded)

    def add_files(self, writer: ArtifactWriter, formats: list[str]) -> dict[str, Any]:
        return {}

    def check(
        self, compiled: Compiled, folder: Path, formats: list[str], progress: ProgressFn,
        trt_package: str | None,
    ) -> Any:  # fmt: skip
        # what this export just wrote is ours: its shared library may be loaded
        return run_checks(compiled, folder, progress, formats, trt_package, True)

    def parity_summary(self, report: Any) -> dict[str, Any]:
        return parity_summary(report)


def export_model(
    loaded: LoadedModel,
    out: Path,
    progress: ProgressFn = no_progress,
    formats: tuple[str, ...] = ("onnx",),
    options: ExportOptions | None = None,
    compiled: Compiled | None = None,
    task: Task | None = None,
) -> tuple[dict[str, Any], Any]:
    """Capture, rewrite (unless ``compiled`` is given), write each format and the task's
    files, check parity; publish only when all steps ran."""
    task = task or Task()
    options = options or ExportOptions()
    chosen = resolve(formats, options)
    trt = options.trt
    if any(f.name == "tensorrt" for f in chosen) and trt.mode == "plugin":
        build_sm = _check_plugin_mode(trt.package, trt.precision)
        trt = replace(trt, sms=tuple(sorted({*trt.sms, build_sm})), build_sm=build_sm)
        options = replace(options, trt=trt)
    with ArtifactWriter(out) as writer:
        compiled = compiled or compile_model(loaded, progress)
        if any(f.name == "tensorrt" for f in chosen):
            engine_profile(options.trt, compiled.capture)  # refuse a bad range before work
        job = ExportJob(compiled.rewrite.program, compiled.capture, writer, options, progress)
        sections: dict[str, Any] = {}
        for fmt in chosen:
            with step(progress, f"writing {fmt.name} ({fmt.files})"):
                sections[fmt.name] = fmt.write(job)
        names = [f.name for f in chosen]
        task_sections = task.add_files(writer, names)
        report = task.check(compiled, writer.staging, names, progress, trt.package)
        writer.path(PARITY_FILE).write_text(json_text(report.to_json()))
        manifest = {
            **({"task": task.manifest_task} if task.manifest_task else {}),
            "source": task.source(loaded),
            **program_record(compiled),
            **task_sections,
            "formats": names,
            **sections,
            "parity": task.parity_summary(report),
        }
        manifest = writer.publish(manifest, extra_files=(PARITY_FILE,))
        progress(f"wrote {out}")
    return manifest, report


def program_record(compiled: Compiled) -> dict[str, Any]:
    """The manifest's record of a compiled program: its capture, memory layers, passes,
    op counts before and after the rewrite."""
    return {
        "capture": compiled.capture.to_json(),
        "memory_layers": compiled.layer_table,
        "passes": compiled.rewrite.log_json(),
        "ops": {
            "before": op_counts(compiled.capture.program),
            "after": op_counts(compiled.rewrite.program),
        },
    }


def source_record(loaded: LoadedModel) -> dict[str, Any]:
    """What the manifest says of the model: the MODEL and --weights to give again (both
    as the loader accepts them) and the fingerprint of the weights actually used."""
    return {
        "model": loaded.source,
        "weights": loaded.metadata.get("weights"),
        "fingerprint": model_fingerprint(loaded.model),
    }


def check_same_model(loaded: LoadedModel, manifest: dict[str, Any], directory: Path) -> None:
    """``loaded`` is the model ``directory`` was exported from, or ``ArtifactError``."""
    recorded = manifest.get("source", {})
    fingerprint = recorded.get("fingerprint")
    if fingerprint and fingerprint != model_fingerprint(loaded.model):
        weights = recorded.get("weights")
        exported = recorded.get("model", "?") + (f" --weights {weights}" if weights else "")
        raise ArtifactError(
            f"{loaded.source} is not the model {directory} was exported from (its weights "
            f"differ from {exported}'s); give that model, or export this one"
        )


def check_artifacts(
    loaded: LoadedModel,
    directory: Path,
    progress: ProgressFn = no_progress,
    native_code: bool = False,
) -> Any:
    """Re-run parity of the artifacts in ``directory`` against ``loaded`` (which must be
    the model they were exported from), as its task checks it (a ``ParityReport``, or a
    text-generation export's report). The folder is only read: ``parity.json`` stays the
    export's record, as the manifest describes it. Only the formats its manifest lists are
    checked; native code (the AOTInductor package, the kernel bundle) only with
    ``native_code``."""
    manifest = read_manifest(directory)
    verify_artifacts(directory, manifest)
    formats = manifest_formats(manifest, directory)
    check_same_model(loaded, manifest, directory)
    if manifest.get("task") == GENERATION_TASK:
        from .generation.export import check_generation  # transformers: only when asked

        return check_generation(loaded, directory, manifest, formats, progress, native_code)
    compiled = compile_model(loaded, progress)
    return run_checks(compiled, directory, progress, formats, native_code=native_code)


def parity_summary(report: ParityReport) -> dict[str, Any]:
    return {"passed": report.passed, "stages": {s.stage: _stage_summary(s) for s in report.stages}}


def _stage_summary(stage: StageReport) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "executed": stage.executed,
        "passed": stage.passed,
        "max_abs": max((c.max_abs for c in stage.outputs), default=None),
        "selections_differing": sum(c.differing for c in stage.selections),
        "selections_compared": sum(c.rows for c in stage.selections),
        "near_ties": sum(c.near_ties for c in stage.selections),
    }
    if not stage.executed:
        summary["reason"] = stage.reason
    distances = stage.fp32_distances()
    if distances is not None:  # half precision: how far from the fp32 maths
        summary["fp32_distance"], summary["model_fp32_distance"] = distances
    return summary
