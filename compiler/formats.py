"""The export formats, in one table: what each writes, what it needs, its parity stages.

``FORMATS[name]`` is a ``Format``: ``write(job)`` stages its files into the export's staging
folder (``job.writer``) and returns its section of the manifest; ``needs`` are formats whose
files it reads (written first, and published with it); ``stages(folder, ctx)`` are the
parity stages that check its files in a folder. Any subset of formats works; a new format
is one entry.

A folder is data from elsewhere: its parity stages are those of the formats its manifest
lists (never what else lies there), every file a format's file makes its runtime read
(``reads``: an ONNX model's external data, a bundle's cubins) must be listed there too, and
a stage that would load native code from it (the AOTInductor package is a shared library,
the kernel bundle's cubins are GPU code) runs only when the caller trusts the folder.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import onnx
import torch

from ..kernels import DOMAIN, DOMAIN_VERSION
from ..plugins.bundle import build_bundle
from ..plugins.metadata import bundle_files
from ..plugins.specs import specs_for_program
from . import first_line
from .aoti import export_aoti, load_aoti
from .artifacts import MANIFEST, ArtifactError, ArtifactWriter
from .inputs.errors import OptionError
from .inputs.options import (
    AOTI_FILE,
    ENGINE_FILE,
    FORMAT_NEEDS,
    KERNELS_DIR,
    ONNX_FILE,
    ExportOptions,
    TensorRTOptions,
    plan_formats,
)
from .onnx.coverage import missing_kernels
from .onnx.export import count_nodes, export_onnx
from .onnx.runner import OnnxRunner, external_data, plain_location
from .parity.plugin_kernels import STAGE as PLUGIN_STAGE
from .parity.plugin_kernels import plugin_kernels_stage
from .parity.selections import SitePlan, SiteRecord, inlined
from .parity.stages import Stage, torch_stage
from .tensorrt.build import EngineInfo, build_engine
from .tensorrt.package import TensorRTError, can_run_engine, import_tensorrt, package_name
from .tensorrt.profile import ShapeProfile
from .tensorrt.runner import EngineRunner

ProgressFn = Callable[[str], None]


@dataclass
class ExportJob:
    """What an exporter gets: the compiled model, where to stage files, the options."""

    program: torch.export.ExportedProgram  # the rewritten program
    capture: Any  # CaptureResult: axis names for ONNX
    writer: ArtifactWriter
    options: ExportOptions
    progress: ProgressFn


@dataclass(frozen=True)
class StageContext:
    """What parity stages of a folder's artifacts need besides the folder."""

    program: torch.export.ExportedProgram  # the rewritten program (plugin-kernels)
    plan: SitePlan  # its lookups' sites: every artifact holds the rewritten program
    trt_package: str | None = None
    native_code: bool = False  # load shared libraries from the folder (trusted, or ours)


NATIVE_CODE_FLAG = "--allow-native-code"


@dataclass(frozen=True)
class Format:
    name: str
    files: str  # for the help text and README
    write: Callable[[ExportJob], dict[str, Any]]
    stages: Callable[[Path, StageContext], list[Stage]]
    needs: tuple[str, ...] = ()
    stage: str = ""  # its parity stage's name, for a failure to load it (default: name)
    # (what, file name relative to its own folder) of every other file loading the
    # format's marker file (``FORMAT_MARKERS``) reads; ``artifacts.manifest_formats``
    # holds each to the manifest's list
    reads: Callable[[Path], list[tuple[str, str]]] = lambda _: []


def native_code_stages(
    ctx: StageContext, stage: str, path: Path, what: str, load: Callable[[], list[Stage]]
) -> list[Stage]:
    """``load()``'s stages where the caller trusts the folder (or it is an export's own);
    else one stage, not executed, naming the opt-in: loading ``path`` runs its code."""
    if not ctx.native_code:
        return [Stage(stage, None, native_code_refusal(path, what))]
    return load()


def native_code_refusal(path: Path, what: str = "is a shared library") -> str:
    return f"{path.name} {what}; loading it runs its code: {NATIVE_CODE_FLAG}"


# ---- onnx ------------------------------------------------------------------------------


def _write_onnx(job: ExportJob) -> dict[str, Any]:
    form = job.options.onnx_form
    files = export_onnx(
        job.capture, job.writer.path(ONNX_FILE), program=job.program,
        opset=job.options.opset, form=form,
    )  # fmt: skip
    for f in files:
        job.writer.add(f.name, "onnx" if f.name == ONNX_FILE else "onnx-external-data")
    model = onnx.load(str(job.writer.path(ONNX_FILE)), load_external_data=False)
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "form": form,
        "domain": {"name": DOMAIN, "version": DOMAIN_VERSION},
        "nodes": len(model.graph.node),
        "op_counts": count_nodes(model),
        "functions": [f"{f.domain}::{f.name}" for f in model.functions],
    }


