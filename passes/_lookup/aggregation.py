"""Bind a lookup's value aggregation to ``ultramem::aggregate``, proven by evaluation.

After the selection is fused, the model's own ops read value tables at indices computed
from the slot ids and pool the weighted rows. An aggregation is anchored at such a *read*
(a float weight table read at indices the slot ids reach through integer ops alone) and
ends at a *pooled* node every path from the read crosses (the first, or one of the next
few common post-dominators). Between them lie the region's other inputs: per-selection
float *factors* (the scores after any activation or gate: the op's ``weights``), integer
glue (slot ids → rows, → pooling groups) and shapes.

What is computed, not guessed: each element's selection (``coordinates``), so a factor in
any layout is viewed as [T, H, k, M]; the row and group maps, from the glue on every slot
id (``index_maps``). What is hypothesised and proven: the pooled node's layout (which dims
are tokens, head groups, scatter groups, values) and, with a table per core, which table
goes with which core. A binding is accepted only when the op reproduces the pooled node
on the model's real activations, on random factors and on random slot ids.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ...kernels import AGGREGATE_OP, aggregate_reference
from .._graph import (
    DataDependence,
    ancestors,
    common_post_dominator,
    descendants,
    evaluate_constant,
    fill_meta,
    graph_order,
    in_graph_order,
    is_symint,
    mutations,
    record_values,
    run_widened,
    view_base,
    widened,
)
from .coordinates import Tracer, split_dims
from .index_maps import tabulate
from .layouts import STAR, TOKEN, Layout, layouts
from .region import NotALookup, Region, region_between
from .selection import TABLE_READS

RANDOM_PROBES = 2
POST_DOMINATORS = 8
aten = torch.ops.aten
SCATTERS = {  # op -> accumulates (add) or overwrites (scatter: the last write wins)
    aten.scatter_add.default: True,
    aten.scatter_add_.default: True,
    aten.index_add.default: True,
    aten.index_add_.default: True,
    aten.scatter.src: False,
    aten.scatter_.src: False,
    aten.scatter.value: False,
    aten.scatter_.value: False,
}


@dataclass
class Factor:
    """A per-selection weight the rows are multiplied by, viewed as [T, H, k, (M)]."""

    node: Node
    subs: list[list[tuple[str, int]]]  # per dim of the node: its (role, size) sub-dims
    layout: Layout  # over the split shape: roles t, h, k, c, *
    core: int | None  # a factor of one core only (a table per core)

    @property
    def split(self) -> list[int]:
        return [size for dim in self.subs for _, size in dim]

    def canonical(self, x: Tensor, heads: int) -> Tensor:
        """[T, H, k, M] (M = 1 for a factor every core shares)."""
        return self.layout.canonical(x.reshape(self.split), {"h": heads})


@dataclass
class AggregationBinding:
    sources: list[Node]  # retrieve calls, in the global head order
    heads: list[int]
    slot_count: int
    reads: list[Node]
    values: Tensor | None  # a table built for the op (tables per core side by side)
    table: Node | None  # or the model's own table (viewed [H·R, Dv] when per head)
    factors: list[Factor]
    row_map: Tensor | None
    group_map: Tensor | None
    groups: int
    pooling: str
    pooled: Node
    pooled_layout: Layout  # over the pooled node: t, gh (head groups), ge (scatter groups), d
    group_sizes: tuple[int, int]  # (head groups, scatter groups) in the pooled layout
    verified_max_abs: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total_heads(self) -> int:
        return sum(self.heads)

    @property
    def per_core(self) -> bool:
        """One table per core, each weighted by its own core's factor."""
        return len(self.reads) > 1 and all(f.core is not None for f in self.factors)

    def describe(self) -> dict[str, Any]:
        return {
            "tables": len(self.reads),
            "value_dim": int(self._value_dim),
            "groups": self.groups,
            "pooling": self.pooling,
            "row_map": None if self.row_map is None else list(self.row_map.shape),
            "group_map": None if self.group_map is None else list(self.group_map.shape),
            "weights": [f.node.name for f in self.factors] or ["ones"],
            "selections": len(self.sources),
        }

    @property
    def _value_dim(self) -> int:
        if self.values is not None:
            return int(self.values.shape[1])
        return int(self.table.meta["val"].shape[-1])  # type: ignore[union-attr]

    def weights(self, factor_values: list[Tensor], like: Tensor) -> Tensor:
        """The op's weights [T, H, k, M] from the factors' values."""
        heads = self.total_heads
        if not self.factors:
            return torch.ones_like(like, dtype=torch.float32).unsqueeze(-1)
        parts = [f.canonical(v, heads) for f, v in zip(self.factors, factor_values, strict=True)]
        if self.per_core:  # one factor per core, a table each
            return torch.cat(parts, dim=-1)
        out = parts[0]
        for p in parts[1:]:
            out = out * p
        return out

    def run(self, table: Tensor, slots: list[Tensor], factor_values: list[Tensor]) -> Tensor:
        merged = torch.cat(slots, dim=1)
        pooled = aggregate_reference(
            table, self.weights(factor_values, merged).to(table.dtype), merged,
            self.row_map, self.group_map, self.groups, self.pooling,
        )  # fmt: skip
        tokens, dim = pooled.shape[0], pooled.shape[-1]
        gh, ge = self.group_sizes
        return pooled.reshape(tokens, gh, ge, dim)


