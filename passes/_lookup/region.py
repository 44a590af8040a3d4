"""Find a memory lookup in an ATen graph by what it computes, not by names.

Anchors, in any module structure:

- a *final* top-k whose input depends on the indices of two other top-ks (the row and
  column candidates) and on no nearer top-k;
- the *score tensors* ``S_row``/``S_col``: what each candidate top-k's indices gather
  from, and that its own input was computed from (a = S · u);
- the *value tables*: weights read at indices that depend on the final top-k (one
  shared table, or one per core);
- the *pooled output* ``P``: a node every path from the selection and the value reads
  to the model's output crosses (the first such, or one of the next few).

The region is every node between the score tensors and ``P``. A region that reads any
activation besides the score tensors is not a lookup we can bind, and is refused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from .._graph import (
    SHAPE_ONLY_OPS,
    VIEW_OPS,
    ancestors,
    common_post_dominator,
    depends_on_data,
    descendants,
    is_symint,
    mutations,
)

TOPK = torch.ops.aten.topk.default
# ops that read rows of a table at computed indices: (op, position of the table, of the index)
_TABLE_READS = {
    torch.ops.aten.index.Tensor: (0, 1),
    torch.ops.aten.embedding.default: (0, 1),
    torch.ops.aten.index_select.default: (0, 2),
    torch.ops.aten.gather.default: (0, 2),
    torch.ops.aten.embedding_bag.default: (0, 1),
    torch.ops.aten.embedding_bag.padding_idx: (0, 1),
    torch.ops.aten._embedding_bag.default: (0, 1),
}


class NotALookup(Exception):
    """The anchors were found but the sub-graph between them cannot be bound; says why."""


@dataclass
class LookupRegion:
    final_topk: Node
    row_topk: Node
    col_topk: Node
    row_scores: Node
    col_scores: Node
    value_tables: list[Node]
    pooled: Node
    nodes: set[Node]
    # besides the score tensors: symbolic sizes, and tensors read only for their shape
    other_inputs: list[Node]
    weights: list[Node]
    # PKM: the candidates' own top-k values are the scores (no tensor is gathered) and
    # the grid is their sum; the score tensors are then the candidate top-ks' inputs
    additive: bool = False

    @property
    def name(self) -> str:
        return self.final_topk.name


def topk_indices(topk: Node) -> Node | None:
    return next((u for u in topk.users if u.target is operator.getitem and u.args[1] == 1), None)


def final_topks(graph: Graph) -> list[tuple[Node, Node, Node]]:
    """(final, row, col) top-k triples, in graph order."""
    topks = [n for n in graph.nodes if n.target is TOPK]
    triples = []
    for final in topks:
        anc = ancestors([final])
        inner = [t for t in topks if t in anc]
        # the nearest ones: top-ks in the ancestry that feed no other top-k of it
        nearest = [t for t in inner if not any(t in ancestors([o]) for o in inner if o is not t)]
        if len(nearest) == 2:
            triples.append((final, nearest[0], nearest[1]))
    return triples


def _gathered_source(topk: Node) -> Node:
    """The tensor the candidate indices gather from, which also produced the top-k input.

    The gather may read a view of it (an ``expand`` per head, a second ``S[0]``): views
    are followed back to a tensor the top-k's input was computed from.
    """
    idx = topk_indices(topk)
    if idx is None:
        raise NotALookup(f"the indices of {topk.name} are never used")
    produced_input = ancestors([topk.args[0]]) | {topk.args[0]}
    for user in descendants([idx]):
        if user.target not in _TABLE_READS:
            continue
        src = user.args[0]
        while isinstance(src, Node):
            if src in produced_input:
                return src
            if src.op != "call_function" or src.target not in VIEW_OPS:
                break
            src = src.args[0]
    raise NotALookup(f"no score tensor is gathered at the indices of {topk.name}")


def _score_tensors(row: Node, col: Node) -> tuple[Node, Node, bool]:
    try:
        return _gathered_source(row), _gathered_source(col), False
    except NotALookup:
        values_used = all(
            any(u.target is operator.getitem and u.args[1] == 0 for u in t.users)
            for t in (row, col)
        )
        if not values_used:
            raise
        return row.args[0], col.args[0], True


def value_reads(gm: GraphModule, final: Node) -> list[tuple[Node, Node]]:
    """Float weight tables read at indices derived from the final top-k, in graph order."""
    after = descendants([final])
    # reads behind a later top-k belong to a later lookup
    later = descendants([n for n in after if n.target is TOPK])
    reads = []
    for node in gm.graph.nodes:
        if node in after and node not in later and node.target in _TABLE_READS:
            table = node.args[0]
            if isinstance(table, Node) and table.op == "get_attr":
                val = table.meta.get("val")
                if val is None or val.dtype.is_floating_point:
                    reads.append((table, node))
    if not reads:
        raise NotALookup(f"no weight table is read at indices derived from {final.name}")
    return reads


def pooled_candidates(gm: GraphModule, final: Node, limit: int = 4) -> list[Node]:
    """Successive common post-dominators of the selection and the value reads.

    The first is where every path from them meets; a weighted sum written as
    ``(w * rows).sum(k)`` meets at the product, and its pooled value is one node later.
    """
    reads = [read for _, read in value_reads(gm, final)]
    out: list[Node] = []
    node = common_post_dominator(gm.graph, [final, *reads])
    while node is not None and len(out) < limit:
        out.append(node)
        node = common_post_dominator(gm.graph, [node])
    return out


def find_region(gm: GraphModule, final: Node, row: Node, col: Node, pooled: Node) -> LookupRegion:
    row_scores, col_scores, additive = _score_tensors(row, col)
    reads = [(t, r) for t, r in value_reads(gm, final) if r in ancestors([pooled])]
    if not reads:
        raise NotALookup(f"{pooled.name} reads no value table")
    boundary = {row_scores, col_scores}
    inside = descendants(boundary) & (ancestors([pooled]) | {pooled})
    inside -= boundary
    # Weight-only maths and shape-only buffers the region reads (what folding left, a
    # view of a table, ``x.new_zeros(...)`` to pool into) belong to it; a buffer some op
    # writes in place does not, since its value is not what its creation says, unless
    # every write is the region's own (``x.new_zeros(...).scatter_(...)``).
    writers = mutations(gm.graph)
    data: dict[Node, bool] = {}
    pending = [i for n in inside for i in n.all_input_nodes if i.op == "call_function"]
    while pending:
        node = pending.pop()
        if node in inside or node in boundary or is_symint(node):
            continue
        if any(w not in inside for w in writers.get(node, ())):
            continue
        if not depends_on_data(node, data):
            inside.add(node)
            pending.extend(i for i in node.all_input_nodes if i.op == "call_function")
    symints, weights, shape_inputs = [], [], []
    externals = {i for n in inside for i in n.all_input_nodes if i not in inside}
    for ext in sorted(externals - boundary, key=lambda n: n.name):
        if ext.op == "get_attr":
            weights.append(ext)
        elif is_symint(ext):
            symints.append(ext)
        elif all(u.target in SHAPE_ONLY_OPS and u.args[0] is ext for u in ext.users if u in inside):
            shape_inputs.append(ext)
        else:
            raise NotALookup(
                f"the lookup ending at {final.name} also reads {ext.name}, which is neither "
                "a score tensor nor a weight"
            )
    return LookupRegion(
        final,
        row,
        col,
        row_scores,
        col_scores,
        [t for t, _ in reads],
        pooled,
        inside,
        symints + shape_inputs,
        weights,
        additive,
    )
