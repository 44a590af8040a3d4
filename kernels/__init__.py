"""Fused UltraMem ops in the ``ultramem`` torch.library namespace.

Importing this package registers ``torch.ops.ultramem.retrieve`` and
``torch.ops.ultramem.aggregate``, with their plain-PyTorch reference kernels and, when
Triton is installed, Triton kernels for CUDA tensors (``retrieve_triton``,
``aggregate_triton``). Without Triton the ops still run the reference everywhere.
"""

from __future__ import annotations

from ultramem.kernels.aggregate import aggregate, aggregate_reference
from ultramem.kernels.retrieve import retrieve, retrieve_reference, stable_topk

try:
    from ultramem.kernels.aggregate_triton import aggregate_triton
    from ultramem.kernels.retrieve_triton import retrieve_triton, triton_on_cpu

    HAS_TRITON = True
except ImportError:  # e.g. a platform without Triton wheels: the references still run
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "aggregate",
    "aggregate_reference",
    "aggregate_triton",
    "retrieve",
    "retrieve_reference",
    "retrieve_triton",
    "stable_topk",
    "triton_on_cpu",
]
