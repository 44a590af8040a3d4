"""The AOTInductor package (``model.aoti.pt2``): a shared library, loaded only where the
caller trusts the folder (an export's own parity does)."""

from __future__ import annotations

from ..aoti import AOTI_FILE, load_aoti
from ..parity.stages import Stage, torch_stage
from . import Backend, RunContext, Runner, native_code_refusal

NAME = "aotinductor"


def _stage(ctx: RunContext) -> Stage:
    path = ctx.file("aoti", AOTI_FILE)
    assert path is not None
    if not ctx.native_code:
        return Stage(NAME, None, native_code_refusal(path))
    return torch_stage(NAME, load_aoti(path))


def _backend(ctx: RunContext) -> Backend:
    path = ctx.file("aoti", AOTI_FILE)
    if path is None or not path.is_file():
        return Backend(NAME, None, f"no {AOTI_FILE} (export --format aoti)")
    if not ctx.native_code:
        return Backend(NAME, None, native_code_refusal(path))
    package = load_aoti(path)
    return Backend(NAME, lambda x: package(*x))


RUNNER = Runner(NAME, _stage, _backend, fmt="aoti")
