"""Table reads at computed indices, and where a fused selection's outputs flow into them.

A *read* takes rows of a tensor at computed indices (``TABLE_READS``); a *value read* is a
read of a float weight table at indices the slot ids of a fused ``retrieve`` reach through
integer ops alone. Value reads anchor an aggregation; their pooling meets at one of their
common post-dominators (``pooled_candidates``).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from .._graph import common_post_dominator, view_base

POST_DOMINATORS = 8
aten = torch.ops.aten
# ops that read rows of a tensor at computed indices: op -> (position of data, of index)
TABLE_READS = {
    aten.index.Tensor: (0, 1),
    aten.embedding.default: (0, 1),
    aten.index_select.default: (0, 2),
    aten.gather.default: (0, 2),
    aten.take_along_dim.default: (0, 1),
    aten.embedding_bag.default: (0, 1),
    aten.embedding_bag.padding_idx: (0, 1),
    aten._embedding_bag.default: (0, 1),
}


def _integer(node: Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return bool(val) and all(isinstance(v, Tensor) and not v.is_floating_point() for v in val)
    return isinstance(val, Tensor) and not val.dtype.is_floating_point and val.dtype != torch.bool


def integer_closure(slots: Node) -> set[Node]:
    """Everything computed from ``slots`` through integer ops alone (the index glue)."""
    out, stack = {slots}, list(slots.users)
    while stack:
        node = stack.pop()
        if node not in out and _integer(node):
            out.add(node)
            stack.extend(node.users)
    return out


def read_indices(read: Node) -> list[Node]:
    """The index tensors of a table read (several for ``table[i, j]``)."""
    if read.target is aten.index.Tensor:
        return [i for i in read.args[1] if isinstance(i, Node)]
    position = TABLE_READS[read.target][1]
    return [read.args[position]] if len(read.args) > position else []


def weight_table(read: Node) -> Node | None:
    """The weight a read takes rows of (through views), if it is one."""
    table = read.args[0]
    if not isinstance(table, Node):
        return None
    base = view_base(table)
    val = base.meta.get("val")
    floating = val is None or val.dtype.is_floating_point
    return table if base.op == "get_attr" and floating else None


def value_reads(gm: GraphModule, sources: list[Node]) -> list[tuple[Node, tuple[Node, ...]]]:
    """(read, the retrieve calls whose slot ids reach it), in graph order."""
    closures = {s: integer_closure(slots_of(s)) for s in sources}
    out = []
    for node in gm.graph.nodes:
        if node.target in TABLE_READS and weight_table(node) is not None:
            indices = read_indices(node)
            reached = tuple(s for s in sources if any(i in closures[s] for i in indices))
            if reached:
                out.append((node, reached))
    return out


def slots_of(retrieve: Node) -> Node:
    """A ``retrieve`` call's slot ids (its output 1), taken once."""
    return _output(retrieve, 1)


def scores_of(retrieve: Node) -> Node:
    """A ``retrieve`` call's per-core scores (its output 0), taken once."""
    return _output(retrieve, 0)


def _output(call: Node, index: int) -> Node:
    found = next(
        (u for u in call.users if u.target is operator.getitem and u.args[1] == index), None
    )
    if found is None:
        with call.graph.inserting_after(call):
            found = call.graph.call_function(operator.getitem, (call, index))
        found.meta["val"] = call.meta["val"][index]
    return found


def pooled_candidates(gm: GraphModule, reads: list[Node]) -> list[Node]:
    """Successive common post-dominators of the reads: a weighted sum written as
    ``(w * rows).sum(k)`` meets at the product, its pooled value is one node later."""
    out: list[Node] = []
    node = common_post_dominator(gm.graph, reads)
    while node is not None and len(out) < POST_DOMINATORS:
        if node.op == "call_function" and isinstance(node.meta.get("val"), Tensor):
            out.append(node)
        node = common_post_dominator(gm.graph, [node])
    return out
