"""Parity stage ``plugin-kernels``: the rewritten program with its fused ops run by the
kernel bundle's ahead-of-time kernels, launched as a TensorRT plugin's enqueue would
(``plugins/launcher.py``: CUDA driver API, raw pointers, the bundle's metadata).

Every ``ultramem::retrieve`` / ``ultramem::aggregate`` call is routed to the bundled
kernel of its specialisation (the name ``plugins/bundle.py`` gives it); everything else
runs as usual. The launch needs a CUDA device: elsewhere the stage reports itself not
executed. The routing and the naming are the same code with any kernel runner, which is
how the CPU tests check them (``BundleRouter`` takes the runner).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from ultramem.compiler.selections import SiteRecorder, run_recording_sites
from ultramem.compiler.stages import Stage, tensor_leaves
from ultramem.plugins.bundle import aggregate_spec, retrieve_spec
from ultramem.plugins.metadata import BundleManifest, load_bundle

STAGE = "plugin-kernels"
RETRIEVE_OP = torch.ops.ultramem.retrieve.default
AGGREGATE_OP = torch.ops.ultramem.aggregate.default

KernelRunner = Callable[[str, str, tuple[Any, ...]], Any]
"""(op, bundled kernel name, the op's arguments) -> the op's outputs."""


def _all_arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Every argument of the op call in schema order, defaults filled in."""
    out = list(args)
    for spec in func._schema.arguments[len(args) :]:
        default = spec.default_value if spec.has_default_value() else None
        out.append(kwargs.get(spec.name, default))
    return tuple(out)


def retrieve_kernel_name(args: tuple[Any, ...]) -> str:
    """The bundled kernel for a ``retrieve`` call (all arguments, in schema order)."""
    row_scores, _, _, _, cores, topm, topk, activation = args
    _, heads, n, rank = row_scores.shape
    return _retrieve_name(row_scores.dtype, heads, n, rank, cores.shape[0], topm, topk, activation)


def aggregate_kernel_name(args: tuple[Any, ...]) -> str:
    """The bundled kernel for an ``aggregate`` call (all arguments, in schema order)."""
    values, scores, _, slot_map, expansion, mapping, pooling, row_offset = args
    _, heads, topk, cores = scores.shape
    return _aggregate_name(
        values.dtype,
        heads,
        topk,
        cores,
        values.shape[1],
        expansion,
        mapping,
        pooling,
        has_map=slot_map is not None,
        row_offset=row_offset,
    )


# a spec is built (and its grid checked) once per specialisation, not once per op call
@functools.cache
def _retrieve_name(*key: Any) -> str:
    return retrieve_spec(*key).name


@functools.cache
def _aggregate_name(*key: Any, has_map: bool, row_offset: int) -> str:
    return aggregate_spec(*key, has_map=has_map, row_offset=row_offset).name


class BundleRouter(SiteRecorder):
    """Records sites like any stage, and runs each fused op with ``runner`` instead."""

    def __init__(self, runner: KernelRunner) -> None:
        super().__init__()
        self.runner = runner

    def run_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func not in (RETRIEVE_OP, AGGREGATE_OP):
            return func(*args, **kwargs)
        args = _all_arguments(func, args, kwargs)
        if func is RETRIEVE_OP:
            return self.runner("retrieve", retrieve_kernel_name(args), args)
        return self.runner("aggregate", aggregate_kernel_name(args), args)


def launcher_runner(bundle: BundleManifest) -> KernelRunner:
    from ultramem.plugins.launcher import run_aggregate, run_retrieve

    def run(op: str, name: str, args: tuple[Any, ...]) -> Any:
        # the attributes are the specialisation's: the kernel name carries them
        if op == "retrieve":
            return run_retrieve(bundle, name, *args[:5])
        return run_aggregate(bundle, name, *args[:4])

    return run


def _on_cpu(record: Any) -> Any:
    moved = {
        f.name: getattr(record, f.name).cpu()
        for f in dataclasses.fields(record)
        if isinstance(getattr(record, f.name), torch.Tensor)
    }
    return dataclasses.replace(record, **moved)


def plugin_kernels_stage(
    program: ExportedProgram, bundle_dir: Path, runner: KernelRunner | None = None
) -> Stage:
    """The stage, or why it cannot run here (no CUDA device, without a ``runner``)."""
    bundle = load_bundle(bundle_dir)
    if runner is None and not torch.cuda.is_available():
        return Stage(STAGE, None, "not executed: the bundled kernels launch on a CUDA device")
    device = "cuda" if runner is None else "cpu"
    module = program.module().to(device)
    run_kernels = runner or launcher_runner(bundle)

    def run(inputs: tuple[Any, ...], _: list[Any]) -> tuple[list[torch.Tensor], list[Any]]:
        moved = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
        out, records = run_recording_sites(module, moved, BundleRouter(run_kernels))
        return [t.cpu() for t in tensor_leaves(out)], [_on_cpu(r) for r in records]

    return Stage(STAGE, run)
