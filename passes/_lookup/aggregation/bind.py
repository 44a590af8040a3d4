"""Bind a read's aggregation to ``ultramem::aggregate``: the rules in order, depth first.

``AGGREGATION_RULES`` is the order. The first four run once per group of reads; the rest
once per pooled candidate (the reads' successive common post-dominators), each tried until
one binds. A refusal carries the last candidate's reason, as the furthest the pooling was
followed, and the furthest rule any candidate reached (``NotALookup.furthest``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import ancestors, descendants, graph_order, in_graph_order, record_values, widened
from ..coordinates import Tracer
from ..layouts import layouts
from ..reads import integer_closure, pooled_candidates, scores_of, slots_of
from ..region import Region, region_between
from ..rules import Failure, NotALookup, RuleTracer
from . import core_order, pooling, proof, row_map, weights
from .binding import HEAD_GROUP, POOLED_ROLES, SCATTER_GROUP, VALUE, AggregationBinding, GroupSizes
from .row_map import SlotTrace

POOLED_RULE = "pooled_node"
GRIDS_RULE = "key_grids"
AGGREGATION_RULES = (
    POOLED_RULE,
    GRIDS_RULE,
    row_map.RULE,
    weights.INPUTS_RULE,
    weights.WEIGHTS_RULE,
    pooling.POOLING_RULE,
    pooling.LAYOUT_RULE,
    core_order.RULE,
    proof.RULE,
)


@dataclass
class _Context:
    """What every pooled candidate of one group of reads shares: the real values, the
    coordinate trace seeded at the selections, and the row map."""

    gm: GraphModule
    example: tuple[Any, ...]
    reads: list[Node]
    sources: list[Node]
    slots: list[Node]
    closure: set[Node]
    real: dict[Node, Any]
    tracer: Tracer
    heads: list[int]
    slot_count: int
    shapes: list[torch.Size]
    row_map: Tensor | None
    table: Node | None
    values: Tensor | None
    trace: SlotTrace


def _context(
    gm: GraphModule,
    reads: list[Node],
    sources: list[Node],
    last: Node,
    example: tuple[Any, ...],
    rules: RuleTracer,
) -> _Context:
    slots = [slots_of(s) for s in sources]
    closure = set().union(*(integer_closure(s) for s in slots))
    tracked = (ancestors([last]) | {last}) & (descendants(sources) | set(sources))
    operands = {i for n in tracked for i in n.all_input_nodes}
    real = record_values(gm, example, {*tracked, *operands, *slots})
    tracer = Tracer(real)
    heads = [int(s.meta["val"][1].shape[1]) for s in sources]
    offset = 0
    for source, h in zip(sources, heads, strict=True):
        t_count, _, k = real[slots_of(source)].shape
        grid = torch.meshgrid(
            torch.arange(t_count), torch.arange(h) + offset, torch.arange(k), indexing="ij"
        )
        tracer.seed(slots_of(source), dict(zip(("t", "h", "j"), grid, strict=True)))
        scores = real.get(scores_of(source))
        if scores is not None:
            full = torch.meshgrid(
                torch.arange(t_count), torch.arange(h) + offset, torch.arange(k),
                torch.arange(scores.shape[-1]), indexing="ij",
            )  # fmt: skip
            tracer.seed(scores_of(source), dict(zip(("t", "h", "j", "c"), full, strict=True)))
        offset += h
    what = f"the rows {reads[0].name} reads"
    slot_count = int(sources[0].args[0].meta["val"].shape[2]) ** 2
    if any(int(s.args[0].meta["val"].shape[2]) ** 2 != slot_count for s in sources):
        reason = f"{what} come from selections over key grids of different sizes"
        raise rules.refuse(reason, Failure.at(GRIDS_RULE, reason, reads[0]))
    shapes = [real[s].shape for s in slots]
    trace = SlotTrace(
        gm=gm, slots=slots, shapes=shapes, slot_count=slot_count, tracer=tracer, real=real
    )
    with rules.rule(row_map.RULE):
        rows, table, values = row_map.table_rows(trace, reads, what)
    return _Context(
        gm=gm, example=example, reads=reads, sources=sources, slots=slots, closure=closure,
        real=real, tracer=tracer, heads=heads, slot_count=slot_count, shapes=shapes,
        row_map=rows, table=table, values=values, trace=trace,
    )  # fmt: skip


def bind_aggregation(
    gm: GraphModule, reads: list[Node], sources: list[Node], example: tuple[Any, ...]
) -> tuple[AggregationBinding, Region]:
    """The first pooled candidate of ``reads`` the op reproduces; NotALookup says why not."""
    rules = RuleTracer(AGGREGATION_RULES)
    candidates = pooled_candidates(gm, reads)
    if not candidates:
        reason = f"the rows read by {reads[0].name} are never pooled into one value"
        raise rules.refuse(reason, Failure.at(POOLED_RULE, reason, reads[0]))
    ctx = _context(gm, reads, sources, candidates[-1], example, rules)
    errors = []
    for pooled in candidates:
        try:
            return _bind_pooled(ctx, pooled, rules)
        except NotALookup as exc:
            errors.append(str(exc))
    # the last candidate's reason: the furthest the pooling was followed
    raise rules.refuse(errors[-1])


def _bind_pooled(
    ctx: _Context, pooled: Node, rules: RuleTracer
) -> tuple[AggregationBinding, Region]:
    """The binding of the pooling from the reads to ``pooled``, proven on every probe."""
    gm, reads, real, tracer = ctx.gm, ctx.reads, ctx.real, ctx.tracer
    order = graph_order(gm.graph)
    what = f"the pooling from {reads[0].name} to {pooled.name}"
    core = (descendants(reads) & (ancestors([pooled]) | {pooled})) | set(reads)
    with rules.rule(weights.INPUTS_RULE):
        candidates = weights.factor_nodes(gm, core, ctx.closure, order, what)
        region = region_between(gm, [*ctx.slots, *candidates], [pooled], what)
    missing = {*region.extra_inputs, *candidates, pooled, *region.nodes} - set(real)
    if missing:  # sizes and shape-only inputs the trace did not need
        real.update(record_values(gm, ctx.example, missing))
    with rules.rule(weights.WEIGHTS_RULE):
        factors = [weights.weight_factor(tracer, real, c, what) for c in candidates]
    extras = [real[e] for e in region.extra_inputs]
    scatter = next(
        (n for n in in_graph_order(region.nodes, order) if n.target in pooling.SCATTERS), None
    )
    scatter_map, scatter_size = None, 1
    if scatter is not None:
        with rules.rule(pooling.POOLING_RULE):
            scatter_map = row_map.tabulate_indices(
                ctx.trace, [scatter.args[2]], f"the pooling index of {scatter.name}"
            )
        scatter_size = int(real[scatter.args[0]].shape[scatter.args[1]])
    kind = "add" if scatter is None or pooling.SCATTERS[scatter.target] else "scatter"
    module = region.module(gm)
    probes = proof.probes(region, real, ctx.slots, factors, ctx.slot_count, module, extras)
    values, table = ctx.values, ctx.table
    with rules.rule(row_map.RULE):
        table_value = values if values is not None else row_map.table_value(gm, table)
    value_dim = int(table_value.shape[1])
    total = sum(ctx.heads)
    sizes = {HEAD_GROUP: total, SCATTER_GROUP: scatter_size, VALUE: value_dim}
    shape = list(real[pooled].shape)
    readable = 0
    for layout in layouts(shape, POOLED_ROLES, sizes, optional=(HEAD_GROUP, SCATTER_GROUP)):
        groups = GroupSizes(
            heads=total if HEAD_GROUP in layout.roles else 1,
            scatter=scatter_size if SCATTER_GROUP in layout.roles else 1,
        )
        if scatter is not None and groups.scatter == 1 and scatter_size > 1:
            continue  # pooled groups must come from the scatter's groups
        readable += 1
        orders = core_order.check(factors, reads)
        if isinstance(orders, Failure):
            rules.record(orders)
            continue
        for per_core in orders:
            binding = AggregationBinding(
                sources=ctx.sources, heads=ctx.heads, slot_count=ctx.slot_count,
                reads=per_core, values=values, table=table, factors=factors,
                row_map=ctx.row_map,
                group_map=pooling.group_map(total, ctx.slot_count, groups, scatter_map),
                pooling=kind, pooled=pooled, pooled_layout=layout, group_sizes=groups,
            )  # fmt: skip
            if per_core is not reads:
                binding.values = row_map.tables_side_by_side(gm, per_core)
                binding.table = None
            proof_table = table_value if per_core is reads else binding.values
            error = proof.check(binding, probes, widened(proof_table))  # proven in fp32 too
            if isinstance(error, Failure):
                rules.record(error)
                continue
            binding.verified_max_abs = error
            return binding, region
    if not readable:
        reason = (
            f"{pooled.name} {shape} has no dims of the op's [T, heads {total}, "
            f"scatter groups {scatter_size}, values {value_dim}]"
        )
        rules.record(Failure.at(pooling.LAYOUT_RULE, reason, pooled))
    raise rules.refuse(f"no binding of ultramem::aggregate reproduces {what}")
