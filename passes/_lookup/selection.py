"""Bind a lookup's selection to ``ultramem::retrieve``, proven by evaluation.

The selection is the sub-graph from the score tensors to its *outputs*: the first nodes
that combine the final top-k's positions with candidate data (the selected slot ids, or
their rows and columns; the selected per-core scores), and the final top-k's own values
(the ranked scores). Everything downstream of the outputs (activations, gates, slot
shuffles, table reads, pooling) is the rest of the model's graph and is left as it is.

A binding says which tensor holds the row and column scores and how to view each as
``[T, H, n, r]`` (``layouts``), the rank-1 vectors and cores among the weights on their
paths, and, for each output, which value of the op's outputs it is (``slot``, ``row`` =
slot div n, ``col`` = slot mod n, ``scores`` per core, ``ranking`` = their sum, one
``core``) in which layout. Nothing is accepted on looks: a binding must reproduce every
output on the model's real activations and on random score tensors (ints exactly).
PKM's additive grid (score = row + column, r = 1) binds as rank 2 with rows ``[s, 1]``,
columns ``[1, s]`` and the identity core.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ...kernels import RETRIEVE_OP, retrieve_reference
from .._graph import (
    VIEW_OPS,
    DataDependence,
    ancestors,
    descendants,
    evaluate_constant,
    fill_meta,
    graph_order,
    in_graph_order,
    is_symint,
    record_values,
    run_widened,
    view_base,
)
from ..lookups import grid_slots, ranked_last, same_selections
from .anchors import LookupAnchors, topk_count, topk_dim, topk_output
from .layouts import Layout, layouts, token_count
from .region import NotALookup, Region, region_between

RANDOM_PROBES = 2
# ops that read rows of a tensor at computed indices: op -> (position of data, of index)
TABLE_READS = {
    torch.ops.aten.index.Tensor: (0, 1),
    torch.ops.aten.embedding.default: (0, 1),
    torch.ops.aten.index_select.default: (0, 2),
    torch.ops.aten.gather.default: (0, 2),
    torch.ops.aten.take_along_dim.default: (0, 1),
    torch.ops.aten.embedding_bag.default: (0, 1),
    torch.ops.aten.embedding_bag.padding_idx: (0, 1),
    torch.ops.aten._embedding_bag.default: (0, 1),
}


@dataclass
class ScoreSide:
    """One side's score tensor: ``node`` (its ``side`` of a joint tensor, if joint), viewed
    as [T, H, n, r] by ``layout`` (additive: [T, H, n], rank 1)."""

    node: Node
    side: tuple[int, int] | None
    layout: Layout

    def value(self, x: Tensor) -> Tensor:
        return x.select(*self.side) if self.side else x


@dataclass(frozen=True)
class Output:
    """A selection output: ``kind`` of the op's outputs, in ``layout``."""

    node: Node
    kind: str  # slot, row, col, scores, ranking, core<c>
    layout: Layout


