"""Define the ``ultramem`` ops in ``torch.library`` from the contract, and route their calls.

``define_op(spec, reference)`` gives an op its schema (``OpSpec.torch_schema``), a fake
kernel whose output shapes and dtypes come from the contract, and a CPU kernel running the
plain-PyTorch reference. ``register_triton(spec, launcher, kernel)`` adds what
``torch.library.triton_op`` would give it: a CUDA kernel that launches directly (wrap_triton
disabled: the HOP dispatch costs about a millisecond per call in eager), and a
FunctionalTensorMode rule that, under AOTDispatcher (torch.compile, AOTInductor), inlines the
launcher so Inductor sees and compiles the Triton kernel. torch.export keeps the op whole, as
it does for triton_op. CPU tensors run the native kernels (``native``: C++, compiled on
first use) when they could be built, else the reference; ``triton_on_cpu`` routes them to
the Triton launchers instead (the Triton interpreter: machines without a GPU). Every Python
implementation is called with the contract's parameters by name (``OpSpec.bind``): the
dispatcher drops trailing arguments equal to their schema defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import native
from .contract import DOMAIN, OpSpec

# The native library, when it loads, defines the ops (schemas from the contract) with their
# CPU kernels; Python then only adds to them. It must load before the Library is made.
NATIVE_LIBRARY = native.load()
_LIB = torch.library.Library(DOMAIN, "FRAGMENT" if NATIVE_LIBRARY else "DEF")
_triton_launchers: dict[str, Callable[..., Any]] = {}
_specs: dict[Any, OpSpec] = {}


class _TritonOnCpu(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        spec = _specs.get(func)
        if spec is not None and spec.name in _triton_launchers:
            return _triton_launchers[spec.name](**spec.bind(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Route the ops' calls to the Triton launchers (needs ``TRITON_INTERPRET=1`` for CPU
    tensors), whichever kernel the dispatcher holds."""
    if not enabled:
        yield
        return
    with _TritonOnCpu():
        yield


def define_op(spec: OpSpec, reference: Callable[..., Any]) -> None:
    """Give ``spec`` its fake kernel and, unless the native library defined it with its own,
    its schema and the reference as its CPU kernel."""
    if not NATIVE_LIBRARY:
        _LIB.define(spec.name + spec.torch_schema())
    _specs[op_overload(spec)] = spec

    def fake(*args: Any, **kwargs: Any) -> Any:
        bound = spec.bind(*args, **kwargs)
        sizes = spec.check(bound)
        like = next(x for x in bound.values() if isinstance(x, Tensor))
        outs = tuple(
            like.new_empty(shape, dtype=dtype)
            for shape, dtype in zip(
                spec.output_shapes(sizes), spec.output_dtypes(bound), strict=True
            )
        )
        return outs[0] if len(outs) == 1 else outs

    def cpu(*args: Any, **kwargs: Any) -> Any:
        return reference(**spec.bind(*args, **kwargs))

    torch.library.register_fake(spec.qualname, fake, lib=_LIB)
    if not NATIVE_LIBRARY:
        torch.library.register_kernel(spec.qualname, "cpu", cpu, lib=_LIB)


def _interpreted(kernel: Any) -> bool:
    import triton

    return not isinstance(kernel, triton.runtime.JITFunction)


def register_triton(
    spec: OpSpec,
    launcher: Callable[..., Any],
    kernel: Any,
    traced_launcher: Callable[..., Any] | None = None,
) -> None:
    """Make the op run ``launcher`` for CUDA tensors, eager and compiled.

    ``traced_launcher`` replaces ``launcher`` when traced (fake tensors): it must not read
    tensor data, e.g. skip index checks that sync with the device.
    """
    from torch._library.triton import set_wrap_triton_enabled, triton_ops_to_kernels
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    traced = traced_launcher or launcher
    _triton_launchers[spec.name] = launcher

    def cuda_impl(*args: Any, **kwargs: Any) -> Any:
        with set_wrap_triton_enabled(False):
            return launcher(**spec.bind(*args, **kwargs))

    def functional_rule(mode: Any, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if any(
            not issubclass(t, FakeTensor) and t not in (Tensor, FunctionalTensor) for t in types
        ):
            return NotImplemented  # another subclass: let it handle the op (as triton_op does)
        on_cuda = any(isinstance(a, Tensor) and a.is_cuda for a in (*args, *kwargs.values()))
        if not on_cuda or _interpreted(kernel) or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            return traced(**spec.bind(*args, **kwargs))

    torch.library.register_kernel(spec.qualname, "cuda", cuda_impl, lib=_LIB)
    torch.library.register_torch_dispatch(
        spec.qualname, FunctionalTensorMode, functional_rule, lib=_LIB
    )
    # AOTAutograd's cache key covers the source of the kernels an op may inline
    triton_ops_to_kernels[spec.qualname] = [kernel]


def op_overload(spec: OpSpec) -> Any:
    """``torch.ops.ultramem.<name>.default``."""
    return getattr(getattr(torch.ops, DOMAIN), spec.name).default
