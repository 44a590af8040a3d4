"""Fused UltraMem ops in the ``ultramem`` torch.library namespace.

Importing this package registers ``torch.ops.ultramem.retrieve`` and
``torch.ops.ultramem.aggregate``.
"""

from __future__ import annotations

from ultramem.kernels.aggregate import aggregate, aggregate_reference
from ultramem.kernels.retrieve import retrieve, retrieve_reference, stable_topk

__all__ = ["aggregate", "aggregate_reference", "retrieve", "retrieve_reference", "stable_topk"]