# ---- finding reads and their sources -------------------------------------------------------


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


def _table(read: Node) -> Node | None:
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
    closures = {s: integer_closure(_slots(s)) for s in sources}
    out = []
    for node in gm.graph.nodes:
        if node.target in TABLE_READS and _table(node) is not None:
            indices = read_indices(node)
            reached = tuple(s for s in sources if any(i in closures[s] for i in indices))
            if reached:
                out.append((node, reached))
    return out


def _slots(retrieve: Node) -> Node:
    return _output(retrieve, 1)


def _scores(retrieve: Node) -> Node:
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


# ---- binding -------------------------------------------------------------------------------


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


def _context(
    gm: GraphModule, reads: list[Node], sources: list[Node], last: Node, example: tuple[Any, ...]
) -> _Context:
    slots = [_slots(s) for s in sources]
    closure = set().union(*(integer_closure(s) for s in slots))
    tracked = (ancestors([last]) | {last}) & (descendants(sources) | set(sources))
    operands = {i for n in tracked for i in n.all_input_nodes}
    real = record_values(gm, example, {*tracked, *operands, *slots})
    tracer = Tracer(real)
    heads = [int(s.meta["val"][1].shape[1]) for s in sources]
    offset = 0
    for source, h in zip(sources, heads, strict=True):
        t_count, _, k = real[_slots(source)].shape
        grid = torch.meshgrid(
            torch.arange(t_count), torch.arange(h) + offset, torch.arange(k), indexing="ij"
        )
        tracer.seed(_slots(source), dict(zip(("t", "h", "j"), grid, strict=True)))
        scores = real.get(_scores(source))
        if scores is not None:
            full = torch.meshgrid(
                torch.arange(t_count), torch.arange(h) + offset, torch.arange(k),
                torch.arange(scores.shape[-1]), indexing="ij",
            )  # fmt: skip
            tracer.seed(_scores(source), dict(zip(("t", "h", "j", "c"), full, strict=True)))
        offset += h
    what = f"the rows {reads[0].name} reads"
    slot_count = int(sources[0].args[0].meta["val"].shape[2]) ** 2
    if any(int(s.args[0].meta["val"].shape[2]) ** 2 != slot_count for s in sources):
        raise NotALookup(f"{what} come from selections over key grids of different sizes")
    shapes = [real[s].shape for s in slots]
    row_map, table, values = _rows(gm, reads, slots, shapes, slot_count, tracer, real, what)
    return _Context(
        gm, example, reads, sources, slots, closure, real, tracer, heads, slot_count, shapes,
        row_map, table, values,
    )  # fmt: skip


def bind_aggregation(
    gm: GraphModule, reads: list[Node], sources: list[Node], example: tuple[Any, ...]
) -> tuple[AggregationBinding, Region]:
    """The first pooled candidate of ``reads`` the op reproduces; NotALookup says why not."""
    candidates = pooled_candidates(gm, reads)
    if not candidates:
        raise NotALookup(f"the rows read by {reads[0].name} are never pooled into one value")
    ctx = _context(gm, reads, sources, candidates[-1], example)
    errors = []
    for pooled in candidates:
        try:
            return _bind_at(ctx, pooled)
        except NotALookup as exc:
            errors.append(str(exc))
    # the last candidate's reason: the furthest the pooling was followed
    raise NotALookup(errors[-1])


