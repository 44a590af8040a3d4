"""Rules ``rank_one_vectors`` and ``cores``: the weights that merge and combine the scores.

``rank_one_vectors``: among the weights on a side's path to its candidate top-k, vectors
``u`` [H, r] whose merge of the side's real scores is what that top-k ranks (found in
some layout of its input). ``cores``: among the weights on the candidates' path to the final
top-k, tensors that read as M cores [M, H, r, r]. Rank 1 also admits the trivial ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import (
    ancestors,
    descendants,
    evaluate_constant,
    graph_order,
    in_graph_order,
    is_symint,
    view_base,
)
from ..layouts import layouts
from ..rules import Failure
from .binding import ScoreSide

VECTORS_RULE = "rank_one_vectors"
CORES_RULE = "cores"


def weights_on_path(gm: GraphModule, sources: list[Node], target: Node) -> list[Tensor]:
    """Weight values the path from ``sources`` to ``target`` reads, in graph order: as read
    (after any weight-only view or indexing), and the tables those were taken from."""
    order = graph_order(gm.graph)
    path = descendants(sources) & (ancestors([target]) | {target})
    cache: dict[Node, Any] = {}
    found: list[Node] = []
    for node in in_graph_order(path, order):
        for i in node.all_input_nodes:
            if i not in path and i not in found and not is_symint(i):
                found.append(i)
                if view_base(i) not in found:
                    found.append(view_base(i))
    values = [evaluate_constant(gm, n, cache) for n in found]
    return [v for v in values if isinstance(v, Tensor) and v.is_floating_point()]


def _vectors(weights: list[Tensor], heads: int, rank: int) -> list[Tensor]:
    out = []
    for w in weights:
        if w.numel() == heads * rank:
            out += [w.reshape(heads, rank).float(), w.reshape(rank, heads).t().float()]
        elif w.numel() == 2 * heads * rank:  # both sides' vectors in one tensor
            out += [half.reshape(heads, rank).float() for half in w.reshape(2, -1)]
    if rank == 1:
        out.append(torch.ones(heads, 1))
    return out


def check_cores(weights: list[Tensor], heads: int, rank: int) -> list[Tensor] | Failure:
    """Readings of the weights as cores [M, H, r, r], in the order tried."""
    out = []
    per_core = heads * rank * rank
    single = [w for w in weights if w.numel() == per_core]
    if len(single) > 1:  # cores read one at a time (``cores[c]`` in a loop), in graph order
        weights = [*weights, torch.stack([w.reshape(heads, rank, rank) for w in single])]
    for w in weights:
        if w.numel() % per_core == 0 and w.numel() > 0:
            count = w.numel() // per_core
            as_mhrr = w.reshape(count, heads, rank, rank).float()
            out += [
                as_mhrr,
                as_mhrr.transpose(-1, -2),
                w.reshape(heads, count, rank, rank).transpose(0, 1).float(),
            ]
    if rank == 1:
        out.append(torch.ones(1, heads, 1, 1))
    if not out:
        reason = f"no weight between the candidates and the final top-k reads as {heads} × "
        return Failure(rule=CORES_RULE, reason=reason + f"{rank} × {rank} cores")
    return out


def check_vectors(
    side: ScoreSide,
    weights: list[Tensor],
    heads: int,
    rank: int,
    real: dict[Node, Any],
    candidate: Node,
    broadcast: bool,
    n: int,
) -> list[Tensor] | Failure:
    """Rank-1 vectors whose merge of this side's real scores is what the candidate top-k
    ranks (found in some layout of its input): the pruning that keeps hypotheses few."""
    scores = side.layout.canonical(side.value(real[side.node]), {"h": heads} if broadcast else None)
    ranked = real[candidate.args[0]]
    out: list[Tensor] = []
    for u in _vectors(weights, heads, rank):
        merged = (scores.float() * u[None, :, None, :]).sum(-1)  # [T, H, n]
        known = any(torch.equal(u, o) for o in out)
        if not known and _appears_in(merged, ranked, heads, n):
            out.append(u)
    if not out:
        reason = (
            f"no [{heads}, {rank}] vector among the weights merges {side.node.name} "
            f"(viewed {''.join(side.layout.roles)}) into what {candidate.name} ranks"
        )
        return Failure.at(VECTORS_RULE, reason, side.node)
    return out


def _appears_in(merged: Tensor, ranked: Tensor, heads: int, n: int) -> bool:
    """Whether ``ranked`` (the candidate top-k's input, maybe both sides) holds ``merged``
    in some layout, up to rounding."""
    shape = list(ranked.shape)
    for side in [None, *[d for d, s in enumerate(shape) if s == 2]]:
        views = [ranked] if side is None else [ranked.select(side, 0), ranked.select(side, 1)]
        for view in views:
            for layout in layouts(
                list(view.shape), ("h", "n"), {"h": heads, "n": n}, optional=("h",)
            ):
                try:
                    got = layout.canonical(view, {"h": heads})
                except RuntimeError:
                    continue
                if got.shape == merged.shape and torch.allclose(
                    got.float(), merged, atol=1e-4, rtol=1e-3
                ):
                    return True
    return False
