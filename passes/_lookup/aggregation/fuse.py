"""Rewrite a bound aggregation: one ``ultramem::aggregate`` call in place of the pooling."""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ....kernels import AGGREGATE_OP
from ..._graph import fill_meta
from ..layouts import TOKEN
from ..reads import slots_of
from .binding import AggregationBinding, WeightFactor

aten = torch.ops.aten


def fuse_aggregation(gm: GraphModule, b: AggregationBinding, prefix: str) -> Node:
    """Insert the aggregate call and route the pooled node to it; return the call."""
    graph = gm.graph
    pooled = b.pooled

    def constant(suffix: str, value: Tensor) -> Node:
        gm.register_buffer(f"{prefix}_{suffix}", value.detach().clone().contiguous())
        return graph.get_attr(f"{prefix}_{suffix}")

    heads = b.total_heads
    with graph.inserting_before(pooled):
        if b.values is not None:
            table = constant("values", b.values)
        else:
            table = b.table
            if len(table.meta["val"].shape) > 2:  # a table per head: rows h·R + r
                table = graph.call_function(
                    aten.reshape.default, (table, [-1, table.meta["val"].shape[-1]])
                )
        slots = [slots_of(s) for s in b.sources]
        merged = slots[0] if len(slots) == 1 else graph.call_function(aten.cat.default, (slots, 1))
        parts = []
        for f in b.factors:
            x = graph.call_function(aten.reshape.default, (f.node, _split_args(gm, f)))
            parts.append(f.layout.canonical_node(graph, x, {"h": heads}, f.split))
        if not parts:
            weights = graph.call_function(
                aten.ones_like.default,
                (merged,),
                {"dtype": torch.float32, "memory_format": torch.contiguous_format},
            )
            weights = graph.call_function(aten.unsqueeze.default, (weights, -1))
        elif b.per_core:
            weights = graph.call_function(aten.cat.default, (parts, -1))
        else:
            weights = parts[0]
            for p in parts[1:]:
                weights = graph.call_function(aten.mul.Tensor, (weights, p))
        dtype = (b.values if b.values is not None else b.table.meta["val"]).dtype  # type: ignore[union-attr]
        if any(f.node.meta["val"].dtype != dtype for f in b.factors) or not b.factors:
            weights = graph.call_function(aten.to.dtype, (weights, dtype))
        row_map = constant("row_map", b.row_map) if b.row_map is not None else None
        group_map = constant("group_map", b.group_map) if b.group_map is not None else None
        call = graph.call_function(
            AGGREGATE_OP, (table, weights, merged, row_map, group_map, b.groups, b.pooling)
        )
        view = graph.call_function(aten.reshape.default, (call, [-1, *b.pooled_shape]))
        shape = list(pooled.meta["val"].shape)
        out = b.pooled_layout.model_node_like(gm, view, pooled, pooled, shape)
    pooled.replace_all_uses_with(out)
    fill_meta(gm)
    return call


def _split_args(gm: GraphModule, f: WeightFactor) -> list[object]:
    """``f.split`` for ``reshape``: static sizes as they are, a token sub-dim as the node's
    own (symbolic) size divided by the static sizes beside it (-1 when it is the only one)."""
    graph, shape = gm.graph, list(f.node.meta["val"].shape)
    tokens = [(d, i) for d, dim in enumerate(f.subs) for i, (r, _) in enumerate(dim) if r == TOKEN]
    symbolic = [(d, i) for d, i in tokens if not isinstance(shape[d], int)]
    if len(symbolic) <= 1:
        return [
            -1 if (d, i) in symbolic else size
            for d, dim in enumerate(f.subs)
            for i, (_, size) in enumerate(dim)
        ]
    out: list[object] = []
    for d, dim in enumerate(f.subs):
        for i, (_, size) in enumerate(dim):
            if (d, i) not in symbolic:
                out.append(size)
                continue
            others = math.prod(s for j, (_, s) in enumerate(dim) if j != i)
            with graph.inserting_before(f.node.next):
                whole = graph.call_function(aten.sym_size.int, (f.node, d))
                part = (
                    graph.call_function(operator.floordiv, (whole, others)) if others > 1 else whole
                )
            out.append(part)
    return out
