"""Rule ``grid_order``: whether the model's grid has the rows as its outer axis.

Not a hypothesis of the binding (the op numbers slots ``row · n + col`` either way) but how
parity must read the model's own top-ks: the decomposition of the final top-k's positions
that gives the op's slots on the model's own activations. It admits every binding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ...lookups import grid_slots, ranked_last, same_selections
from ..anchors import LookupAnchors, topk_dim
from .binding import SelectionBinding

RULE = "grid_order"


def rows_outer(lookup: LookupAnchors, b: SelectionBinding, real: dict[Node, Any], n: int) -> bool:
    """Whether positions read rows outer (``pos // m_col``) give the op's slots."""
    with torch.no_grad():
        _, slots = b.run(real[b.rows.node], real[b.cols.node], "none")
    pos = ranked_last(real[lookup.final][1], topk_dim(lookup.final))
    if lookup.joint:
        (joint,) = lookup.candidates
        side_dim = lookup.side_dim if lookup.side_dim is not None else b.rows.side[0]  # type: ignore[index]
        dim = topk_dim(joint)
        dim -= 1 if side_dim < dim else 0
        row_side = 1 if b.rows_second else 0
        indices = real[joint][1]
        rows = ranked_last(indices.select(side_dim, row_side), dim)
        cols = ranked_last(indices.select(side_dim, 1 - row_side), dim)
    else:
        first, second = lookup.candidates
        row_c, col_c = (second, first) if b.rows_second else (first, second)
        rows = ranked_last(real[row_c][1], topk_dim(row_c))
        cols = ranked_last(real[col_c][1], topk_dim(col_c))
    for outer in (True, False):
        got = grid_slots(rows, cols, pos, n, outer)
        if got is not None and same_selections(got, slots):
            return outer
    return True  # neither reads as the op does: parity will report the difference