def _bind_at(ctx: _Context, pooled: Node) -> tuple[AggregationBinding, Region]:
    gm, reads, real, tracer = ctx.gm, ctx.reads, ctx.real, ctx.tracer
    order = graph_order(gm.graph)
    what = f"the pooling from {reads[0].name} to {pooled.name}"
    core = (descendants(reads) & (ancestors([pooled]) | {pooled})) | set(reads)
    data = DataDependence(gm.graph)
    writers = mutations(gm.graph)
    candidates = []
    for node in in_graph_order(core, order):
        for i in node.all_input_nodes:
            if i in core or i in ctx.closure or is_symint(i) or i.op == "get_attr" or not data(i):
                continue
            own = writers.get(i, [])
            if own and all(w in core for w in own) and not data.created_from_data(i):
                continue  # a fresh buffer the pooling writes into
            val = i.meta.get("val")
            if isinstance(val, Tensor) and val.is_floating_point() and i not in candidates:
                candidates.append(i)
            elif not isinstance(val, Tensor) or not all(
                u.target in (aten.sym_size.int,) for u in i.users if u in core
            ):
                raise NotALookup(f"{what} also reads {i.name}, which is not per-selection data")
    region = region_between(gm, [*ctx.slots, *candidates], [pooled], what)
    missing = {*region.extra_inputs, *candidates, pooled, *region.nodes} - set(real)
    if missing:  # sizes and shape-only inputs the trace did not need
        real.update(record_values(gm, ctx.example, missing))
    factors = [_factor(tracer, real, c, what) for c in candidates]
    extras = [real[e] for e in region.extra_inputs]
    scatter = next((n for n in in_graph_order(region.nodes, order) if n.target in SCATTERS), None)
    scatter_map, scatter_size = None, 1
    if scatter is not None:
        scatter_map = _tabulate_nodes(
            gm, [scatter.args[2]], ctx.slots, ctx.shapes, ctx.slot_count, tracer, real,
            f"the pooling index of {scatter.name}",
        )  # fmt: skip
        scatter_size = int(real[scatter.args[0]].shape[scatter.args[1]])
    pooling = "add" if scatter is None or SCATTERS[scatter.target] else "scatter"
    module = region.module(gm)
    probes = _probes(region, real, ctx.slots, factors, ctx.slot_count, module, extras)
    values, table, row_map = ctx.values, ctx.table, ctx.row_map
    table_value = values if values is not None else _table_value(gm, table)
    value_dim = int(table_value.shape[1])
    total = sum(ctx.heads)
    sizes = {"gh": total, "ge": scatter_size, "d": value_dim}
    shape = list(real[pooled].shape)
    for layout in layouts(shape, ("gh", "ge", "d"), sizes, optional=("gh", "ge")):
        gh = total if "gh" in layout.roles else 1
        ge = scatter_size if "ge" in layout.roles else 1
        if scatter is not None and ge == 1 and scatter_size > 1:
            continue  # pooled groups must come from the scatter's groups
        for per_core in _core_orders(factors, reads):
            group_map = _group_map(total, ctx.slot_count, gh, ge, scatter_map)
            binding = AggregationBinding(
                ctx.sources, ctx.heads, ctx.slot_count, per_core, values, table, factors,
                row_map, group_map, gh * ge, pooling, pooled, layout, (gh, ge),
            )  # fmt: skip
            if per_core is not reads:
                binding.values = _concat_tables(gm, per_core)
                binding.table = None
            proof_table = table_value if per_core is reads else binding.values
            error = _verify(binding, probes, widened(proof_table))  # proven in fp32 too
            if error is not None:
                binding.verified_max_abs = error
                return binding, region
    raise NotALookup(f"no binding of ultramem::aggregate reproduces {what}")


