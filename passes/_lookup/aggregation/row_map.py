"""Rule ``row_map``: which table row each (head, slot) reads, from the model's own glue.

The reads' index tensors are evaluated on every slot id (``index_maps.tabulate``); a
read ``table[i0, i1, ...]`` reads the flat row ``Σ i_d · stride_d`` of the table viewed
``[rows, Dv]``. Several reads (a table per core) must read the same rows; their tables are
then set side by side. A map that is the identity is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import evaluate_constant, run_widened
from ..coordinates import Tracer, merge
from ..index_maps import tabulate
from ..reads import read_indices
from ..region import region_between
from ..rules import NotALookup

RULE = "row_map"


@dataclass(frozen=True)
class SlotTrace:
    """What tabulating an index over every slot needs: the graph, the selections' slot
    nodes and their shapes, the slot count, and the coordinates traced from real values."""

    gm: GraphModule
    slots: list[Node]
    shapes: list[torch.Size]
    slot_count: int
    tracer: Tracer
    real: dict[Node, Any]


def table_rows(
    trace: SlotTrace, reads: list[Node], what: str
) -> tuple[Tensor | None, Node | None, Tensor | None]:
    """(row map, the table node or None, a built table or None) of the reads."""
    maps = []
    for read in reads:
        indices = read_indices(read)
        table = read.args[0]
        table_shape = trace.real[table].shape if table in trace.real else table.meta["val"].shape
        # the flat row of ``table[i0, i1, ...]`` in the table viewed [rows, Dv]
        strides = [math.prod(table_shape[i + 1 : len(indices)]) for i in range(len(indices))]
        where = f"the rows {read.name} reads"
        maps.append(tabulate_indices(trace, indices, where, strides=strides))
    if any(not torch.equal(m, maps[0]) for m in maps[1:]):
        raise NotALookup(f"{what}: the tables are read at different rows")
    row_map = maps[0]
    table = reads[0].args[0]
    if len(reads) > 1:
        return row_map, None, tables_side_by_side(trace.gm, reads)
    rows = int(math.prod(table.meta["val"].shape[: len(read_indices(reads[0]))]))
    slot_count = trace.slot_count
    identity = row_map.shape == (1, slot_count) and slot_count == rows
    identity = identity and torch.equal(row_map[0].long(), torch.arange(slot_count))
    return (None if identity else row_map), table, None


def tabulate_indices(
    trace: SlotTrace, indices: list[Node], what: str, *, strides: list[int] | None = None
) -> Tensor:
    """The map (head, slot) -> ``sum(index_i · stride_i)`` (one index: the index itself)."""
    gm, tracer, real = trace.gm, trace.tracer, trace.real
    strides = strides or [1] * len(indices)
    carried = [i for i in indices if tracer.coords(i) is not None]
    if not carried:
        raise NotALookup(f"{what}: {tracer.reason(indices[0])}")
    region = region_between(gm, trace.slots, carried, what)
    module = region.module(gm)
    extra = [real[e] for e in region.extra_inputs]
    lead = torch.broadcast_shapes(*(real[i].shape for i in indices))
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

    return tabulate(evaluate, coords, trace.shapes, trace.slot_count, what)


def tables_side_by_side(gm: GraphModule, reads: list[Node]) -> Tensor:
    """The reads' tables as one [rows, Σ Dv] table (a table per core)."""
    return torch.cat([table_value(gm, r.args[0]) for r in reads], dim=1)


def table_value(gm: GraphModule, table: Node | None) -> Tensor:
    """A table's value, viewed [rows, Dv]."""
    assert table is not None
    value = evaluate_constant(gm, table, {})
    if not isinstance(value, Tensor):
        raise NotALookup(f"{table.name} is not a weight")
    return value.reshape(-1, value.shape[-1])
