"""The kernels a test holds against the reference: Triton (the interpreter on a CPU) and
the native CPU kernels (``kernels/native``), each called as the ops are called."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ultramem.kernels import native, registry


def _on_cpu(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` run on CPU copies of its tensors (the native kernels are CPU kernels), the
    results moved back to the inputs' device."""

    def run(*args: Any, **kwargs: Any) -> Any:
        device = next(x.device for x in (*args, *kwargs.values()) if isinstance(x, Tensor))
        cpu = tree_map(lambda x: x.cpu() if isinstance(x, Tensor) else x, (args, kwargs))
        out = op(*cpu[0], **cpu[1])
        return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, out)

    return run


def implementations(triton: Callable[..., Any], op_name: str) -> list[Any]:
    reason = f"native CPU kernels unavailable: {native.unavailable_reason()}"
    return [
        pytest.param(triton, id="triton"),
        pytest.param(
            _on_cpu(getattr(torch.ops.ultramem, op_name)),
            id="native",
            marks=pytest.mark.skipif(not registry.NATIVE_LIBRARY, reason=reason),
        ),
    ]
