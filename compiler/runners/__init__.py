"""One runner per runtime; parity, bench and text generation all read this registry.

A ``Runner`` says, for one runtime (eager PyTorch, ``torch.compile``, the captured and the
rewritten programs, ONNX Runtime CPU and CUDA, the kernel bundle's launcher, the
AOTInductor package, a TensorRT engine), how to load it from a ``RunContext`` (the
programs, and a folder with the formats its manifest lists) or why it cannot, and how it
runs: as a parity ``Stage`` (outputs and the memory lookups' selections) and as a bench
``Backend`` (outputs, timed; the settings it runs with). A runner of a format's file runs
only where the folder's manifest lists the format; one whose file is native code (the
AOTInductor package, the bundle's cubins) loads only where the caller trusts the folder.

``RUNNERS`` is the registry, in the order parity reports its stages. A new format is one
module here (its runner), one entry in ``RUNNERS`` and one in ``compiler/formats.py`` (what
it writes): ``docs/adding-a-format.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import first_line
from ..artifacts import ArtifactError
from ..inputs.options import BENCH_BACKENDS
from ..parity.selections import SitePlan, SiteRecord
from ..parity.stages import Stage

RunFn = Callable[[tuple[Any, ...]], Any]
NATIVE_CODE_FLAG = "--allow-native-code"


@dataclass(frozen=True)
class Programs:
    """What a runner may run besides a folder's files (None where a caller has none)."""

    model: Callable[..., Any] | None = None  # the original model: the reference
    captured: torch.export.ExportedProgram | None = None  # as torch.export captured it
    program: torch.export.ExportedProgram | None = None  # rewritten: the fused ops
    plan: SitePlan | None = None  # the rewritten program's lookup sites


@dataclass(frozen=True)
class RunContext:
    programs: Programs
    folder: Path | None = None  # an export's folder (None: programs only)
    formats: Collection[str] = ()  # the formats its manifest lists: the files that may run
    trt_package: str | None = None
    native_code: bool = False  # load native code from the folder (trusted, or ours)
    threads: int | None = None  # ONNX Runtime's operator threads (torch's: the caller's)

    def file(self, fmt: str, name: str) -> Path | None:
        """``name`` in the folder where the manifest lists ``fmt``, else None."""
        listed = self.folder is not None and fmt in self.formats
        return self.folder / name if listed else None  # type: ignore[operator]


@dataclass
class Backend:
    """A runner as the bench times it: ``run(inputs) -> outputs``, or why it cannot."""

    name: str
    run: RunFn | None
    reason: str = ""
    # what the backend runs with, read back from it where it can say (bench.json)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Runner:
    name: str
    # its parity stage (None from the function: nothing of it in this context); None: the
    # runner is no parity stage (eager is the reference itself)
    stage: Callable[[RunContext], Stage | None] | None
    # its bench backend; None: not timed (the captured program is timed as the fused ops)
    backend: Callable[[RunContext], Backend] | None
    fmt: str | None = None  # the format whose file it runs; None: it runs the programs


def native_code_refusal(path: Path, what: str = "is a shared library") -> str:
    return f"{path.name} {what}; loading it runs its code: {NATIVE_CODE_FLAG}"


def _registry() -> tuple[Runner, ...]:
    # imported here: each runtime's module imports this one for its types
    from . import aotinductor, onnxruntime, plugin_kernels, tensorrt, torch_programs

    return (
        *torch_programs.RUNNERS,
        *onnxruntime.RUNNERS,
        plugin_kernels.RUNNER,
        aotinductor.RUNNER,
        tensorrt.RUNNER,
    )


def runners() -> tuple[Runner, ...]:
    global _RUNNERS
    if _RUNNERS is None:
        found = _registry()
        timed = tuple(r.name for r in found if r.backend is not None)
        if timed != BENCH_BACKENDS:  # the CLI's list, read before any runtime imports
            raise ImportError(f"compiler/runners times {timed}, options.BENCH_BACKENDS says "
                              f"{BENCH_BACKENDS}")  # fmt: skip
        _RUNNERS = found
    return _RUNNERS


_RUNNERS: tuple[Runner, ...] | None = None


def parity_stages(ctx: RunContext) -> list[Stage]:
    """Every parity stage of ``ctx``: the programs', and those of the formats its folder's
    manifest lists. A file its runtime cannot load is a stage that fails, saying why; a
    file changed since it was checked is bad input (``ArtifactError``)."""
    stages = []
    for runner in runners():
        if runner.stage is None or (runner.fmt is not None and runner.fmt not in ctx.formats):
            continue
        try:
            stage = runner.stage(ctx)
        except ArtifactError:
            raise
        except Exception as exc:  # an artifact its runtime cannot load: that stage fails
            stage = _failing_stage(runner, exc)
        if stage is None:
            continue
        if runner.fmt is not None:  # every artifact holds the rewritten program's lookups
            stage.plan = stage.plan or ctx.programs.plan
        stages.append(stage)
    return stages


def bench_backends(ctx: RunContext, wanted: Collection[str]) -> list[Backend]:
    """The backends named in ``wanted``, in its order; each loaded, or why it cannot run."""
    by_name = {r.name: r for r in runners() if r.backend is not None}
    out = []
    for name in wanted:
        runner = by_name.get(name)
        if runner is None or runner.backend is None:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(by_name)}")
        try:
            out.append(runner.backend(ctx))
        except Exception as exc:  # an artifact its runtime cannot load: that backend is out
            text = first_line(exc, 200)
            out.append(
                Backend(name, None, f"cannot load its artifact: {type(exc).__name__}: {text}")
            )
    return out


def _failing_stage(runner: Runner, exc: Exception) -> Stage:
    text = first_line(exc, 300)

    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> Any:
        what = runner.fmt or runner.name
        raise RuntimeError(f"cannot load the {what} artifact: {type(exc).__name__}: {text}")

    return Stage(runner.name, run)
