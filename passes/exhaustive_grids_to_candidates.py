"""Give an exhaustive lookup the candidate top-ks of a product-key lookup with m = n.

Rewrite (``_lookup/anchors.py``: a final top-k over the whole n × n outer sum of two score
vectors, no candidate top-k): ``topk((r[..., :, None] + c[..., None, :]).reshape(.., n²), k)``
→ ``vr, ir = topk(r, n)``, ``vc, ic = topk(c, n)``, ``topk((vr[..., :, None] +
vc[..., None, :]).reshape(.., n²), k)`` and slot ids ``ir[pos // n] · n + ic[pos % n]`` in
place of the positions. This is the form ``fuse_memory_lookup`` binds (its op with
topm = n); a Memory+ layer that scores every slot (its fine-tuning code does) then fuses
like any product-key memory.

Constraints: the same grid values, each pair's sum computed by the same add in the same
dtype, only permuted by the candidates' sort: the selected values are the original's;
slots tied exactly may come in another order (as any top-k's). Run before the fusion.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ._graph import fill_meta
from ._lookup.anchors import ExhaustiveGrid, LookupAnchors, find_lookups, topk_output
from .base import PassContext, PassResult, count_nodes, finish

aten = torch.ops.aten


def _candidates(gm: GraphModule, side: Node, dim: int, n: int) -> tuple[Node, Node]:
    """The side's n keys sorted (values, indices), its unit dim squeezed out."""
    graph = gm.graph
    vector = graph.call_function(aten.squeeze.dim, (side, dim))
    ranked = graph.call_function(aten.topk.default, (vector, n, -1))
    return (
        graph.call_function(operator.getitem, (ranked, 0)),
        graph.call_function(operator.getitem, (ranked, 1)),
    )


def _rewrite(gm: GraphModule, lookup: LookupAnchors, grid: ExhaustiveGrid) -> None:
    graph, final, n = gm.graph, lookup.final, grid.n
    with graph.inserting_before(final):
        row_values, row_ids = _candidates(gm, grid.rows, -1, n)
        col_values, col_ids = _candidates(gm, grid.cols, -2, n)
        rows = graph.call_function(aten.unsqueeze.default, (row_values, -1))
        cols = graph.call_function(aten.unsqueeze.default, (col_values, -2))
        summed = graph.call_function(aten.add.Tensor, (rows, cols))
        flat = graph.call_function(grid.flatten.target, (summed, *grid.flatten.args[1:]))
        ranked = graph.call_function(final.target, (flat, *final.args[1:]), dict(final.kwargs))
        values = graph.call_function(operator.getitem, (ranked, 0))
        positions = graph.call_function(operator.getitem, (ranked, 1))
        row_at = graph.call_function(aten.floor_divide.default, (positions, n))
        col_at = graph.call_function(aten.remainder.Scalar, (positions, n))
        row = graph.call_function(aten.gather.default, (row_ids, -1, row_at))
        col = graph.call_function(aten.gather.default, (col_ids, -1, col_at))
        scaled = graph.call_function(aten.mul.Tensor, (row, n))
        slots = graph.call_function(aten.add.Tensor, (scaled, col))
    for index, replacement in ((0, values), (1, slots)):
        old = topk_output(final, index)
        if old is not None:
            old.replace_all_uses_with(replacement)
    # the lookup keeps its name (its final top-k's): parity and rollbacks name it so
    name = final.name
    for user in list(final.users):
        graph.erase_node(user)
    graph.erase_node(final)
    ranked.name = name


def exhaustive_grids_to_candidates(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "exhaustive_grids_to_candidates", nodes_before=count_nodes(gm))
    for lookup in find_lookups(gm.graph):
        if lookup.grid is None:
            continue
        result.matched.append(lookup.name)
        if lookup.name in ctx.skip_layers:
            continue  # its fusion failed parity: the model's own top-k is cheaper
        _rewrite(gm, lookup, lookup.grid)
        result.changed.append(f"{lookup.name}: the {lookup.grid.n}² grid as candidates m = n")
    finish(gm)
    fill_meta(gm)
    result.nodes_after = count_nodes(gm)
    return result
