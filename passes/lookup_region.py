"""Find a memory lookup in an ATen graph by what it computes, not by names.

Anchors, in any module structure:

- a *final* top-k whose input depends on the indices of two other top-ks (the row and
  column candidates) and on no nearer top-k;
- the *score tensors* ``S_row``/``S_col``: what each candidate top-k's indices gather
  from, and that its own input was computed from (a = S · u);
- the *value table*: a weight read at indices that depend on the final top-k;
- the *pooled output* ``P``: the first node every path from the selection and the value
  read to the model's output crosses.

The region is every node between the score tensors and ``P``. A region that reads any
activation besides the score tensors is not a lookup we can bind, and is refused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from ultramem.passes.graph_utils import (
    ancestors,
    common_post_dominator,
    descendants,
    is_symint,
)

TOPK = torch.ops.aten.topk.default
# ops that read rows of a table at computed indices: (op, position of the table, of the index)
_TABLE_READS = {
    torch.ops.aten.index.Tensor: (0, 1),
    torch.ops.aten.embedding.default: (0, 1),
    torch.ops.aten.index_select.default: (0, 2),
    torch.ops.aten.gather.default: (0, 2),
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
    value_table: Node
    table_read: Node
    pooled: Node
    nodes: set[Node]
    symint_inputs: list[Node]
    weights: list[Node]

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
    """The tensor the candidate indices gather from, which also produced the top-k input."""
    idx = topk_indices(topk)
    if idx is None:
        raise NotALookup(f"the indices of {topk.name} are never used")
    produced_input = ancestors([topk.args[0]]) | {topk.args[0]}
    for user in descendants([idx]):
        if user.target in _TABLE_READS or user.target is torch.ops.aten.gather.default:
            src = user.args[0]
            if isinstance(src, Node) and src in produced_input:
                return src
    raise NotALookup(f"no score tensor is gathered at the indices of {topk.name}")


def _value_read(gm: GraphModule, final: Node) -> tuple[Node, Node]:
    after = descendants([final])
    for node in gm.graph.nodes:
        if node in after and node.target in _TABLE_READS:
            table = node.args[0]
            if isinstance(table, Node) and table.op == "get_attr":
                val = table.meta.get("val")
                if val is None or val.dtype.is_floating_point:
                    return table, node
    raise NotALookup(f"no weight table is read at indices derived from {final.name}")


def find_region(gm: GraphModule, final: Node, row: Node, col: Node) -> LookupRegion:
    row_scores, col_scores = _gathered_source(row), _gathered_source(col)
    table, read = _value_read(gm, final)
    pooled = common_post_dominator(gm.graph, [final, read])
    if pooled is None:
        raise NotALookup(f"the lookup ending at {final.name} has no single output")
    inside = descendants([row_scores, col_scores]) & (ancestors([pooled]) | {pooled})
    inside -= {row_scores, col_scores}
    # weight-only maths the region reads (what folding left, e.g. a view of a table)
    pending = [i for n in inside for i in n.all_input_nodes if i.op == "call_function"]
    while pending:
        node = pending.pop()
        if node not in inside and node not in (row_scores, col_scores) and _weight_only(node):
            inside.add(node)
            pending.extend(i for i in node.all_input_nodes if i.op == "call_function")
    symints, weights = [], []
    externals = {i for n in inside for i in n.all_input_nodes if i not in inside}
    for ext in sorted(externals - {row_scores, col_scores}, key=lambda n: n.name):
        if ext.op == "get_attr":
            weights.append(ext)
        elif is_symint(ext):
            symints.append(ext)
        else:
            raise NotALookup(
                f"the lookup ending at {final.name} also reads {ext.name}, which is neither "
                "a score tensor nor a weight"
            )
    return LookupRegion(
        final, row, col, row_scores, col_scores, table, read, pooled, inside, symints, weights
    )


def _weight_only(node: Node) -> bool:
    """Computed from weights alone (no model input reaches it)."""
    return not any(a.op == "placeholder" for a in ancestors([node]))