@dataclass
class SelectionBinding:
    lookup: LookupAnchors
    rows: ScoreSide
    cols: ScoreSide
    heads: int
    n: int
    rank: int
    topm: int
    topk: int
    row_weight: Tensor
    col_weight: Tensor
    cores: Tensor
    additive: bool
    broadcast: bool  # one score tensor read by every head
    outputs: list[Output] = field(default_factory=list)
    verified_max_abs: float = 0.0
    rows_second: bool = False  # the rows are the second candidate (or side): parity reads so
    rows_outer: bool = True  # the model's grid has the rows as its outer axis: parity reads so
    # the model's own activation of the selected scores, taken into the op when every use
    # of them goes through it: (activation, the node it replaces per float output)
    activation: str = "none"
    # an absorbed activation: output node -> (the activation's node, its layout)
    activated: dict[Node, tuple[Node, Layout]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "heads": self.heads,
            "n_keys": self.n,
            "tucker_rank": 1 if self.additive else self.rank,
            "cores": int(self.cores.shape[0]),
            "topm": self.topm,
            "topk": self.topk,
            "scores": "additive (row + column)" if self.additive else "Tucker",
            "outputs": sorted({o.kind for o in self.outputs}),
            "rows_second": self.rows_second,
            "grid": "rows outer" if self.rows_outer else "rows inner",
            "activation": self.activation,
        }

    def canonical(self, side: ScoreSide, x: Tensor) -> Tensor:
        sizes = {"h": self.heads} if self.broadcast else None
        y = side.layout.canonical(side.value(x), sizes)
        if not self.additive:
            return y
        y = y.unsqueeze(-1)
        ones = torch.ones_like(y)
        return torch.cat([y, ones] if side is self.rows else [ones, y], dim=-1)

    def run(self, rows: Tensor, cols: Tensor, activation: str = "none") -> tuple[Tensor, Tensor]:
        """The op on canonical views of the score tensors: (scores [T,H,k,M], slots)."""
        return retrieve_reference(
            self.canonical(self.rows, rows), self.canonical(self.cols, cols), self.row_weight,
            self.col_weight, self.cores, self.topm, self.topk, activation,
        )  # fmt: skip


def output_value(kind: str, scores: Tensor, slots: Tensor, n: int) -> Tensor:
    """The canonical value of a selection output of ``kind``."""
    if kind == "slot":
        return slots
    if kind == "row":
        return slots // n
    if kind == "col":
        return slots % n
    if kind == "scores":
        return scores
    if kind == "ranking":
        return scores.sum(-1)
    return scores[..., int(kind.removeprefix("core"))]


# ---- finding the outputs and the score tensors ---------------------------------------------


def _position_nodes(final: Node) -> set[Node]:
    """The final top-k's positions and what is computed from them alone (``pos // m``)."""
    idx = topk_output(final, 1)
    if idx is None:
        return set()
    positions, stack = {idx}, list(idx.users)
    data = DataDependence(final.graph)
    while stack:
        node = stack.pop()
        if node in positions or node.op != "call_function":
            continue
        others = [i for i in node.all_input_nodes if i not in positions]
        if all(is_symint(i) or not data(i) for i in others):
            positions.add(node)
            stack.extend(node.users)
    return positions


def selection_outputs(lookup: LookupAnchors) -> list[Node]:
    """The nodes the rest of the graph reads the selection through, in graph order."""
    final = lookup.final
    order = graph_order(final.graph)
    positions = _position_nodes(final)
    values = topk_output(final, 0)
    outputs = [values] if values is not None and values.users else []
    outputs += [u for p in positions for u in p.users if u not in positions and u.op != "output"]
    if any(u.op == "output" for p in positions for u in p.users):
        raise NotALookup(f"the model returns the grid positions of {final.name}")
    after = descendants([final])
    for out in outputs:
        late = [i for i in out.all_input_nodes if i in after and i not in positions and i != values]
        if out is not values and late:
            raise NotALookup(
                f"{out.name} combines the selection of {final.name} with {late[0].name}, "
                "computed after it"
            )
    return in_graph_order(set(outputs), order)


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


def score_sources(lookup: LookupAnchors) -> list[tuple[list[Node], bool]]:
    """The ways the score tensors may be read (one per candidate top-k) and whether the grid
    is additive: a tensor the candidates gather from (a Tucker grid, or the sum of the two
    gathered sides), or the candidate top-ks' own inputs when their values are the scores."""
    options = []
    gathered = [_gathered_source(c, lookup.final) for c in lookup.candidates]
    if all(g is not None for g in gathered):
        found = [g for g in gathered if g is not None]
        options += [(found, False), (found, True)]
    if all(topk_output(c, 0) is not None for c in lookup.candidates):
        options.append(([c.args[0] for c in lookup.candidates], True))
    if not options:
        name = lookup.candidates[0].name
        raise NotALookup(f"no score tensor is gathered at the indices of {name}")
    return options


