"""Rules ``score_source`` and ``score_sides``: which tensors hold the row and column scores.

``score_source``: the ways the score tensors may be read (one per candidate top-k) and
whether the grid is additive. A tensor the candidates gather from on the way to the final
top-k (a Tucker grid, or the sum of the two gathered sides), or the candidate top-ks' own
inputs when their values are the scores; never a weight.

``score_sides``: each side's tensor, and for one joint score tensor the dim of size 2 that
holds the two sides. Which side is the rows is a hypothesis: both orders are tried.
"""

from __future__ import annotations

from torch.fx import Node

from ..._graph import VIEW_OPS, ancestors, descendants, graph_order, in_graph_order
from ..anchors import LookupAnchors, topk_output
from ..reads import TABLE_READS
from ..rules import Failure

SOURCE_RULE = "score_source"
SIDES_RULE = "score_sides"
Side = tuple[Node, tuple[int, int] | None]  # a score tensor, and (dim, index) of a joint one


def _gathered_source(candidate: Node, final: Node) -> Node | None:
    """The tensor the candidate indices gather from on the way to the final top-k, which
    also produced the candidate top-k's input (followed back through views: an ``expand``
    per head, a second ``S[0]``); never a weight."""
    idx = topk_output(candidate, 1)
    if idx is None:
        return None
    produced_input = ancestors([candidate.args[0]]) | {candidate.args[0]}
    order = graph_order(candidate.graph)
    grid = ancestors([final])
    for user in in_graph_order(descendants([idx]) & grid, order):
        if user.target not in TABLE_READS:
            continue
        src = user.args[0]
        while isinstance(src, Node) and src.op != "get_attr":
            if src in produced_input:
                return src
            if src.op != "call_function" or src.target not in VIEW_OPS:
                break
            src = src.args[0]
    return None


def check_sources(lookup: LookupAnchors) -> list[tuple[list[Node], bool]] | Failure:
    """(score tensors, additive) alternatives, in the order they are tried."""
    options = []
    gathered = [_gathered_source(c, lookup.final) for c in lookup.candidates]
    if all(g is not None for g in gathered):
        found = [g for g in gathered if g is not None]
        options += [(found, False), (found, True)]
    if all(topk_output(c, 0) is not None for c in lookup.candidates):
        options.append(([c.args[0] for c in lookup.candidates], True))
    if not options:
        candidate = lookup.candidates[0]
        reason = f"no score tensor is gathered at the indices of {candidate.name}"
        return Failure.at(SOURCE_RULE, reason, candidate)
    return options


def check_sides(lookup: LookupAnchors, sources: list[Node]) -> list[Side] | Failure:
    """The two sides' score tensors (rows first, as the candidates come)."""
    if not lookup.joint:
        return [(s, None) for s in sources]
    (source,) = sources
    side_dim = lookup.side_dim
    shape = source.meta["val"].shape
    if side_dim is None or side_dim >= len(shape) or shape[side_dim] != 2:
        sides = [d for d, s in enumerate(shape) if s == 2]
        side_dim = sides[-1] if sides else None
    if side_dim is None:
        reason = f"{source.name} holds no dim of 2 sides for {lookup.candidates[0].name}"
        return Failure.at(SIDES_RULE, reason, source)
    return [(source, (side_dim, 0)), (source, (side_dim, 1))]
