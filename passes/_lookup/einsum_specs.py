"""Einsum equations for the coordinate tracer: matrix products written as einsums, and
``...`` spelled out as fresh labels, so every operand's dims are named."""

from __future__ import annotations

import re
from typing import Any

import torch

aten = torch.ops.aten


def matmul_equation(target: Any, ranks: list[int]) -> str | None:
    """A matrix product (``linear``, ``mm``, ``bmm``, ``matmul``) as an einsum equation."""
    if target is aten.linear.default:
        return "...i,oi->...o"
    if target is aten.mm.default:
        return "ij,jk->ik"
    if target is aten.bmm.default:
        return "bij,bjk->bik"
    a, b = ranks
    if a >= 2 and b >= 2:
        return "...ij,...jk->...ik"
    if a == 1 and b >= 2:
        return "j,...jk->...k"
    if a >= 2 and b == 1:
        return "...ij,j->...i"
    return None


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def expand_ellipsis(
    specs: list[str], result: str, ranks: list[int]
) -> tuple[list[str], str] | None:
    """Einsum operand specs with ``...`` spelled out as fresh labels, right-aligned."""
    if not any("..." in s for s in [*specs, result]):
        return specs, result
    width = max(
        r - len(s.replace("...", "")) for s, r in zip(specs, ranks, strict=True) if "..." in s
    )
    fresh = "".join(c for c in _LETTERS if not any(c in s for s in [*specs, result]))[:width]
    out = []
    for s, r in zip(specs, ranks, strict=True):
        if "..." in s:
            n = r - len(s.replace("...", ""))
            s = s.replace("...", fresh[width - n :])
        out.append(s)
    if not re.fullmatch(r"[A-Za-z.]*", result):
        return None
    return out, result.replace("...", fresh)
