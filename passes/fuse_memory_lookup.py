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

from ultramem.passes.base import PassContext, PassResult, Refusal, count_nodes, finish
from ultramem.passes.graph_utils import extract_subgraph, get_attr_value, record_values
from ultramem.passes.lookup_binding import Binding, Layout, hypotheses, verify
from ultramem.passes.lookup_region import LookupRegion, NotALookup, final_topks, find_region

log = logging.getLogger(__name__)

RANDOM_PROBES = 2
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
            region = find_region(gm, final, row, col)
            binding, error = _bind(gm, region, ctx)
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


def _bind(gm: GraphModule, region: LookupRegion, ctx: PassContext) -> tuple[Binding, float]:
    boundary = {region.row_scores, region.col_scores, region.pooled, *region.symint_inputs}
    real = record_values(gm, ctx.example_inputs, boundary)
    sub = extract_subgraph(
        gm,
        [region.row_scores, region.col_scores, *region.symint_inputs],
        [region.pooled],
        region.nodes,
    )
    symints = [real[s] for s in region.symint_inputs]
    gen = torch.Generator().manual_seed(0)
    probes = [(real[region.row_scores], real[region.col_scores], real[region.pooled])]
    for _ in range(RANDOM_PROBES):
        rs = torch.randn(real[region.row_scores].shape, generator=gen)
        cs = torch.randn(real[region.col_scores].shape, generator=gen)
        with torch.no_grad():
            (pooled,) = sub(rs, cs, *symints)
        probes.append((rs, cs, pooled))
    values = get_attr_value(gm, region.value_table)
    for i, binding in enumerate(hypotheses(gm, region)):
        if i >= MAX_HYPOTHESES:
            break
        error = verify(binding, values, probes)
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
        smap = constant("slot_map", b.slot_map) if b.slot_map is not None else None
        retrieved = graph.call_function(
            torch.ops.ultramem.retrieve.default,
            (rows, cols, u, v, cores, b.topm, b.topk, b.activation),
        )
        scores = graph.call_function(operator.getitem, (retrieved, 0))
        slots = graph.call_function(operator.getitem, (retrieved, 1))
        agg = graph.call_function(
            torch.ops.ultramem.aggregate.default,
            (
                region.value_table,
                scores,
                slots,
                smap,
                b.expansion,
                b.mapping,
                b.pooling,
                b.row_offset,
            ),
        )
        out = graph.call_function(torch.ops.aten.reshape.default, (agg, shape))
    pooled.replace_all_uses_with(out)


def _canonical(graph: torch.fx.Graph, scores: Node, layout: Layout, n: int) -> Node:
    permuted = graph.call_function(torch.ops.aten.permute.default, (scores, list(layout.perm)))
    return graph.call_function(
        torch.ops.aten.reshape.default, (permuted, [-1, layout.heads, n, layout.rank])
    )


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
            if expr not in by_expr:
                raise NotALookup(f"cannot rebuild the symbolic size {expr} of {pooled.name}")
            out.append(by_expr[expr])
        else:
            out.append(s)
    return out
