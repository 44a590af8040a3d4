"""The runners of PyTorch programs: the original model, ``torch.compile`` of it, the
program as ``torch.export`` captured it, and as rewritten (the fused ops)."""

from __future__ import annotations

import torch

from ..parity.selections import site_plan
from ..parity.stages import Stage, torch_stage
from . import Backend, RunContext, Runner

FUSED_STAGE = "fused-ops"


def _eager(ctx: RunContext) -> Backend:
    model = ctx.programs.model
    assert model is not None
    return Backend("eager", lambda x: model(*x))


def _torch_compile(ctx: RunContext) -> Backend:
    compiled = torch.compile(ctx.programs.model, dynamic=True)
    return Backend("torch.compile", lambda x: compiled(*x))


def _captured_stage(ctx: RunContext) -> Stage | None:
    captured = ctx.programs.captured
    return None if captured is None else torch_stage("torch.export", captured.module())


def _fused_stage(ctx: RunContext) -> Stage | None:
    program = ctx.programs.program
    if program is None:
        return None
    plan = ctx.programs.plan or site_plan(program.graph)
    return torch_stage(FUSED_STAGE, program.module(), plan)


def _fused(ctx: RunContext) -> Backend:
    assert ctx.programs.program is not None
    module = ctx.programs.program.module()
    return Backend(FUSED_STAGE, lambda x: module(*x))


RUNNERS = (
    Runner("eager", None, _eager),
    Runner("torch.compile", None, _torch_compile),
    Runner("torch.export", _captured_stage, None),
    Runner(FUSED_STAGE, _fused_stage, _fused),
)