# ---- hypotheses ----------------------------------------------------------------------------


def _weights_on_path(gm: GraphModule, sources: list[Node], target: Node) -> list[Tensor]:
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


def _cores(weights: list[Tensor], heads: int, rank: int) -> list[Tensor]:
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
    return out


def _side_layouts(
    node: Node,
    side: tuple[int, int] | None,
    n: int,
    additive: bool,
    token_sizes: frozenset[int],
) -> list[Layout]:
    """Ways to view one side's score tensor as [T, H, n, r] (additive: [T, H, n])."""
    shape = list(node.meta["val"].shape)
    if side is not None:
        del shape[side[0]]
    out = []
    statics = [s for s in shape if isinstance(s, int)]
    # real head dims before folding heads into tokens (H = 1), which also reproduces a
    # selection but leaves no head for the aggregation to pool apart; a size the example's
    # batch or sequence has is more likely tokens than heads, but only in a capture with
    # static shapes: where a dim is symbolic, that dim is the tokens
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


def _sizes(layout: Layout, node: Node, side: tuple[int, int] | None) -> dict[str, int]:
    shape = list(node.meta["val"].shape)
    if side is not None:
        del shape[side[0]]
    return {r: int(shape[d]) for d, r in enumerate(layout.roles) if r not in ("t", "*")}


def _sides(lookup: LookupAnchors, sources: list[Node]) -> list[tuple[Node, tuple[int, int] | None]]:
    if not lookup.joint:
        return [(s, None) for s in sources]
    (source,) = sources
    side_dim = lookup.side_dim
    shape = source.meta["val"].shape
    if side_dim is None or side_dim >= len(shape) or shape[side_dim] != 2:
        sides = [d for d, s in enumerate(shape) if s == 2]
        side_dim = sides[-1] if sides else None
    if side_dim is None:
        raise NotALookup(f"{source.name} holds no dim of 2 sides for {lookup.candidates[0].name}")
    return [(source, (side_dim, 0)), (source, (side_dim, 1))]


# ---- binding -------------------------------------------------------------------------------


def token_sizes(example: tuple[Any, ...]) -> frozenset[int]:
    """Sizes the example's batch and sequence give a token dim (b, l, b·l)."""
    first = next((x for x in example if isinstance(x, Tensor) and x.dim() >= 2), None)
    if first is None:
        return frozenset()
    batch, seq = int(first.shape[0]), int(first.shape[1])
    return frozenset({batch, seq, batch * seq})


def bind_selection(
    gm: GraphModule, lookup: LookupAnchors, example: tuple[Any, ...]
) -> tuple[SelectionBinding, Region]:
    outputs = selection_outputs(lookup)
    if not outputs:
        raise NotALookup(f"nothing reads the selection of {lookup.name}")
    topm = topk_count(lookup.candidates[0])
    if any(topk_count(c) != topm for c in lookup.candidates):
        raise NotALookup(f"row and column keep different candidate counts in {lookup.name}")
    cand_inputs = [c.args[0] for c in lookup.candidates]
    n = int(cand_inputs[0].meta["val"].shape[topk_dim(lookup.candidates[0])])
    topk = topk_count(lookup.final)
    tokens = token_sizes(example)
    tried = 0
    for sources, additive in score_sources(lookup):
        distinct = list(dict.fromkeys(sources))
        region = region_between(gm, distinct, outputs, f"the selection ending at {lookup.name}")
        wanted = {*distinct, *outputs, *region.extra_inputs, *cand_inputs}
        wanted |= {*lookup.candidates, lookup.final}
        real = record_values(gm, example, wanted)
        module = region.module(gm)
        extras = [real[e] for e in region.extra_inputs]
        gen = torch.Generator().manual_seed(0)
        probes = [([real[s] for s in distinct], [real[o] for o in outputs])]
        for _ in range(RANDOM_PROBES):
            xs = [torch.randn(real[s].shape, generator=gen).to(real[s].dtype) for s in distinct]
            with torch.no_grad():
                ys = run_widened(module, *xs, *extras)
            probes.append((xs, list(ys)))
        sides = _sides(lookup, sources)
        for swapped, (row_side, col_side) in enumerate([sides, sides[::-1]]):
            for binding in _hypotheses(
                gm, lookup, row_side, col_side, additive, n, topm, topk, real, tokens
            ):
                tried += 1
                error = _verify(binding, outputs, probes, distinct)
                if error is not None:
                    binding.verified_max_abs = error
                    binding.rows_second = bool(swapped)
                    binding.rows_outer = _rows_outer(lookup, binding, real, n)
                    _absorb_activation(gm, binding, distinct, probes, example)
                    return binding, region
    raise NotALookup(
        f"no binding of ultramem::retrieve reproduces the selection ending at {lookup.name} "
        f"({tried} hypotheses: the scores are not a Tucker or additive grid of two sides)"
    )


