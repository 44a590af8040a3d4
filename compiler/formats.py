"""The export formats, in one table: what each writes, what it needs, what it reads.

``FORMATS[name]`` is a ``Format``: ``write(job)`` stages its files into the export's staging
folder (``job.writer``) and returns its section of the manifest; ``needs`` are formats whose
files it reads (written first, and published with it). Any subset of formats works. What
runs a format's files (parity, bench, generation) is its runner (``compiler/runners``).

A folder is data from elsewhere: only the formats its manifest lists run (never what else
lies there), and every file a format's file makes its runtime read (``reads``: an ONNX
model's external data, a bundle's cubins) must be listed there too.
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
from .aoti import export_aoti
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
from .onnx.export import count_nodes, export_onnx
from .onnx.runner import external_data, plain_location
from .tensorrt.build import EngineInfo, build_engine
from .tensorrt.profile import ShapeProfile

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
class Format:
    name: str
    files: str  # for the help text and README
    write: Callable[[ExportJob], dict[str, Any]]
    needs: tuple[str, ...] = ()
    # (what, file name relative to its own folder) of every other file loading the
    # format's marker file (``FORMAT_MARKERS``) reads; ``artifacts.manifest_formats``
    # holds each to the manifest's list
    reads: Callable[[Path], list[tuple[str, str]]] = lambda _: []


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


def _onnx_reads(path: Path) -> list[tuple[str, str]]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a file that does not parse reads nothing: its stage fails to load it
        return []
    return [(f"tensor {name!r}", location) for name, location in external_data(model)]


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


def _kernel_reads(path: Path) -> list[tuple[str, str]]:
    return [(f"kernel {kernel}", name) for kernel, name in bundle_files(path)]


# ---- aoti ------------------------------------------------------------------------------


def _write_aoti(job: ExportJob) -> dict[str, Any]:
    export_aoti(job.program, job.writer.path(AOTI_FILE))
    job.writer.add(AOTI_FILE, "aoti")
    return {"file": AOTI_FILE}


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


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ONNX_FILE, _write_onnx, reads=_onnx_reads),
        Format("kernels", f"{KERNELS_DIR}/", _write_kernels, reads=_kernel_reads),
        Format("aoti", AOTI_FILE, _write_aoti),
        Format("tensorrt", ENGINE_FILE, _write_tensorrt, needs=("onnx",)),
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