def _factor(tracer: Tracer, real: dict[Node, Any], node: Node, what: str) -> Factor:
    coords = tracer.coords(node)
    if coords is None or "j" not in coords:
        raise NotALookup(f"{what} multiplies by {node.name}: {tracer.reason(node)}")
    shape = real[node].shape
    subs = split_dims(coords, shape)
    if subs is None:
        raise NotALookup(f"{what}: {node.name} holds its selections in no product layout")
    split = [size for dim in subs for _, size in dim]
    role_of = {"t": TOKEN, "h": "h", "j": "k", "c": "c"}
    roles = [role_of.get(name, STAR) for dim in subs for name, _ in dim]
    subs = [[(role_of.get(name, STAR), size) for name, size in dim] for dim in subs]
    counts = {r: roles.count(r) for r in ("h", "k", "c")}
    if any(v > 1 for v in counts.values()):
        raise NotALookup(f"{what}: {node.name} spreads one coordinate over several dims")
    layout = Layout(tuple(roles), ("h", "k", "c"))
    core = None
    c = coords.get("c")
    if c is not None and "c" not in roles:
        values = set(c.unique().tolist()) - {-1}
        core = values.pop() if len(values) == 1 else None
    # the split must reproduce every traced coordinate
    expected = {
        "t": _flat_index(split, roles, TOKEN),
        "h": _flat_index(split, roles, "h"),
        "j": _flat_index(split, roles, "k"),
    }
    for name, want in expected.items():
        got = coords.get(name)
        if got is not None and want is not None:
            got = got.expand(shape).reshape(split)
            if not bool(((got < 0) | (got == want)).all()):
                raise NotALookup(f"{what}: {node.name}'s {name} order is not the selection's")
    return Factor(node, subs, layout, core)


def _flat_index(split: list[int], roles: list[str], role: str) -> Tensor | None:
    """Per element of a tensor of shape ``split``, its index along the ``role`` dims
    (flattened in order; a head's index is global)."""
    dims = [d for d, r in enumerate(roles) if r == role]
    if not dims:
        return None
    index = torch.zeros(split, dtype=torch.int64)
    for d in dims:
        shape = [1] * len(split)
        shape[d] = split[d]
        index = index * split[d] + torch.arange(split[d]).view(shape)
    return index


def _rows(
    gm: GraphModule,
    reads: list[Node],
    slots: list[Node],
    shapes: list[torch.Size],
    slot_count: int,
    tracer: Tracer,
    real: dict[Node, Any],
    what: str,
) -> tuple[Tensor | None, Node | None, Tensor | None]:
    """(row map, the table node or None, a built table or None) of the reads."""
    maps = []
    for read in reads:
        indices = read_indices(read)
        table = read.args[0]
        table_shape = real[table].shape if table in real else table.meta["val"].shape
        # the flat row of ``table[i0, i1, ...]`` in the table viewed [rows, Dv]
        strides = [math.prod(table_shape[i + 1 : len(indices)]) for i in range(len(indices))]
        maps.append(
            _tabulate_nodes(
                gm,
                indices,
                slots,
                shapes,
                slot_count,
                tracer,
                real,
                f"the rows {read.name} reads",
                strides,
            )
        )
    if any(not torch.equal(m, maps[0]) for m in maps[1:]):
        raise NotALookup(f"{what}: the tables are read at different rows")
    row_map = maps[0]
    table = reads[0].args[0]
    if len(reads) > 1:
        return row_map, None, _concat_tables(gm, reads)
    rows = int(math.prod(table.meta["val"].shape[: len(read_indices(reads[0]))]))
    identity = row_map.shape == (1, slot_count) and slot_count == rows
    identity = identity and torch.equal(row_map[0].long(), torch.arange(slot_count))
    return (None if identity else row_map), table, None


def _tabulate_nodes(
    gm: GraphModule,
    indices: list[Node],
    slots: list[Node],
    shapes: list[torch.Size],
    slot_count: int,
    tracer: Tracer,
    real: dict[Node, Any],
    what: str,
    strides: list[int] | None = None,
) -> Tensor:
    """The map of ``sum(index_i · stride_i)`` (one index: the index itself)."""
    strides = strides or [1] * len(indices)
    carried = [i for i in indices if tracer.coords(i) is not None]
    if not carried:
        raise NotALookup(f"{what}: {tracer.reason(indices[0])}")
    region = region_between(gm, slots, carried, what)
    module = region.module(gm)
    extra = [real[e] for e in region.extra_inputs]
    lead = torch.broadcast_shapes(*(real[i].shape for i in indices))
    from .coordinates import merge

    coords = merge(
        [
            {k: v.expand(real[i].shape) for k, v in (tracer.coords(i) or {}).items()}
            if tracer.coords(i) is not None
            else None
            for i in indices
        ],
        lead,
    )
    if coords is None:
        raise NotALookup(f"{what}: its indices belong to different selections")

    def evaluate(synthetic: list[Tensor]) -> Tensor:
        with torch.no_grad():
            outs = dict(zip(carried, run_widened(module, *synthetic, *extra), strict=True))
        flat = torch.zeros(lead, dtype=torch.int64)
        for index, stride in zip(indices, strides, strict=True):
            value = outs[index] if index in outs else real[index]
            flat = flat + value.long().expand(lead) * stride
        return flat

    return tabulate(evaluate, coords, shapes, slot_count, what)