def _hypotheses(
    gm: GraphModule,
    lookup: LookupAnchors,
    row_side: tuple[Node, tuple[int, int] | None],
    col_side: tuple[Node, tuple[int, int] | None],
    additive: bool,
    n: int,
    topm: int,
    topk: int,
    real: dict[Node, Any],
    tokens: frozenset[int],
) -> Iterator[SelectionBinding]:
    final = lookup.final
    (row_node, row_sel), (col_node, col_sel) = row_side, col_side
    if additive:
        weights: list[Tensor] = []
        core_weights: list[Tensor] = []
    else:
        weights = _weights_on_path(gm, [row_node], lookup.candidates[0].args[0])
        if not lookup.joint:
            weights += _weights_on_path(gm, [col_node], lookup.candidates[-1].args[0])
        core_weights = _weights_on_path(gm, list(lookup.candidates), final.args[0])
    col_layouts = _side_layouts(col_node, col_sel, n, additive, tokens)
    for row_layout, col_layout in itertools.product(
        _side_layouts(row_node, row_sel, n, additive, tokens), col_layouts
    ):
        r_sizes = _sizes(row_layout, row_node, row_sel)
        c_sizes = _sizes(col_layout, col_node, col_sel)
        rank, heads = r_sizes.get("r", 1), r_sizes.get("h", 1)
        if (c_sizes.get("r", 1), c_sizes.get("h", 1)) != (rank, heads):
            continue
        head_counts = [heads]
        if heads == 1 and not additive:  # no head dim: maybe one tensor read by H heads
            counts = {w.numel() // rank for w in weights if w.numel() % rank == 0}
            head_counts += sorted(counts - {0, 1})
        rows = ScoreSide(row_node, row_sel, row_layout)
        cols = ScoreSide(col_node, col_sel, col_layout)
        for h in head_counts:
            broadcast = h != heads
            if additive:
                yield SelectionBinding(
                    lookup, rows, cols, h, n, 2, topm, topk,
                    torch.tensor([[1.0, 0.0]]).repeat(h, 1),
                    torch.tensor([[0.0, 1.0]]).repeat(h, 1),
                    torch.eye(2).repeat(1, h, 1, 1), True, broadcast,
                )  # fmt: skip
                continue
            us = _matching_vectors(rows, weights, h, rank, real, lookup.candidates[0], broadcast, n)
            vs = _matching_vectors(
                cols, weights, h, rank, real, lookup.candidates[-1], broadcast, n
            )
            for u, v, cores in itertools.product(us, vs, _cores(core_weights, h, rank)):
                yield SelectionBinding(
                    lookup, rows, cols, h, n, rank, topm, topk, u, v, cores, False, broadcast
                )


def _matching_vectors(
    side: ScoreSide,
    weights: list[Tensor],
    heads: int,
    rank: int,
    real: dict[Node, Any],
    candidate: Node,
    broadcast: bool,
    n: int,
) -> list[Tensor]:
    """Rank-1 vectors whose merge of this side's real scores is what the candidate top-k
    ranks (found in some layout of its input): the pruning that keeps hypotheses few."""
    scores = side.layout.canonical(side.value(real[side.node]), {"h": heads} if broadcast else None)
    ranked = real[candidate.args[0]]
    out = []
    for u in _vectors(weights, heads, rank):
        merged = (scores.float() * u[None, :, None, :]).sum(-1)  # [T, H, n]
        known = any(torch.equal(u, o) for o in out)
        if not known and _appears_in(merged, ranked, heads, n):
            out.append(u)
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


def _verify(
    binding: SelectionBinding,
    outputs: list[Node],
    probes: list[tuple[list[Tensor], list[Tensor]]],
    distinct: list[Node],
) -> float | None:
    """Max abs error of the float outputs over the probes if every output is reproduced by
    some (kind, layout), found on the real probe and kept for the others; else None."""
    worst = 0.0
    matched: list[Output] = []
    for i, (xs, expected) in enumerate(probes):
        values = dict(zip(distinct, xs, strict=True))
        try:
            with torch.no_grad():
                scores, slots = binding.run(values[binding.rows.node], values[binding.cols.node])
        except (ValueError, RuntimeError, IndexError):  # shapes the op refuses
            return None
        for j, (node, want) in enumerate(zip(outputs, expected, strict=True)):
            if i == 0:
                found = _match(node, want, scores, slots, binding)
                if found is None:
                    return None
                matched.append(found)
            out = matched[j]
            got = out.layout.model(
                output_value(out.kind, scores, slots, binding.n), list(want.shape)
            )
            ok, error = _close(got, want)
            if not ok:
                return None
            worst = max(worst, error)
    binding.outputs = matched
    return worst


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}
_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _value_users(node: Node) -> list[Node]:
    """The users that read ``node``'s numbers, not only its dtype or shape."""
    return [u for u in node.users if not _reads_metadata_only(u, node)]


