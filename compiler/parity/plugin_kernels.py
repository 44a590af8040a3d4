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

from ...kernels import OPS, OpSpec, op_overload, op_spec
from ...plugins.metadata import BundleManifest, load_bundle
from ...plugins.specs import spec_for_call
from .selections import SiteRecorder, run_recording_sites
from .stages import Stage, tensor_leaves

STAGE = "plugin-kernels"
_CONTRACTS = {op_overload(op): op for op in OPS}

KernelRunner = Callable[[str, str, dict[str, Any]], Any]
"""(op, bundled kernel name, the op's arguments by the contract's names) -> the op's outputs."""


@functools.cache
def _kernel_name(op: OpSpec, key: tuple[Any, ...]) -> str:
    """A spec is built (and its grid checked) once per specialisation, not once per call."""
    bound = dict(key)
    meta = {k: v for k, v in bound.items() if isinstance(v, tuple) and v and v[0] == "tensor"}
    tensors = {k: torch.empty(v[1], dtype=v[2], device="meta") for k, v in meta.items()}
    return spec_for_call(op, {**bound, **tensors}).name


def kernel_name(op: OpSpec, bound: dict[str, Any]) -> str:
    """The bundled kernel for one call of ``op`` (its arguments bound by name)."""
    key = tuple(
        (k, ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v)
        for k, v in bound.items()
    )
    return _kernel_name(op, key)


class BundleRouter(SiteRecorder):
    """Records sites like any stage, and runs each fused op with ``runner`` instead."""

    def __init__(self, runner: KernelRunner) -> None:
        super().__init__()
        self.runner = runner

    def run_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        op = _CONTRACTS.get(func)
        if op is None:
            return func(*args, **kwargs)
        bound = op.bind(*args, **kwargs)
        return self.runner(op.name, kernel_name(op, bound), bound)


def launcher_runner(bundle: BundleManifest) -> KernelRunner:
    from ...plugins.launcher import run_op

    def run(op: str, name: str, bound: dict[str, Any]) -> Any:
        # the attributes are the specialisation's: the kernel name carries them
        tensors = {t: bound[t] for t in op_spec(op).input_names}
        return run_op(bundle, name, **tensors)

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
