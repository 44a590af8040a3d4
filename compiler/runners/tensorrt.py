"""A TensorRT engine (``model.engine``), where a TensorRT runtime that runs engines on this
machine is installed (TensorRT-RTX builds on a CPU but runs only on a GPU)."""

from __future__ import annotations

from pathlib import Path

from ..inputs.options import ENGINE_FILE
from ..parity.stages import Stage
from ..tensorrt.package import TensorRTError, can_run_engine, import_tensorrt, package_name
from ..tensorrt.runner import EngineRunner
from . import Backend, RunContext, Runner

NAME = "tensorrt"


def engine_stage(path: Path, package: str | None) -> Stage:
    try:
        trt = import_tensorrt(package)
    except TensorRTError as exc:
        return Stage(NAME, None, f"not executed: {exc}")
    runnable, why = can_run_engine(package_name(trt))
    if not runnable:
        return Stage(NAME, None, f"not executed: {why}")
    runner = EngineRunner(path, package)
    return Stage(NAME, lambda inputs, _: (runner(*inputs), []))


def _stage(ctx: RunContext) -> Stage:
    path = ctx.file("tensorrt", ENGINE_FILE)
    assert path is not None
    return engine_stage(path, ctx.trt_package)


def _backend(ctx: RunContext) -> Backend:
    path = ctx.file("tensorrt", ENGINE_FILE)
    if path is None or not path.is_file():
        return Backend(NAME, None, f"no {ENGINE_FILE} (export --format tensorrt)")
    stage = engine_stage(path, ctx.trt_package)
    run = stage.run
    if run is None:
        return Backend(NAME, None, stage.reason)
    return Backend(NAME, lambda x: run(x, [])[0])


RUNNER = Runner(NAME, _stage, _backend, fmt="tensorrt")