def _reads_metadata_only(user: Node, node: Node) -> bool:
    """``_assert_tensor_metadata``, ``x.type_as(node)``, and casts or views of ``node`` read
    by such ops alone: what torch.export leaves of a ``.float() … .type_as(scores)``."""
    aten = torch.ops.aten
    if user.target is aten._assert_tensor_metadata.default:
        return True
    if user.target is aten.type_as.default:
        return user.args[0] is not node
    if user.target in _CASTS or user.target in VIEW_OPS:
        return bool(user.users) and all(_reads_metadata_only(u, user) for u in user.users)
    return False


def _activation_of(out: Output) -> tuple[str, Node, list[str] | None] | None:
    """The activation every use of a float output goes through (after casts and views):
    ``relu``, or a ``softmax`` along the selections' dim; its node, and the output's roles
    as they reach it (None past a view)."""
    aten = torch.ops.aten
    node, roles = out.node, list(out.layout.roles)
    while len(_value_users(node)) == 1:
        (user,) = _value_users(node)
        if user.target in _CASTS:
            pass
        elif user.target is aten.permute.default:
            roles = [roles[d] for d in user.args[1]] if roles is not None else None
        elif user.target is aten.transpose.int and roles is not None:
            a, b = (int(d) % len(roles) for d in user.args[1:3])
            roles[a], roles[b] = roles[b], roles[a]
        elif user.target in VIEW_OPS:
            roles = None  # still elementwise-equivalent, but which dim is which is lost
        else:
            break
        node = user
    if len(_value_users(node)) != 1:
        return None
    (user,) = _value_users(node)
    if user.target is aten.relu.default:
        return "relu", user, roles
    if user.target not in _SOFTMAX or out.kind == "ranking" or roles is None:
        return None
    if roles[int(user.args[1]) % len(roles)] == "k":
        return "softmax", user, roles
    return None


def _rows_outer(lookup: LookupAnchors, b: SelectionBinding, real: dict[Node, Any], n: int) -> bool:
    """Whether the model's grid has the rows as its outer axis: the decomposition of the
    final top-k's positions that gives the op's slots on the model's own activations."""
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


