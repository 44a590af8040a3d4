"""Rule ``score_layout``: ways to view each side's score tensor as ``[T, H, n, r]``.

Every assignment of heads, keys and rank to dims of matching size is a hypothesis
(``layouts``); a pair of row and column views is admitted when both agree on the heads and
the rank. Real head dims come before folding heads into tokens (H = 1, which also
reproduces a selection but leaves no head for the aggregation to pool apart).
"""

from __future__ import annotations

import itertools

from ..layouts import Layout, layouts, token_count
from ..rules import Failure
from .score_source import Side

RULE = "score_layout"


def side_layouts(side: Side, n: int, additive: bool, token_sizes: frozenset[int]) -> list[Layout]:
    """Ways to view one side's score tensor as [T, H, n, r] (additive: [T, H, n])."""
    node, selected = side
    shape = list(node.meta["val"].shape)
    if selected is not None:
        del shape[selected[0]]
    out = []
    statics = [s for s in shape if isinstance(s, int)]
    # a size the example's batch or sequence has is more likely tokens than heads, but only
    # in a capture with static shapes: where a dim is symbolic, that dim is the tokens
    if len(statics) < len(shape):
        token_sizes = frozenset()
    head_sizes = sorted(
        {s for s in statics if s > 1} | {1}, key=lambda s: (s in token_sizes, s == 1, -s)
    )
    rank_sizes = [1] if additive else sorted({s for s in statics if s > 1} | {1})
    for h, r in itertools.product(head_sizes, rank_sizes):
        named = ("h", "n") if additive else ("h", "n", "r")
        sizes = {"h": h, "n": n, "r": r}
        for layout in layouts(shape, named, sizes):
            if layout not in out:
                out.append(layout)
    # a size the batch or sequence has may be the heads' too (2 heads, batch 2): then the
    # tokens are the dims that multiply to batch × sequence, else to one of them
    if not token_sizes:
        return out
    flat = max(token_sizes)

    def rank(layout: Layout) -> int:
        count = token_count(shape, layout)
        return 0 if count == flat else 1 if count in token_sizes else 2

    return sorted(out, key=rank)


def named_sizes(layout: Layout, side: Side) -> dict[str, int]:
    """The sizes of the named roles (heads, keys, rank) of one side viewed in ``layout``."""
    node, selected = side
    shape = list(node.meta["val"].shape)
    if selected is not None:
        del shape[selected[0]]
    return {r: int(shape[d]) for d, r in enumerate(layout.roles) if r not in ("t", "*")}


def check(
    rows: Side, cols: Side, n: int, additive: bool, token_sizes: frozenset[int]
) -> list[tuple[Layout, Layout, int, int]] | Failure:
    """(row layout, column layout, heads, rank) pairs that agree, in the order tried."""
    col_layouts = side_layouts(cols, n, additive, token_sizes)
    out = []
    for row_layout, col_layout in itertools.product(
        side_layouts(rows, n, additive, token_sizes), col_layouts
    ):
        r_sizes = named_sizes(row_layout, rows)
        c_sizes = named_sizes(col_layout, cols)
        rank, heads = r_sizes.get("r", 1), r_sizes.get("h", 1)
        if (c_sizes.get("r", 1), c_sizes.get("h", 1)) == (rank, heads):
            out.append((row_layout, col_layout, heads, rank))
    if not out:
        reason = (
            f"no views of {rows[0].name} and {cols[0].name} as [T, H, n={n}, r] agree on "
            "heads and rank"
        )
        return Failure.at(RULE, reason, rows[0])
    return out
