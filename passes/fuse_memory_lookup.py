"""Fuse each memory lookup into ``ultramem::retrieve`` + ``ultramem::aggregate``.

Rewrite: the sub-graph from the row/column score tensors to the pooled values
(rank-1 merge → top-m → candidate gathers → grid scores → top-k → score activation →
slot mapping → value gather → weighted pooling) → two fused op calls and a reshape.

Constraints: the region is found by its anchors (``lookup_region``), bound by
verified hypotheses (``lookup_binding``), and replaced only when the fused ops reproduce
it on the model's real activations and on random score tensors. A sub-graph that looks
like a lookup but computes something else is left alone and reported, with the reason.
Run after ``fold_constants`` (so that weights reached through SVDs or norms are plain
buffers) and before dead-code removal.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from ._graph import extract_subgraph, record_values
from ._lookup.binding import Binding, Layout, hypotheses, verify
from ._lookup.region import (
    LookupRegion,
    NotALookup,
    final_topks,
    find_region,
    pooled_candidates,
)
from .base import PassContext, PassResult, Refusal, count_nodes, finish

log = logging.getLogger(__name__)

RANDOM_PROBES = 2
_METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}
MAX_HYPOTHESES = 512


def fuse_memory_lookup(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "fuse_memory_lookup", nodes_before=count_nodes(gm))
    triples = final_topks(gm.graph)
    if not triples:
        result.details["note"] = "no memory lookup in this graph: passed through unchanged"
    for final, row, col in triples:
        name = final.name
        result.matched.append(name)
        if name in ctx.skip_layers:
            result.refused.append(Refusal(name, "kept unfused: its fusion failed parity earlier"))
            continue
        try:
            region, binding, error = _find_and_bind(gm, final, row, col, ctx)
            shape = _target_shape(gm, region.pooled)
        except NotALookup as exc:
            result.refused.append(Refusal(name, str(exc)))
            continue
        _replace(gm, region, binding, shape, len(result.changed))
        result.changed.append(name)
        result.details[name] = {**binding.describe(), "verified_max_abs": error}
    finish(gm)
    result.nodes_after = count_nodes(gm)
    log.info("fuse_memory_lookup: fused %d of %d lookups", len(result.changed), len(triples))
    return result


def _find_and_bind(
    gm: GraphModule, final: Node, row: Node, col: Node, ctx: PassContext
) -> tuple[LookupRegion, Binding, float]:
    """Try the candidate outputs in order; the first region a binding reproduces wins."""
    first_error: NotALookup | None = None
    for pooled in pooled_candidates(gm, final):
        try:
            region = find_region(gm, final, row, col, pooled)
            binding, error = _bind(gm, region, ctx)
        except NotALookup as exc:
            first_error = first_error or exc
            continue
        return region, binding, error
    raise first_error or NotALookup(f"the lookup ending at {final.name} has no single output")


def _bind(gm: GraphModule, region: LookupRegion, ctx: PassContext) -> tuple[Binding, float]:
    inputs = [region.row_scores, region.col_scores, *region.other_inputs]
    real = record_values(gm, ctx.example_inputs, {*inputs, region.pooled})
    sub = extract_subgraph(gm, inputs, [region.pooled], region.nodes)
    others = [real[s] for s in region.other_inputs]
    gen = torch.Generator().manual_seed(0)
    probes = [(real[region.row_scores], real[region.col_scores], real[region.pooled])]
    for _ in range(RANDOM_PROBES):
        rs = torch.randn(real[region.row_scores].shape, generator=gen)
        cs = torch.randn(real[region.col_scores].shape, generator=gen)
        with torch.no_grad():
            (pooled,) = sub(rs, cs, *others)
        probes.append((rs, cs, pooled))
    for i, binding in enumerate(hypotheses(gm, region)):
        if i >= MAX_HYPOTHESES:
            break
        error = verify(binding, probes)
        if error is not None:
            return binding, error
    raise NotALookup(
        f"no binding of the fused ops reproduces the sub-graph ending at {region.pooled.name} "
        "(different semantics than an UltraMem lookup, or a variant the ops do not cover)"
    )


def _replace(
    gm: GraphModule, region: LookupRegion, b: Binding, shape: list[object], index: int
) -> None:
    prefix = f"_ultramem_{index}"

    def constant(suffix: str, value: torch.Tensor) -> Node:
        gm.register_buffer(f"{prefix}_{suffix}", value.detach().clone().contiguous())
        return graph.get_attr(f"{prefix}_{suffix}")

    graph = gm.graph
    pooled = region.pooled
    with graph.inserting_before(pooled):
        rows = _canonical(graph, region.row_scores, b.row_layout, b.n)
        cols = _canonical(graph, region.col_scores, b.col_layout, b.n)
        u, v, cores = (
            constant("u", b.row_weight),
            constant("v", b.col_weight),
            constant("cores", b.cores),
        )
        row_map, group_map, groups = b.index_maps()
        rmap = constant("row_map", row_map) if row_map is not None else None
        gmap = constant("group_map", group_map) if group_map is not None else None
        tables = region.value_tables
        values = tables[0] if len(tables) == 1 else constant("values", b.values)
        retrieved = graph.call_function(
            torch.ops.ultramem.retrieve.default,
            (rows, cols, u, v, cores, b.topm, b.topk, b.activation),
        )
        scores = graph.call_function(operator.getitem, (retrieved, 0))
        slots = graph.call_function(operator.getitem, (retrieved, 1))
        agg = graph.call_function(
            torch.ops.ultramem.aggregate.default,
            (values, scores, slots, rmap, gmap, groups, b.pooling),
        )
        out = agg
        if b.heads_first:  # [T, H·E, Dv] -> [H, T, E, Dv]
            out = graph.call_function(torch.ops.aten.view.default, (out, b.pooled_shape()))
            out = graph.call_function(torch.ops.aten.transpose.int, (out, 0, 1))
        out = graph.call_function(torch.ops.aten.reshape.default, (out, shape))
    pooled.replace_all_uses_with(out)
    # dtype/shape assertions on the region's values (``.float()`` leaves one) would keep
    # the replaced nodes alive; they describe values that no longer exist
    for node in region.nodes:
        for user in list(node.users):
            if user.target in _METADATA_ASSERTS and not user.users:
                graph.erase_node(user)


def _canonical(graph: torch.fx.Graph, scores: Node, layout: Layout, n: int) -> Node:
    permuted = graph.call_function(torch.ops.aten.permute.default, (scores, list(layout.perm)))
    heads = 1 if layout.broadcast else layout.heads
    shaped = graph.call_function(
        torch.ops.aten.reshape.default, (permuted, [-1, heads, n, layout.rank])
    )
    if layout.broadcast:
        shaped = graph.call_function(
            torch.ops.aten.expand.default, (shaped, [-1, layout.heads, -1, -1])
        )
    if not layout.additive:
        return shaped
    ones = graph.call_function(torch.ops.aten.ones_like.default, (shaped,))
    pair = [shaped, ones] if layout.additive == "row" else [ones, shaped]
    return graph.call_function(torch.ops.aten.cat.default, (pair, -1))


def _target_shape(gm: GraphModule, pooled: Node) -> list[object]:
    """The pooled node's shape, its symbolic sizes as the graph nodes that compute them."""
    shape = list(pooled.meta["val"].shape)
    symbolic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    if len(symbolic) <= 1:
        return [-1 if not isinstance(s, int) else s for s in shape]
    by_expr = {}
    for node in gm.graph.nodes:
        if node is pooled:
            break
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            by_expr.setdefault(str(val.node.expr), node)
    out: list[object] = []
    for i, s in enumerate(shape):
        if i in symbolic:
            expr = str(s.node.expr)
            node = by_expr.get(expr) or _size_of_input(gm, expr)
            if node is None:
                raise NotALookup(f"cannot rebuild the symbolic size {expr} of {pooled.name}")
            out.append(node)
        else:
            out.append(s)
    return out


def _size_of_input(gm: GraphModule, expr: str) -> Node | None:
    """A new ``sym_size`` of the model input that has the symbolic size ``expr``."""
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor):
            continue
        for dim, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and str(size.node.expr) == expr:
                with gm.graph.inserting_after(node):
                    sym = gm.graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
                sym.meta["val"] = size
                return sym
    return None