def _absorb_activation(
    gm: GraphModule,
    b: SelectionBinding,
    distinct: list[Node],
    probes: list[tuple[list[Tensor], list[Tensor]]],
    example: tuple[Any, ...],
) -> None:
    """Take the model's activation into the op when every float output goes through the
    same one, proven like the rest: the op's activated scores reproduce the activation's
    own outputs on every probe."""
    floats = [o for o in b.outputs if o.kind not in ("slot", "row", "col")]
    found = [_activation_of(o) for o in floats]
    if not floats or any(f is None for f in found) or len({f[0] for f in found}) != 1:  # type: ignore[index]
        return
    activation = found[0][0]  # type: ignore[index]
    nodes = [f[1] for f in found]  # type: ignore[index]
    try:
        region = region_between(gm, distinct, nodes, "the activation of the selected scores")
    except NotALookup:
        return
    module = region.module(gm)
    sizes = record_values(gm, example, set(region.extra_inputs))
    extras = [sizes[e] for e in region.extra_inputs]
    found_layouts: list[Layout | None] = [None] * len(floats)
    for xs, _ in probes:
        values = dict(zip(distinct, xs, strict=True))
        with torch.no_grad():
            expected = run_widened(module, *xs, *extras)
            scores, slots = b.run(values[b.rows.node], values[b.cols.node], activation)
        for i, (out, want) in enumerate(zip(floats, expected, strict=True)):
            # the activation's dims are the output's moved by the permutes between them
            # (known) or by views (found on the first probe, proven on the rest)
            layout = found_layouts[i] or _layout_of(out, found[i][2], want, scores, slots, b)  # type: ignore[index]
            if layout is None:
                return
            found_layouts[i] = layout
            value = output_value(out.kind, scores, slots, b.n)
            got = layout.model(value, list(want.shape)).to(want.dtype)
            if not _close(got, want)[0]:
                return
    b.activation = activation
    b.activated = {
        o.node: (n, layout)
        for o, n, layout in zip(floats, nodes, found_layouts, strict=True)
        if layout is not None
    }


def _layout_of(
    out: Output,
    roles: list[str] | None,
    want: Tensor,
    scores: Tensor,
    slots: Tensor,
    b: SelectionBinding,
) -> Layout | None:
    if roles is not None:
        return Layout(tuple(roles), out.layout.named)
    return _match_kind(out.kind, want, scores, slots, b)


def _match(
    node: Node, want: Tensor, scores: Tensor, slots: Tensor, b: SelectionBinding
) -> Output | None:
    m = scores.shape[-1]
    if want.dtype.is_floating_point:
        kinds = ["scores", "ranking", *(f"core{c}" for c in range(m) if m > 1)]
    else:
        kinds = ["slot", "row", "col"]
    for kind in kinds:
        layout = _match_kind(kind, want, scores, slots, b)
        if layout is not None:
            return Output(node, kind, layout)
    return None


def _match_kind(
    kind: str, want: Tensor, scores: Tensor, slots: Tensor, b: SelectionBinding
) -> Layout | None:
    """The layout in which the op's ``kind`` output equals ``want``."""
    sizes = {"h": b.heads, "k": b.topk, "c": scores.shape[-1]}
    named = ("h", "k", "c") if kind == "scores" else ("h", "k")
    value = output_value(kind, scores, slots, b.n)
    for layout in layouts(list(want.shape), named, sizes, optional=("h", "c"), star=True):
        try:
            got = layout.model(value, list(want.shape))
        except RuntimeError:
            continue
        if _close(got, want)[0]:
            return layout
    return None


def _close(got: Tensor, want: Tensor) -> tuple[bool, float]:
    if got.shape != want.shape:
        return False, float("inf")
    if not want.dtype.is_floating_point:
        return bool(torch.equal(got.to(want.dtype), want)), 0.0
    got, want = got.float(), want.float()
    ok = bool(torch.allclose(got, want, atol=1e-5, rtol=1e-4))
    return ok, float((got - want).abs().max()) if ok and want.numel() else 0.0


