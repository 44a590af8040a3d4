"""The orchestration behind ``ultramem export`` and ``ultramem check``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch

from ultramem.compiler.artifacts import (
    ArtifactError,
    ArtifactWriter,
    read_manifest,
    verify_artifacts,
)
from ultramem.compiler.capture import DEFAULT_MAX_TOKENS, CaptureResult, capture
from ultramem.compiler.export_aoti import AOTI_FILE, export_aoti, load_aoti
from ultramem.compiler.export_onnx import count_nodes, export_onnx
from ultramem.compiler.export_tensorrt import (
    EngineInfo,
    ShapeProfile,
    TensorRTError,
    build_engine,
    can_run_engine,
    import_tensorrt,
    package_name,
)
from ultramem.compiler.inspection import Inspection, fused_layer_table
from ultramem.compiler.onnx_ops import DOMAIN as ONNX_DOMAIN
from ultramem.compiler.onnx_ops import VERSION as ONNX_DOMAIN_VERSION
from ultramem.compiler.parity import ParityReport
from ultramem.compiler.plugin_stage import plugin_kernels_stage
from ultramem.compiler.rewrite import RewriteResult, op_counts, rewrite
from ultramem.compiler.run_onnx import OnnxRunner
from ultramem.compiler.run_tensorrt import EngineRunner
from ultramem.compiler.selections import SiteRecord, memory_layer_names
from ultramem.compiler.stages import Stage, parity_inputs, run_parity, torch_stage
from ultramem.models.builtin import LoadedModel
from ultramem.plugins.bundle import DEFAULT_SMS, build_bundle, specs_for_layers
from ultramem.plugins.metadata import load_bundle
from ultramem.plugins.trt_plugin import register_plugins
from ultramem.plugins.trt_support import plugin_mode_support

ProgressFn = Callable[[str], None]
PARITY_FILE = "parity.json"
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"


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


def onnx_stage(path: Path, provider: str = "CPUExecutionProvider") -> Stage:
    runner = OnnxRunner(path, providers=[provider])

    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> Any:
        return runner(inputs)

    name = "onnxruntime-cpu" if provider == "CPUExecutionProvider" else "onnxruntime-cuda"
    return Stage(name, run)


def onnx_cuda_stage(path: Path) -> Stage:
    """ONNX Runtime's CUDA provider, where onnxruntime-gpu and a GPU are present."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Stage("onnxruntime-cuda", None, "not executed: onnxruntime-gpu is not installed")
    if not torch.cuda.is_available():
        return Stage("onnxruntime-cuda", None, "not executed: no CUDA device")
    return onnx_stage(path, "CUDAExecutionProvider")


def artifact_stages(directory: Path, trt_package: str | None = None) -> list[Stage]:
    """One parity stage per artifact found in ``directory``."""
    stages = []
    if (directory / ONNX_FILE).is_file():
        stages += [onnx_stage(directory / ONNX_FILE), onnx_cuda_stage(directory / ONNX_FILE)]
    if (directory / AOTI_FILE).is_file():
        stages.append(torch_stage("aotinductor", load_aoti(directory / AOTI_FILE)))
    if (directory / ENGINE_FILE).is_file():
        stages.append(engine_stage(directory / ENGINE_FILE, trt_package))
    return stages


def engine_stage(path: Path, package: str | None) -> Stage:
    try:
        trt = import_tensorrt(package)
    except TensorRTError as exc:
        return Stage("tensorrt", None, f"not executed: {exc}")
    runnable, why = can_run_engine(package_name(trt))
    if not runnable:
        return Stage("tensorrt", None, f"not executed: {why}")
    runner = EngineRunner(path, package)
    return Stage("tensorrt", lambda inputs, _: (runner(*inputs), []))


def _check_plugin_mode(package: str | None, precision: str) -> None:
    """Plugin engines need a TensorRT that can build them; say why not before any work."""
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


def _build_sm() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _write_kernel_bundle(compiled: Compiled, writer: ArtifactWriter, sms: tuple[int, ...]) -> None:
    layers = [
        (entry["binding"], getattr(torch, entry["binding"]["dtype"]), entry["binding"]["value_dim"])
        for entry in compiled.layer_table
        if entry["fused"]
    ]
    if not layers:
        raise ArtifactError("--format kernels: no memory layer was fused, so no kernel to bundle")
    build_bundle(specs_for_layers(layers), sms, writer.path(KERNELS_DIR))
    for path in sorted(writer.path(KERNELS_DIR).iterdir()):
        writer.add(f"{KERNELS_DIR}/{path.name}", "kernel-bundle")


def _engine_summary(info: EngineInfo) -> dict[str, Any]:
    summary = info.to_json()
    summary["engine_path"] = ENGINE_FILE
    summary["layer_counts"] = dict(info.layer_counts())
    summary["executed"] = False  # building proves nothing ran; check reports execution
    return summary


