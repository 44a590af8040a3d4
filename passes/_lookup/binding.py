"""Bind a lookup region to ``ultramem::retrieve`` + ``ultramem::aggregate``, proven by evaluation.

The region's sizes come from its anchors (n, m, k from the top-ks; H, r from the score
tensors' static dims). Its weights are matched to the ops' inputs by shape: the rank-1
vectors (H·r values on the path from a score tensor to its candidate top-k), the cores
(M·H·r·r values on the path to the final top-k), a virtual-slot map (n² int64 values),
the value table. Each combination of layouts, activation and slot mapping is a
*hypothesis*; one is accepted only when the fused ops reproduce the region's output on
the model's real activations and on random score tensors. Nothing is accepted on looks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ... import kernels as _kernels  # noqa: F401  (registers torch.ops.ultramem)
from .._graph import (
    ancestors,
    descendants,
    evaluate_constant,
    get_attr_value,
    is_symint,
    view_base,
)
from .region import LookupRegion, NotALookup

_RELU = {torch.ops.aten.relu.default}
_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
_SCATTER = {
    torch.ops.aten.scatter.src,
    torch.ops.aten.scatter.value,
    torch.ops.aten.scatter_.src,
    torch.ops.aten.scatter_.value,
}


@dataclass(frozen=True)
class Layout:
    """How to view a score tensor as [T, H, n, r]: permute, then reshape."""

    perm: tuple[int, ...]
    heads: int
    rank: int
    # PKM's additive grid as a rank-2 Tucker product: rows [s, 1], columns [1, s]
    additive: str = ""  # "", "row" or "col"
    # one score tensor shared by every head (the PyPI package's cores-as-heads)
    broadcast: bool = False

    def canonical(self, x: Tensor, n: int) -> Tensor:
        x = x.permute(self.perm)
        if self.broadcast:
            x = x.reshape(-1, 1, n, self.rank).expand(-1, self.heads, -1, -1)
        else:
            x = x.reshape(-1, self.heads, n, self.rank)
        if not self.additive:
            return x
        ones = torch.ones_like(x)
        return torch.cat([x, ones] if self.additive == "row" else [ones, x], dim=-1)


@dataclass
class Binding:
    n: int
    topm: int
    topk: int
    row_layout: Layout
    col_layout: Layout
    row_weight: Tensor
    col_weight: Tensor
    cores: Tensor
    activation: str
    slot_map: Tensor | None
    expansion: int
    mapping: str
    pooling: str
    values: Tensor  # the table the aggregate reads: the model's own, or its tables side by side
    row_offset: int = 0
    # Per-head pooling ([T, H, E, Dv], the heads concatenated later) binds as the plain op
    # with H·E groups: head h's slots move to their own id range (slot_offsets[h] = h·S)
    # and the slot map sends them to groups h·E .. h·E + E - 1 (``per_head_slots``).
    # ``expansion`` and ``slot_map`` above are then the op's (H·E, the moved map).
    slot_offsets: Tensor | None = None
    heads_first: bool = False  # per-head output as [H, T, E, Dv] rather than [T, H, E, Dv]

    @property
    def per_head(self) -> bool:
        return self.slot_offsets is not None

    def pooled_shape(self) -> list[int]:
        """The aggregate's output viewed per head: [T, H, E, Dv] (or per token: [T, E, Dv])."""
        dim = int(self.values.shape[1])
        if not self.per_head:
            return [-1, self.expansion, dim]
        heads = self.row_layout.heads
        return [-1, heads, self.expansion // heads, dim]

    def index_maps(self) -> tuple[Tensor | None, Tensor | None, int]:
        """(row_map, group_map, groups) of the aggregate: every (head, slot) sent through
        the bound slot map and mapping to its table row and pooling group."""
        slots, rows = self.n * self.n, int(self.values.shape[0])
        slot = torch.arange(slots).view(1, -1)
        if self.slot_offsets is not None:
            slot = slot + self.slot_offsets.view(-1, 1)
        virtual = self.slot_map[slot] if self.slot_map is not None else slot
        if self.mapping == "mod":
            row, group = virtual % rows, virtual // rows
        else:
            row, group = virtual // self.expansion, virtual % self.expansion
        row = (row + self.row_offset) % rows
        identity = row.shape[0] == 1 and torch.equal(row[0], torch.arange(slots))
        row_map = None if identity and slots == rows else row
        group_map = None if self.expansion == 1 else group
        return row_map, group_map, self.expansion

    def describe(self) -> dict[str, Any]:
        return {
            "heads": self.row_layout.heads,
            "n_keys": self.n,
            "tucker_rank": self.row_layout.rank,
            "cores": int(self.cores.shape[0]),
            "topm": self.topm,
            "topk": self.topk,
            "activation": self.activation,
            "expansion": self.expansion,
            "mapping": self.mapping,
            "pooling": self.pooling,
            "slot_map": self.slot_map is not None,
            "per_head_pooling": self.per_head,
            "value_dim": int(self.values.shape[1]),
            "dtype": str(self.values.dtype).removeprefix("torch."),
        }


def run_fused(binding: Binding, row_scores: Tensor, col_scores: Tensor) -> Tensor:
    """The fused ops on canonical score views; per-head output as ``pooled_shape`` says."""
    b = binding
    scores, slots = torch.ops.ultramem.retrieve(
        b.row_layout.canonical(row_scores, b.n),
        b.col_layout.canonical(col_scores, b.n),
        b.row_weight,
        b.col_weight,
        b.cores,
        b.topm,
        b.topk,
        b.activation,
    )
    row_map, group_map, groups = b.index_maps()
    pooled = torch.ops.ultramem.aggregate(
        b.values, scores, slots, row_map, group_map, groups, b.pooling
    ).view(b.pooled_shape())
    return pooled.transpose(0, 1) if b.heads_first else pooled


def per_head_slots(
    slot_map: Tensor | None, heads: int, slots: int, rows: int, expansion: int, mapping: str
) -> tuple[Tensor, Tensor]:
    """(slot map, slot offsets) that make the op pool each head into its own E groups.

    Head h's slot s becomes h·S + s; its virtual id keeps its row and moves its group to
    h·E + group: + h·R·E under ``mod``, re-spread over H·E per row under ``div``.
    """
    base = slot_map if slot_map is not None else torch.arange(slots)
    head = torch.arange(heads).view(-1, 1)
    if mapping == "mod":
        moved = base.view(1, -1) + head * rows * expansion
    else:
        row, group = (base // expansion).view(1, -1), (base % expansion).view(1, -1)
        moved = row * heads * expansion + head * expansion + group
    return moved.reshape(-1), torch.arange(heads) * slots


def _layouts(scores: Node, n: int) -> list[Layout]:
    shape = scores.meta["val"].shape
    tokens = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    static = [i for i, s in enumerate(shape) if isinstance(s, int)]
    out = []
    for n_dim in (i for i in static if shape[i] == n):
        rest = [i for i in static if i != n_dim]
        if len(rest) > 2:
            continue
        for h_dims, r_dims in ((rest[:1], rest[1:]), (rest[1:], rest[:1]), ([], rest), (rest, [])):
            if len(h_dims) + len(r_dims) != len(rest) or (
                len(rest) == 2 and not (h_dims and r_dims)
            ):
                continue
            heads = shape[h_dims[0]] if h_dims else 1
            rank = shape[r_dims[0]] if r_dims else 1
            layout = Layout(tuple(tokens + h_dims + [n_dim] + r_dims), heads, rank)
            if layout not in out:
                out.append(layout)
    return out


def _weights_between(gm: GraphModule, src: list[Node], dst: Node) -> list[Tensor]:
    """Weight values the path from ``src`` to ``dst`` reads: as read (after any weight-only
    view or indexing), and the tables those were taken from."""
    path = descendants(src) & (ancestors([dst]) | {dst})
    cache: dict[Node, Any] = {}
    found: list[Node] = []
    for node in sorted(path, key=lambda n: n.name):
        for i in node.all_input_nodes:
            if i not in path and i not in found and not is_symint(i):
                found.append(i)
                if view_base(i) not in found:
                    found.append(view_base(i))
    values = [evaluate_constant(gm, n, cache) for n in found]
    return [v for v in values if isinstance(v, Tensor)]


def _vector_candidates(weights: list[Tensor], heads: int, rank: int) -> list[Tensor]:
    out = []
    for w in weights:
        if w.is_floating_point() and w.numel() == heads * rank:
            out += [w.reshape(heads, rank), w.reshape(rank, heads).t()]
    if rank == 1:
        out.append(torch.ones(heads, 1))
    return out


def _core_candidates(weights: list[Tensor], heads: int, rank: int) -> list[Tensor]:
    out = []
    per_core = heads * rank * rank
    one_core = [w for w in weights if w.is_floating_point() and w.numel() == per_core]
    if len(one_core) > 1:  # cores read one at a time (``cores[c]`` in a loop): stack them
        weights = [*weights, torch.stack([w.reshape(heads, rank, rank) for w in one_core])]
    for w in weights:
        if w.is_floating_point() and w.numel() % per_core == 0 and w.numel() > 0:
            cores = w.numel() // per_core
            as_mhrr = w.reshape(cores, heads, rank, rank)
            out += [
                as_mhrr,
                as_mhrr.transpose(-1, -2),
                w.reshape(heads, cores, rank, rank).transpose(0, 1),
            ]
    if rank == 1:
        out.append(torch.ones(1, heads, 1, 1))
    return out


def hypotheses(gm: GraphModule, region: LookupRegion) -> Iterator[Binding]:
    row_in, col_in, final = region.row_topk.args[0], region.col_topk.args[0], region.final_topk
    n = region.row_topk.args[0].meta["val"].shape[-1]
    topm, topk = int(region.row_topk.args[1]), int(final.args[1])
    if int(region.col_topk.args[1]) != topm:
        raise NotALookup(
            f"row and column keep different candidate counts ({topm}, {region.col_topk.args[1]})"
        )
    tables = [get_attr_value(gm, t) for t in region.value_tables]
    if any(t.dim() != 2 or t.shape[0] != tables[0].shape[0] for t in tables):
        raise NotALookup(f"value tables {[tuple(t.shape) for t in tables]} are not [R, Dv] alike")
    # one table per core is the same as one table whose chunks are the cores' tables
    table = tables[0] if len(tables) == 1 else torch.cat(tables, dim=1)
    if (n * n) % table.shape[0]:
        raise NotALookup(f"value table {tuple(table.shape)} does not divide the n² = {n * n} slots")
    expansion = n * n // table.shape[0]
    ops = {node.target for node in region.nodes}
    activations = ["relu"] if ops & _RELU else ["softmax"] if ops & _SOFTMAX else ["none"]
    pooling = "scatter" if ops & _SCATTER else "add"
    slot_maps: list[Tensor | None] = [
        w
        for w in (get_attr_value(gm, x) for x in region.weights)
        if w.dtype == torch.int64 and w.numel() == n * n
    ] or [None]
    cand_nodes = [region.row_topk, region.col_topk]
    row_weights = _weights_between(gm, [region.row_scores], row_in)
    col_weights = _weights_between(gm, [region.col_scores], col_in)
    core_weights = _weights_between(gm, cand_nodes, final.args[0])
    if region.additive:
        yield from _additive_hypotheses(
            region, n, topm, topk, activations, slot_maps, expansion, pooling, table
        )
        return
    pooled_static = math.prod(s for s in region.pooled.meta["val"].shape if isinstance(s, int))
    col_candidates = _with_broadcast(_layouts(region.col_scores, n), col_weights)
    for row_layout in _with_broadcast(_layouts(region.row_scores, n), row_weights):
        col_layouts = [
            c for c in col_candidates if (c.heads, c.rank) == (row_layout.heads, row_layout.rank)
        ]
        h, r = row_layout.heads, row_layout.rank
        # pooled per head ([.., H, E, Dv]) only if the output has room for H·E·Dv per token
        per_head = h > 1 and pooled_static == h * expansion * table.shape[1]
        for col_layout, u, v, cores, act, smap, mapping, heads_first in itertools.product(
            col_layouts,
            _vector_candidates(row_weights, h, r),
            _vector_candidates(col_weights, h, r),
            _core_candidates(core_weights, h, r),
            activations,
            slot_maps,
            ("mod", "div"),
            (False, True) if per_head else (False,),
        ):
            common = (n, topm, topk, row_layout, col_layout, u, v, cores, act)
            if not per_head:
                yield Binding(*common, smap, expansion, mapping, pooling, table)
                continue
            moved, offsets = per_head_slots(smap, h, n * n, table.shape[0], expansion, mapping)
            yield Binding(
                *common,
                moved,
                h * expansion,
                mapping,
                pooling,
                table,
                slot_offsets=offsets,
                heads_first=heads_first,
            )


def _with_broadcast(layouts: list[Layout], weights: list[Tensor]) -> list[Layout]:
    """``layouts``, plus each head-less one read by H heads, for each H the weights allow
    (rank-1 vectors of H·r values: one score tensor shared by per-head selections)."""
    out = list(layouts)
    for layout in layouts:
        if layout.heads != 1 or layout.additive:
            continue
        counts = {w.numel() // layout.rank for w in weights if w.numel() % layout.rank == 0}
        for heads in sorted(c for c in counts if c > 1):
            out.append(Layout(layout.perm, heads, layout.rank, broadcast=True))
    return out


def _additive_hypotheses(
    region: LookupRegion,
    n: int,
    topm: int,
    topk: int,
    activations: list[str],
    slot_maps: list[Tensor | None],
    expansion: int,
    pooling: str,
    table: Tensor,
) -> Iterator[Binding]:
    """score = row + column: rows [s, 1] and columns [1, s] under the identity core,
    candidates chosen on s itself (u = [1, 0], v = [0, 1])."""
    for row_layout in (x for x in _layouts(region.row_scores, n) if x.rank == 1):
        h = row_layout.heads
        col_layouts = [x for x in _layouts(region.col_scores, n) if (x.heads, x.rank) == (h, 1)]
        for col_layout in col_layouts:
            u = torch.tensor([[1.0, 0.0]]).repeat(h, 1)
            v = torch.tensor([[0.0, 1.0]]).repeat(h, 1)
            cores = torch.eye(2).repeat(1, h, 1, 1)
            rows = Layout(row_layout.perm, h, 1, "row")
            cols = Layout(col_layout.perm, h, 1, "col")
            for act, smap, mapping in itertools.product(activations, slot_maps, ("mod", "div")):
                yield Binding(
                    n,
                    topm,
                    topk,
                    rows,
                    cols,
                    u,
                    v,
                    cores,
                    act,
                    smap,
                    expansion,
                    mapping,
                    pooling,
                    table,
                )


def verify(binding: Binding, probes: list[tuple[Tensor, Tensor, Tensor]]) -> float | None:
    """Max abs error over the probes if every one matches (fp32 atol 1e-5, rtol 1e-4), else None."""
    worst = 0.0
    for row_scores, col_scores, expected in probes:
        try:
            with torch.no_grad():
                got = run_fused(binding, row_scores, col_scores)
        except (ValueError, RuntimeError, IndexError):
            return None
        if got.numel() != expected.numel():
            return None
        got = got.reshape(expected.shape)
        if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            return None
        worst = max(worst, float((got - expected).abs().max()))
    return worst
