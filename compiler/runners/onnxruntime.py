"""ONNX Runtime on the export's ``model.onnx``: the CPU provider, and CUDA where
onnxruntime-gpu and a GPU are present (parity only; the bench does not time it yet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from ...kernels import DOMAIN
from ..inputs.options import ONNX_FILE
from ..onnx.coverage import missing_kernels
from ..onnx.runner import OnnxRunner
from ..parity.selections import SiteRecord, inlined
from ..parity.stages import Stage
from . import Backend, RunContext, Runner

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NAMES = {CPU: "onnxruntime-cpu", CUDA: "onnxruntime-cuda"}


def onnx_stage(path: Path, provider: str = CPU, graph: onnx.ModelProto | None = None) -> Stage:
    """``graph``: the file's model without its weights, where the caller has it loaded."""
    name = NAMES[provider]
    graph = graph or onnx.load(str(path), load_external_data=False)
    # a provider without a kernel for an operator in the file's dtype (the CPU provider
    # and bfloat16 TopK): this runtime cannot run it, which is no verdict on the file
    missing = missing_kernels(graph, provider)
    if missing:
        return Stage(name, None, f"not executed: {provider} has no kernel for {', '.join(missing)}")
    runner = OnnxRunner(path, providers=[provider])

    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> Any:
        return runner(inputs)

    return Stage(name, run)


def _cuda_missing() -> str:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return "onnxruntime-gpu is not installed"
    return "" if torch.cuda.is_available() else "no CUDA device"


def _stage(ctx: RunContext, provider: str) -> Stage:
    path = ctx.file("onnx", ONNX_FILE)
    assert path is not None
    missing = _cuda_missing() if provider == CUDA else ""
    if missing:
        return Stage(NAMES[CUDA], None, f"not executed: {missing}")
    model = onnx.load(str(path), load_external_data=False)
    stage = onnx_stage(path, provider, model)
    if ctx.programs.plan is not None and not any(n.domain == DOMAIN for n in model.graph.node):
        stage.plan = inlined(ctx.programs.plan)  # the portable form: three TopK per lookup
    return stage


def _cpu_backend(ctx: RunContext) -> Backend:
    path = ctx.file("onnx", ONNX_FILE)
    if path is None or not path.is_file():
        return Backend(
            NAMES[CPU], None, f"no {ONNX_FILE} (pass --artifacts DIR from `ultramem export`)"
        )
    runner = OnnxRunner(path, probe_selections=False, threads=ctx.threads)
    applied = runner.session.get_session_options()
    spinning = "session.intra_op.allow_spinning"
    settings = {
        "intra_op_num_threads": applied.intra_op_num_threads,
        "inter_op_num_threads": applied.inter_op_num_threads,
        "allow_spinning": applied.get_session_config_entry(spinning),
    }
    return Backend(NAMES[CPU], lambda x: runner(x)[0], settings=settings)


def _cuda_backend(ctx: RunContext) -> Backend:
    missing = _cuda_missing()
    return Backend(NAMES[CUDA], None, missing or "ONNX Runtime CUDA is not timed yet")


RUNNERS = (
    Runner(NAMES[CPU], lambda ctx: _stage(ctx, CPU), _cpu_backend, fmt="onnx"),
    Runner(NAMES[CUDA], lambda ctx: _stage(ctx, CUDA), _cuda_backend, fmt="onnx"),
)