def run_checks(
    compiled: Compiled, directory: Path, progress: ProgressFn, trt_package: str | None = None
) -> ParityReport:
    inputs = parity_inputs(compiled.loaded.example_inputs, compiled.capture)
    stages = [
        torch_stage("torch.export", compiled.capture.program.module()),
        torch_stage("fused-ops", compiled.rewrite.program.module()),
        *artifact_stages(directory, trt_package),
    ]
    if (directory / KERNELS_DIR / "bundle.json").is_file():
        stages.append(plugin_kernels_stage(compiled.rewrite.program, directory / KERNELS_DIR))
    with step(progress, f"parity of {len(stages)} stages on {len(inputs)} inputs"):
        report = run_parity(compiled.loaded.model, stages, inputs, compiled.layers)
    for line in report.summary_lines():
        progress(line)
    return report


FORMATS = ("onnx", "tensorrt", "kernels", "aoti")
KERNELS_DIR = "kernels"


@dataclass(frozen=True)
class TensorRTOptions:
    mode: str = "native"
    package: str | None = None
    precision: str = "fp32"
    profile_batch: str | None = None
    profile_tokens: str | None = None
    sms: tuple[int, ...] = DEFAULT_SMS


def _trt_profile(options: TensorRTOptions, capture: CaptureResult) -> ShapeProfile:
    """CLI ranges where given; else tokens up to what the capture admits (a position table
    ends somewhere), batch 1..8."""
    tokens_axis = capture.axis(0, "tokens")
    high = tokens_axis.max if tokens_axis is not None and tokens_axis.max else 256
    high = min(high, 256)
    default_tokens = f"1,{min(64, high)},{high}"
    return ShapeProfile.parse(options.profile_batch, options.profile_tokens or default_tokens)


def export_model(
    loaded: LoadedModel,
    out: Path,
    progress: ProgressFn = _quiet,
    opset: int = 20,
    formats: tuple[str, ...] = ("onnx",),
    trt: TensorRTOptions | None = None,
    onnx_form: str = "custom",
) -> tuple[dict[str, Any], ParityReport]:
    """Capture, rewrite, write each format, check parity; publish only when all steps ran."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ArtifactError(
            f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}"
        )
    trt = trt or TensorRTOptions()
    plugin_mode = "tensorrt" in formats and trt.mode == "plugin"
    if plugin_mode:
        _check_plugin_mode(trt.package, trt.precision)
        build_sm = _build_sm()
        trt = replace(trt, sms=tuple(sorted({*trt.sms, build_sm})))
    with ArtifactWriter(out) as writer:
        compiled = compile_model(loaded, progress)
        engine_info = None
        if "onnx" in formats or "tensorrt" in formats:
            with step(progress, f"exporting ONNX ({onnx_form} form)"):
                files = export_onnx(
                    compiled.capture,
                    writer.path(ONNX_FILE),
                    program=compiled.rewrite.program,
                    opset=opset,
                    form=onnx_form,
                )
            for f in files:
                writer.add(f.name, "onnx" if f.name == ONNX_FILE else "onnx-external-data")
        if "kernels" in formats or plugin_mode:
            with step(progress, f"compiling the kernel bundle for sm {trt.sms}"):
                _write_kernel_bundle(compiled, writer, trt.sms)
        if plugin_mode:
            register_plugins(load_bundle(writer.path(KERNELS_DIR)), build_sm)
        if "tensorrt" in formats:
            with step(progress, f"building a TensorRT engine ({trt.mode}, {trt.precision})"):
                engine_info = build_engine(
                    writer.path(ONNX_FILE),
                    writer.path(ENGINE_FILE),
                    profile=_trt_profile(trt, compiled.capture),
                    precision=trt.precision,  # type: ignore[arg-type]
                    package=trt.package,
                    lookup=trt.mode,
                )
            writer.add(ENGINE_FILE, "tensorrt")
            progress(f"engine: {engine_info.engine_bytes} bytes in {engine_info.build_seconds} s")
        if "aoti" in formats:
            with step(progress, "compiling the AOTInductor package"):
                export_aoti(compiled.rewrite.program, writer.path(AOTI_FILE))
            writer.add(AOTI_FILE, "aoti")
        report = run_checks(compiled, writer.staging, progress, trt.package)
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
                "form": onnx_form,
                "domain": {"name": ONNX_DOMAIN, "version": ONNX_DOMAIN_VERSION},
                "nodes": len(model_proto.graph.node),
                "op_counts": count_nodes(model_proto),
                "functions": [f"{f.domain}::{f.name}:{f.overload}" for f in model_proto.functions],
            },
            "parity": _parity_summary(report),
        }
        if engine_info is not None:
            manifest["tensorrt"] = _engine_summary(engine_info)
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
