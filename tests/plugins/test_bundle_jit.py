"""The bundle compiles the kernel the JIT builds (issue 25, part 4).

``kernel[grid](...)`` specialises each launch through Triton's binder: an integer 1
becomes a constant, a multiple of 16 gets the divisibility hint, a 16-byte aligned
pointer too. The bundle must compile with exactly that, or its kernels are slower than
the JIT's they are said to equal (before: 197 registers and scalar 2-byte loads for the
paper-scale bf16 ``aggregate``). The reference here is Triton's own binder, run on the
launch's arguments; the bundle's ``jit_specialisation`` is ours.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import triton

from ultramem.kernels import triton_kernels
from ultramem.plugins.bundle import build_time_value, compile_spec, jit_specialisation
from ultramem.plugins.launcher import pack_args, scalar_values
from ultramem.plugins.metadata import BundleManifest
from ultramem.plugins.specs import KernelSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "i64": torch.int64, "i32": torch.int32}  # fmt: skip
# a value the JIT specialises in no way (not 1, no multiple of 16): the stand-in for a
# scalar that depends on the token count or the table's rows, unknown at build time
UNKNOWN = 17


class _Pointer:
    """A tensor argument as the binder sees it: a dtype and a 256-byte aligned address."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20


def triton_binder(spec: KernelSpec, sm: int = 90) -> tuple[Any, ...]:
    """(options, signature, constexprs, attrs) as ``JITFunction.run`` derives them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = triton_kernels()[spec.op]
    backend = make_backend(GPUTarget("cuda", sm, 32))
    kwargs: dict[str, Any] = {"debug": False, "num_warps": spec.num_warps}
    for p in fn.params:
        if p.is_constexpr:
            kwargs[p.name] = spec.constexprs[p.name]
        elif p.name in spec.pointers:
            kwargs[p.name] = _Pointer(DTYPES[spec.pointer_dtypes[spec.pointers[p.name]]])
        else:
            value = build_time_value(spec, spec.scalars[p.name])
            kwargs[p.name] = UNKNOWN if value is None else value
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def check_specialisations() -> str:
    """Every bundle spec's specialisation against Triton's binder; a summary line."""
    constants = hints = 0
    for spec in _specs():
        _, signature, constexprs, attrs = triton_binder(spec)
        ours = jit_specialisation(spec)
        assert ours[0] == signature, (spec.name, ours[0], signature)
        assert ours[1] == constexprs, (spec.name, ours[1], constexprs)
        assert {k: v for k, v in ours[2].items() if v} == {k: v for k, v in attrs.items() if v}
        constants += sum(a.value is not None for a in ours[3])
        hints += sum(a.divisibility > 1 for a in ours[3])
    assert constants > 0 and hints > 0  # the specs have both, or this proves nothing
    return f"{constants} constants, {hints} divisibility hints"


def check_cubin() -> str:
    """The paper-scale bf16 aggregate for sm_90: the JIT's bytes, hence its registers."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = next(s for s in _specs() if s.op == "aggregate" and "_bf16_" in s.name)
    options, signature, constexprs, attrs = triton_binder(spec)
    fn = triton_kernels()[spec.op]
    jit = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options.__dict__,
    )
    meta, _, _ = compile_spec(spec, 90)
    assert hashlib.sha256(jit.asm["cubin"]).hexdigest() == meta.cubin_sha256, spec.name
    assert meta.fixed and all(a.value == 1 for a in meta.fixed)
    return f"{spec.name}: same cubin"


def _specs() -> list[KernelSpec]:
    from ultramem.plugins.specs import spec_for_call
    from ultramem.tests.conftest import bundle_calls

    return [spec_for_call(op, bound) for op, bound in bundle_calls()]


@pytest.mark.parametrize("check", ["check_specialisations", "check_cubin"])
def test_the_bundle_compiles_what_the_jit_compiles(check: str) -> None:
    # the suite interprets the kernels (TRITON_INTERPRET=1), where nothing compiles: as
    # the bundle does, compile in a child without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from ultramem.tests.plugins.test_bundle_jit import {check}; print({check}())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)


def test_a_launch_that_breaks_a_specialisation_is_refused(bundle: BundleManifest) -> None:
    kernel = next(k for k in bundle.kernels if k.fixed)
    dims = {n: d.value if d.value is not None else 5 for n, d in kernel.dims.items()}
    scalar_values(kernel, dims)  # the shapes it was built for
    fixed = kernel.fixed[0]
    with pytest.raises(ValueError, match=f"compiled with {fixed.name} = 1"):
        broken = dict(dims)
        # a dim of the constant's expression changed under the kernel
        name = next(n for n in dims if n in (fixed.expr or "")) if fixed.expr != "1" else None
        if name is None:
            pytest.skip("the constant is a literal 1: no shape can change it")
        broken[name] = dims[name] + 1
        scalar_values(kernel, broken)
    hinted = next((a for k in bundle.kernels for a in k.args if a.divisibility > 1), None)
    assert hinted is not None
    owner = next(k for k in bundle.kernels if hinted in k.args)
    values = {a.name: 256 if a.kind == "pointer" else 0 for a in owner.args}
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pack_args(owner, {**values, hinted.name: 24})