# ---- rewrite -------------------------------------------------------------------------------


def fuse_selection(gm: GraphModule, b: SelectionBinding, prefix: str) -> Node:
    """Insert the retrieve call and route every output to it; return the call's node."""
    graph = gm.graph
    order = graph_order(graph)
    first = min(b.outputs, key=lambda o: order[o.node]).node

    def constant(suffix: str, value: Tensor) -> Node:
        gm.register_buffer(f"{prefix}_{suffix}", value.detach().clone().contiguous())
        return graph.get_attr(f"{prefix}_{suffix}")

    dtype = b.rows.node.meta["val"].dtype
    with graph.inserting_before(first):
        sides = []
        for side in (b.rows, b.cols):
            x = side.node
            if side.side is not None:
                x = graph.call_function(torch.ops.aten.select.int, (x, *side.side))
                x.meta["val"] = side.node.meta["val"].select(*side.side)
            x = side.layout.canonical_node(graph, x, {"h": b.heads} if b.broadcast else None)
            if b.additive:
                x = graph.call_function(torch.ops.aten.unsqueeze.default, (x, -1))
                # contiguous: "preserve" strides of a permuted symbolic tensor put guards
                # on the sizes (Mod(Min(32, 32*s), ...) != 0) that refuse batch 1, tokens 1
                ones = graph.call_function(
                    torch.ops.aten.ones_like.default,
                    (x,),
                    {"memory_format": torch.contiguous_format},
                )
                x = graph.call_function(
                    torch.ops.aten.cat.default, ([x, ones] if side is b.rows else [ones, x], -1)
                )
            sides.append(x)
        weights = [
            constant(s, w.to(dtype))
            for s, w in (("u", b.row_weight), ("v", b.col_weight), ("cores", b.cores))
        ]
        call = graph.call_function(RETRIEVE_OP, (*sides, *weights, b.topm, b.topk, b.activation))
        scores = graph.call_function(operator.getitem, (call, 0))
        slots = graph.call_function(operator.getitem, (call, 1))
        for out in b.outputs:
            value = {"slot": slots, "scores": scores}.get(out.kind)
            if out.kind == "row":
                value = graph.call_function(torch.ops.aten.floor_divide.default, (slots, b.n))
            elif out.kind == "col":
                value = graph.call_function(torch.ops.aten.remainder.Scalar, (slots, b.n))
            elif out.kind == "ranking":
                value = graph.call_function(torch.ops.aten.sum.dim_IntList, (scores, [-1]))
            elif out.kind.startswith("core"):
                value = graph.call_function(
                    torch.ops.aten.select.int, (scores, -1, int(out.kind[4:]))
                )
            # an absorbed activation: its node takes the op's activated scores
            target, layout = b.activated.get(out.node, (out.node, out.layout))
            shape = list(target.meta["val"].shape)
            replacement = layout.model_node_like(gm, value, target, first, shape)
            dtype_out = target.meta["val"].dtype
            if dtype_out != (torch.int64 if out.kind in ("slot", "row", "col") else dtype):
                replacement = graph.call_function(torch.ops.aten.to.dtype, (replacement, dtype_out))
            target.replace_all_uses_with(replacement)
            if target is not out.node:
                # what is left reads only the dtype or shape (see _reads_metadata_only),
                # which the activated scores share; the raw scores can then go
                shape = list(out.node.meta["val"].shape)
                metadata = out.layout.model_node(gm, value, shape, first)
                if out.node.meta["val"].dtype != dtype:
                    metadata = graph.call_function(
                        torch.ops.aten.to.dtype, (metadata, out.node.meta["val"].dtype)
                    )
                out.node.replace_all_uses_with(metadata)
    fill_meta(gm)
    return call
