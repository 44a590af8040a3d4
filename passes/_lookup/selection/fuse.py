"""Rewrite a bound selection: one ``ultramem::retrieve`` call, every output a view of it."""

from __future__ import annotations

import operator

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ....kernels import RETRIEVE_OP
from ..._graph import fill_meta, graph_order
from .binding import OutputKind, SelectionBinding

aten = torch.ops.aten


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
                x = graph.call_function(aten.select.int, (x, *side.side))
                x.meta["val"] = side.node.meta["val"].select(*side.side)
            x = side.layout.canonical_node(graph, x, {"h": b.heads} if b.broadcast else None)
            if b.additive:
                x = graph.call_function(aten.unsqueeze.default, (x, -1))
                # contiguous: "preserve" strides of a permuted symbolic tensor put guards
                # on the sizes (Mod(Min(32, 32*s), ...) != 0) that refuse batch 1, tokens 1
                ones = graph.call_function(
                    aten.ones_like.default, (x,), {"memory_format": torch.contiguous_format}
                )
                x = graph.call_function(
                    aten.cat.default, ([x, ones] if side is b.rows else [ones, x], -1)
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
            value = _output_node(graph, out.kind, scores, slots, b.n)
            # an absorbed activation: its node takes the op's activated scores
            target, layout = b.activated.get(out.node, (out.node, out.layout))
            shape = list(target.meta["val"].shape)
            replacement = layout.model_node_like(gm, value, target, first, shape)
            dtype_out = target.meta["val"].dtype
            if dtype_out != (torch.int64 if out.kind in OutputKind.INTEGER else dtype):
                replacement = graph.call_function(aten.to.dtype, (replacement, dtype_out))
            target.replace_all_uses_with(replacement)
            if target is not out.node:
                # what is left reads only the dtype or shape (see reads_metadata_only),
                # which the activated scores share; the raw scores can then go
                shape = list(out.node.meta["val"].shape)
                metadata = out.layout.model_node(gm, value, shape, first)
                if out.node.meta["val"].dtype != dtype:
                    metadata = graph.call_function(
                        aten.to.dtype, (metadata, out.node.meta["val"].dtype)
                    )
                out.node.replace_all_uses_with(metadata)
    fill_meta(gm)
    return call


def _output_node(graph: torch.fx.Graph, kind: str, scores: Node, slots: Node, n: int) -> Node:
    """The op's output of ``kind`` as a node (``output_value`` in the graph)."""
    if kind == OutputKind.SLOT:
        return slots
    if kind == OutputKind.SCORES:
        return scores
    if kind == OutputKind.ROW:
        return graph.call_function(aten.floor_divide.default, (slots, n))
    if kind == OutputKind.COL:
        return graph.call_function(aten.remainder.Scalar, (slots, n))
    if kind == OutputKind.RANKING:
        return graph.call_function(aten.sum.dim_IntList, (scores, [-1]))
    return graph.call_function(aten.select.int, (scores, -1, int(kind.removeprefix("core"))))
