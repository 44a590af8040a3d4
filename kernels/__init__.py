"""Fused UltraMem ops in the ``ultramem`` torch.library namespace.

Importing this package registers ``torch.ops.ultramem.retrieve`` and
``torch.ops.ultramem.aggregate`` (declared once in ``contract``), with their plain-PyTorch
reference kernels and, when Triton is installed, Triton kernels for CUDA tensors
(``retrieve_triton``, ``aggregate_triton``). Without Triton the ops still run the reference
everywhere.
"""

from __future__ import annotations

from typing import Any

if __name__ == "ultramem.kernels":
    from .aggregate import aggregate_reference, rows_and_groups
    from .contract import AGGREGATE, DOMAIN, DOMAIN_VERSION, OPS, RETRIEVE, OpSpec, op_spec
    from .registry import op_overload, triton_on_cpu
    from .retrieve import retrieve_reference, stable_topk

    try:
        from .aggregate_triton import (
            _aggregate_kernel,
            aggregate_launch_config,
            aggregate_triton,
        )
        from .retrieve_triton import _retrieve_kernel, retrieve_launch_config, retrieve_triton

        HAS_TRITON = True
    except ImportError:  # e.g. a platform without Triton wheels: the references still run
        HAS_TRITON = False

    RETRIEVE_OP = op_overload(RETRIEVE)
    AGGREGATE_OP = op_overload(AGGREGATE)

    def triton_kernels() -> dict[str, Any]:
        """The ``@triton.jit`` function behind each op, by op name (for AOT bundles)."""
        if not HAS_TRITON:
            raise ImportError("the ultramem Triton kernels need triton: pip install triton")
        return {RETRIEVE.name: _retrieve_kernel, AGGREGATE.name: _aggregate_kernel}

else:
    # With a checkout's root on sys.path (``python -m ...`` run there) this folder is also a
    # top-level ``kernels``: the name of Hugging Face's kernel-hub package, which
    # transformers probes by importing it. There it is an empty stand-in that reads as not
    # installed (no __file__, no __version__), never a second copy registering the ops twice.
    del __file__  # type: ignore[name-defined]

__all__ = [
    "AGGREGATE",
    "AGGREGATE_OP",
    "DOMAIN",
    "DOMAIN_VERSION",
    "HAS_TRITON",
    "OPS",
    "RETRIEVE",
    "RETRIEVE_OP",
    "OpSpec",
    "aggregate_launch_config",
    "aggregate_reference",
    "aggregate_triton",
    "op_spec",
    "retrieve_launch_config",
    "retrieve_reference",
    "retrieve_triton",
    "rows_and_groups",
    "stable_topk",
    "triton_kernels",
    "triton_on_cpu",
]