def _group_map(
    heads: int, slot_count: int, gh: int, ge: int, scatter_map: Tensor | None
) -> Tensor | None:
    if gh == 1 and ge == 1:
        return None
    scatter = (
        scatter_map.long()
        if scatter_map is not None and ge > 1
        else torch.zeros(1, slot_count, dtype=torch.int64)
    )
    head = torch.arange(heads).view(-1, 1) if gh > 1 else torch.zeros(1, 1, dtype=torch.int64)
    groups = head * ge + scatter
    if groups.shape[0] == 1 and heads > 1 and gh > 1:
        groups = groups.expand(heads, -1)
    return groups.int().contiguous()


def _core_orders(factors: list[Factor], reads: list[Node]) -> list[list[Node]]:
    """The reads in the order of the cores their factors weight (a table per core), or
    the reads as they are (one table)."""
    if len(reads) == 1:
        return [reads]
    cores = [f.core for f in factors]
    if len(factors) != len(reads) or any(c is None for c in cores) or len(set(cores)) != len(cores):
        return []
    # the factors in core order: the tables must come in the same order
    factors.sort(key=lambda f: f.core)  # type: ignore[arg-type, return-value]
    return [list(p) for p in itertools.permutations(reads)]


def _concat_tables(gm: GraphModule, reads: list[Node]) -> Tensor:
    return torch.cat([_table_value(gm, r.args[0]) for r in reads], dim=1)


def _table_value(gm: GraphModule, table: Node | None) -> Tensor:
    assert table is not None
    value = evaluate_constant(gm, table, {})
    if not isinstance(value, Tensor):
        raise NotALookup(f"{table.name} is not a weight")
    return value.reshape(-1, value.shape[-1])


def _probes(
    region: Region,
    real: dict[Node, Any],
    slots: list[Node],
    factors: list[Factor],
    slot_count: int,
    module: GraphModule,
    extras: list[Tensor],
) -> list[tuple[list[Tensor], list[Tensor], Tensor]]:
    """(slot ids, factor values, expected pooled) on the real run, random factors and
    random slot ids."""
    gen = torch.Generator().manual_seed(0)
    real_slots = [real[s] for s in slots]
    real_factors = [real[f.node] for f in factors]
    probes = [(real_slots, real_factors, real[region.outputs[0]])]
    for i in range(RANDOM_PROBES):
        if i % 2 == 0:
            xs = real_slots
            fs = [torch.randn(v.shape, generator=gen).to(v.dtype) for v in real_factors]
        else:
            xs = [torch.randint(0, slot_count, v.shape, generator=gen) for v in real_slots]
            fs = real_factors
        with torch.no_grad():
            (expected,) = run_widened(module, *xs, *fs, *extras)
        probes.append((xs, fs, expected))
    return probes


def _verify(
    binding: AggregationBinding,
    probes: list[tuple[list[Tensor], list[Tensor], Tensor]],
    table: Tensor,
) -> float | None:
    worst = 0.0
    for slots, factors, expected in probes:
        try:
            with torch.no_grad():
                got = binding.run(table, slots, factors)
                got = binding.pooled_layout.model(
                    got.reshape(got.shape[0], *_named(binding)), list(expected.shape)
                )
        except (ValueError, RuntimeError, IndexError):
            return None
        if got.shape != expected.shape:
            return None
        got, want = got.float(), expected.float()
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            return None
        worst = max(worst, float((got - want).abs().max()) if want.numel() else 0.0)
    return worst


def _named(binding: AggregationBinding) -> list[int]:
    gh, ge = binding.group_sizes
    return [gh, ge, binding._value_dim]


# ---- rewrite -------------------------------------------------------------------------------


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
        slots = [_slots(s) for s in b.sources]
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
        gh, ge = b.group_sizes
        view = graph.call_function(aten.reshape.default, (call, [-1, gh, ge, b._value_dim]))
        shape = list(pooled.meta["val"].shape)
        out = b.pooled_layout.model_node_like(gm, view, pooled, pooled, shape)
    pooled.replace_all_uses_with(out)
    fill_meta(gm)
    return call


def _split_args(gm: GraphModule, f: Factor) -> list[object]:
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
