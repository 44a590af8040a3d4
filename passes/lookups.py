"""What a memory lookup is, in one place: shared by the fusion pass, ``inspect`` and parity.

A lookup is anchored at a *final* top-k over the grid of two candidate top-ks (rows and
columns), or of one candidate top-k over both sides at once (``_lookup/anchors.py``). An
MoE router's top-k, or a top-k over anything but the candidates' grid, anchors none.

Its selection, read from the three top-ks' indices (each with its ranked axis last): the
final top-k's positions ``pos`` index the m_row × m_col grid of candidates, with the rows
as the outer axis (``pos // m_col``) or the inner one (``pos % m_row``), whichever the
model's code flattened; the slot id is ``row · n + col`` in the fused op's numbering.

What the fusion pass made of each lookup: ``LookupReport`` (``_lookup/records.py``), typed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._lookup.anchors import LookupAnchors, find_lookups
from ._lookup.records import PARTS, LookupReport, PartReport, SelectionSummary
from ._lookup.rules import Failure

__all__ = [
    "PARTS",
    "Failure",
    "LookupAnchors",
    "LookupReport",
    "PartReport",
    "SelectionSummary",
    "find_lookups",
    "grid_slots",
]


def grid_slots(rows: Tensor, cols: Tensor, pos: Tensor, n: int, rows_outer: bool) -> Tensor | None:
    """Slot ids [..., k] from candidate indices ``rows`` [..., m_row], ``cols`` [..., m_col]
    and grid positions ``pos`` [..., k]; None when their leading dims do not line up. A
    side with fewer leading dims (one score tensor read by every head) is broadcast."""
    rows, cols = _broadcast_to(rows, pos), _broadcast_to(cols, pos)
    if rows is None or cols is None:
        return None
    m_row, m_col = rows.shape[-1], cols.shape[-1]
    if rows_outer:
        row_at, col_at = pos // m_col, pos % m_col
    else:
        row_at, col_at = pos % m_row, pos // m_row
    if pos.numel() and (int(pos.max()) >= m_row * m_col or int(pos.min()) < 0):
        return None
    return rows.gather(-1, row_at.long()) * n + cols.gather(-1, col_at.long())


def _broadcast_to(side: Tensor, pos: Tensor) -> Tensor | None:
    while side.dim() < pos.dim():
        side = side.unsqueeze(-2)
    try:
        return side.expand(*pos.shape[:-1], side.shape[-1])
    except RuntimeError:
        return None


def same_selections(a: Tensor, b: Tensor) -> bool:
    """Whether two [..., k] slot tensors select the same sets, row for row, in some order
    of rows (a model and an op may order tokens and heads differently)."""
    k = a.shape[-1]
    if b.shape[-1] != k or a.numel() != b.numel():
        return False
    rows_a = sorted(map(tuple, a.reshape(-1, k).sort(-1).values.tolist()))
    rows_b = sorted(map(tuple, b.reshape(-1, k).sort(-1).values.tolist()))
    return rows_a == rows_b


def ranked_last(indices: Tensor, dim: int) -> Tensor:
    """A top-k's indices with its ranked axis last."""
    return torch.movedim(indices, dim, -1)
