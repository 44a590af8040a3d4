"""The kernel bundle's launcher (``kernels/``: the AOT-compiled cubins a TensorRT plugin
runs), on the rewritten program's lookups. Its cubins are native code: they load only
where the caller trusts the folder."""

from __future__ import annotations

import torch

from ..inputs.options import KERNELS_DIR
from ..parity.plugin_kernels import STAGE, plugin_kernels_stage
from ..parity.stages import Stage
from . import Backend, RunContext, Runner, native_code_refusal

KERNELS_ARE = "holds GPU kernels (cubins)"


def _stage(ctx: RunContext) -> Stage:
    bundle = ctx.file("kernels", KERNELS_DIR)
    assert bundle is not None and ctx.programs.program is not None
    if not ctx.native_code:
        return Stage(STAGE, None, native_code_refusal(bundle, KERNELS_ARE))
    return plugin_kernels_stage(ctx.programs.program, bundle)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _backend(ctx: RunContext) -> Backend:
    bundle = ctx.file("kernels", KERNELS_DIR)
    if not on_gpu():
        reason = "the launcher runs the lookup's AOT kernels, not a whole model; needs a GPU"
    elif bundle is not None and not ctx.native_code:  # the rule of the AOTI package
        reason = native_code_refusal(bundle, KERNELS_ARE)
    else:
        reason = "whole-model runs through the launcher are not wired yet"
    return Backend(STAGE, None, reason)


RUNNER = Runner(STAGE, _stage, _backend, fmt="kernels")