def onnx_stage(path: Path, provider: str = "CPUExecutionProvider") -> Stage:
    name = "onnxruntime-cpu" if provider == "CPUExecutionProvider" else "onnxruntime-cuda"
    # a provider without a kernel for an operator in the file's dtype (the CPU provider
    # and bfloat16 TopK): this runtime cannot run it, which is no verdict on the file
    missing = missing_kernels(onnx.load(str(path), load_external_data=False), provider)
    if missing:
        return Stage(name, None, f"not executed: {provider} has no kernel for {', '.join(missing)}")
    runner = OnnxRunner(path, providers=[provider])

    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> Any:
        return runner(inputs)

    return Stage(name, run)


def onnx_cuda_stage(path: Path) -> Stage:
    """ONNX Runtime's CUDA provider, where onnxruntime-gpu and a GPU are present."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Stage("onnxruntime-cuda", None, "not executed: onnxruntime-gpu is not installed")
    if not torch.cuda.is_available():
        return Stage("onnxruntime-cuda", None, "not executed: no CUDA device")
    return onnx_stage(path, "CUDAExecutionProvider")


def _onnx_reads(path: Path) -> list[tuple[str, str]]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a file that does not parse reads nothing: its stage fails to load it
        return []
    return [(f"tensor {name!r}", location) for name, location in external_data(model)]


def _onnx_stages(folder: Path, ctx: StageContext) -> list[Stage]:
    stages = [onnx_stage(folder / ONNX_FILE), onnx_cuda_stage(folder / ONNX_FILE)]
    model = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
    portable = not any(node.domain == DOMAIN for node in model.graph.node)
    for stage in stages:  # the portable form ranks each lookup with three TopK nodes
        stage.plan = inlined(ctx.plan) if portable else ctx.plan
    return stages


# ---- kernels ---------------------------------------------------------------------------


def _write_kernels(job: ExportJob) -> dict[str, Any]:
    specs = specs_for_program(job.program.graph)
    if not specs:
        raise ArtifactError("--format kernels: no memory layer was fused, so no kernel to bundle")
    sms = job.options.trt.sms
    manifest = build_bundle(specs, sms, job.writer.path(KERNELS_DIR))
    for path in sorted(job.writer.path(KERNELS_DIR).iterdir()):
        job.writer.add(f"{KERNELS_DIR}/{path.name}", "kernel-bundle")
    return {"sms": list(sms), "kernels": sorted({k.name for k in manifest.kernels})}


KERNELS_ARE = "holds GPU kernels (cubins)"


def _kernel_stages(folder: Path, ctx: StageContext) -> list[Stage]:
    bundle = folder / KERNELS_DIR
    return native_code_stages(
        ctx, PLUGIN_STAGE, bundle, KERNELS_ARE, lambda: [plugin_kernels_stage(ctx.program, bundle)]
    )


def _kernel_reads(path: Path) -> list[tuple[str, str]]:
    return [(f"kernel {kernel}", name) for kernel, name in bundle_files(path)]


# ---- aoti ------------------------------------------------------------------------------


def _write_aoti(job: ExportJob) -> dict[str, Any]:
    export_aoti(job.program, job.writer.path(AOTI_FILE))
    job.writer.add(AOTI_FILE, "aoti")
    return {"file": AOTI_FILE}


def _aoti_stages(folder: Path, ctx: StageContext) -> list[Stage]:
    path = folder / AOTI_FILE
    return native_code_stages(
        ctx, "aotinductor", path, "is a shared library",
        lambda: [torch_stage("aotinductor", load_aoti(path))],
    )  # fmt: skip


# ---- tensorrt --------------------------------------------------------------------------


def _write_tensorrt(job: ExportJob) -> dict[str, Any]:
    trt = job.options.trt
    if trt.mode == "plugin":
        from ..plugins.metadata import load_bundle
        from ..plugins.trt_plugin import register_plugins

        register_plugins(load_bundle(job.writer.path(KERNELS_DIR)), trt.build_sm or 0)
    info: EngineInfo = build_engine(
        job.writer.path(ONNX_FILE),
        job.writer.path(ENGINE_FILE),
        profile=engine_profile(trt, job.capture),
        precision=trt.precision,  # type: ignore[arg-type]
        package=trt.package,
        lookup=trt.mode,
    )
    job.writer.add(ENGINE_FILE, "tensorrt")
    job.progress(f"engine: {info.engine_bytes} bytes in {info.build_seconds} s")
    summary = info.to_json()
    summary["engine_path"] = ENGINE_FILE
    summary["layer_counts"] = dict(info.layer_counts())
    summary["executed"] = False  # building proves nothing ran; check reports execution
    return summary


def engine_profile(options: TensorRTOptions, capture: Any) -> ShapeProfile:
    """CLI ranges where given; else tokens up to what the capture admits (a position table
    ends somewhere), batch 1..8."""
    tokens_axis = capture.axis(0, "tokens")
    admitted = tokens_axis.max if tokens_axis is not None and tokens_axis.max else None
    high = min(admitted or 256, 256)
    default_tokens = f"1,{min(64, high)},{high}"
    try:
        profile = ShapeProfile.parse(
            options.profile_batch, options.profile_tokens or default_tokens
        )
    except ValueError as exc:
        raise OptionError(f"engine profile: {exc}") from None
    for name, given in (("tokens", options.profile_tokens), ("batch", options.profile_batch)):
        axis = capture.axis(0, name)
        if axis is None or given is None:
            continue
        low, high_admitted = axis.min or 1, axis.max  # None: no upper bound
        low_p, _, high_p = getattr(profile, name)
        if low_p < low or (high_admitted is not None and high_p > high_admitted):
            admitted = f"{low}..{high_admitted if high_admitted is not None else 'any'}"
            raise OptionError(f"--profile-{name} {given}: the capture admits {name} {admitted}")
    return profile


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


def _tensorrt_stages(folder: Path, ctx: StageContext) -> list[Stage]:
    return [engine_stage(folder / ENGINE_FILE, ctx.trt_package)]


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "onnx",
            ONNX_FILE,
            _write_onnx,
            _onnx_stages,
            stage="onnxruntime-cpu",
            reads=_onnx_reads,
        ),
        Format(
            "kernels",
            f"{KERNELS_DIR}/",
            _write_kernels,
            _kernel_stages,
            stage=PLUGIN_STAGE,
            reads=_kernel_reads,
        ),
        Format("aoti", AOTI_FILE, _write_aoti, _aoti_stages, stage="aotinductor"),
        Format("tensorrt", ENGINE_FILE, _write_tensorrt, _tensorrt_stages, needs=("onnx",)),
    )
}
if tuple(FORMATS) != tuple(FORMAT_NEEDS) or any(
    FORMATS[name].needs != needs for name, needs in FORMAT_NEEDS.items()
):
    raise ImportError("compiler/formats.py and options.FORMAT_NEEDS disagree on the formats")


def resolve(formats: tuple[str, ...], options: ExportOptions) -> list[Format]:
    """The formats to write, each after those it needs (``options.plan_formats``: every
    option checked first, so nothing is silently ignored)."""
    return [FORMATS[name] for name in plan_formats(formats, options)]


def check_reads(folder: Path, markers: dict[str, list[str]], listed: Collection[Any]) -> None:
    """Every file that each format's file in ``markers`` (its paths in ``folder``) makes
    its runtime read is among ``listed`` (the manifest's artifacts, which
    ``verify_artifacts`` hashed), or ``ArtifactError`` naming what reads which file."""
    hashed = {PurePosixPath(p) for p in listed if isinstance(p, str)}
    for fmt, paths in markers.items():
        for marker in paths:
            for what, ref in FORMATS[fmt].reads(folder / marker):
                inside = isinstance(ref, str) and plain_location(ref)
                if not inside or PurePosixPath(marker).parent / ref not in hashed:
                    raise ArtifactError(
                        f"{folder / marker}: {what} reads {ref!r}, which is not a file the "
                        f"folder's {MANIFEST} lists (and hashes); export again"
                    )


def folder_stages(folder: Path, ctx: StageContext, formats: Collection[str]) -> list[Stage]:
    """The parity stages of ``formats`` (those the folder's manifest lists) in ``folder``."""
    stages = []
    for fmt in FORMATS.values():
        if fmt.name in formats:
            try:
                stages += fmt.stages(folder, ctx)
            except ArtifactError:
                raise  # a file changed since it was checked: bad input, not a failed stage
            except Exception as exc:  # an artifact its runtime cannot load: that stage fails
                stages.append(_failing_stage(fmt, exc))
    for stage in stages:
        stage.plan = stage.plan or ctx.plan
    return stages


def _failing_stage(fmt: Format, exc: Exception) -> Stage:
    text = first_line(exc, 300)

    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> Any:
        raise RuntimeError(f"cannot load the {fmt.name} artifact: {type(exc).__name__}: {text}")

    return Stage(fmt.stage or fmt.name, run)
