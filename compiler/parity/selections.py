"""Which memory slots each stage selected, so parity can count flipped selections.

A lookup is discontinuous: a tiny numeric difference can flip a selected slot. Parity
records every top-k and fused retrieval a stage computes ("sites", in execution order),
and a *site plan* says which sites belong to which lookup, from the lookups the graph
holds (``passes.lookups.find_lookups``: the one definition, so an MoE router's top-k is
never taken for a memory layer). Per lookup, its sites become selected slot ids:

    rows  I_row = topk(a_row, m),  columns  I_col = topk(a_col, m)   (or one joint top-k)
    final pos = topk(grid, k) over the m × m grid
    slots = I_row[pos // m] · n + I_col[pos % m]        (a fused ``retrieve``: its slots)

and the values that ranked them: the final top-k's values, or for a fused retrieve the
grid scores at its slots recomputed from its inputs (before any activation), so that the
near-tie verdict compares like with like. PyTorch stages are recorded with a dispatch mode
that sees every ``aten.topk`` and ``ultramem::retrieve`` call (no cooperation from the
model's code); ONNX stages expose their TopK and Retrieve nodes' tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph, Node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ...kernels import RETRIEVE, RETRIEVE_OP
from ...kernels.retrieve import apply_activation
from ...passes.lookups import find_lookups, grid_slots, ranked_last

TOPK = torch.ops.aten.topk.default


@dataclass
class TopkRecord:
    values: Tensor
    indices: Tensor
    input_size: int  # length of the dimension top-k ran over
    dim: int = -1  # that dimension, non-negative
    ranked: Tensor | None = None  # what it ranked (a candidate stage's near-ties read it)

    def ranked_last(self) -> tuple[Tensor, Tensor]:
        return ranked_last(self.values, self.dim), ranked_last(self.indices, self.dim)


@dataclass
class RetrieveRecord:
    """One ``ultramem::retrieve`` call: what it selected and what it ranked them from."""

    scores: Tensor
    slots: Tensor
    row_scores: Tensor
    col_scores: Tensor
    cores: Tensor
    row_weight: Tensor | None = None
    col_weight: Tensor | None = None


SiteRecord = TopkRecord | RetrieveRecord


@dataclass(frozen=True)
class Site:
    """A site's role: ``row``/``col``/``joint``/``final`` top-k, or ``retrieve``, of lookup
    ``lookup``; ``other`` for a top-k that is no lookup's (a router)."""

    role: str
    lookup: int | None = None
    side_dim: int = 0  # a joint top-k: the dim of its output holding the two sides
    row_side: int = 0  # a joint top-k: which side holds the rows
    rows_outer: bool = True  # the final top-k: the rows are the grid's outer axis
    exhaustive_n: int = 0  # the final top-k of an exhaustive grid: its positions are slots


@dataclass(frozen=True)
class GridReading:
    """How to read one lookup's top-ks as the fused op's slot ids (the fusion pass proves
    it on the model's own activations): which candidate is the op's rows, and whether the
    model flattened its grid with the rows outer."""

    rows_second: bool = False
    rows_outer: bool = True


@dataclass(frozen=True)
class SitePlan:
    sites: tuple[Site, ...]
    names: tuple[str, ...]  # one per lookup, in graph order


@dataclass
class Selection:
    """Selected slot ids [rows, k] and the scores that ranked them (same order); for a
    model's own top-ks also the scores its candidate top-ks ranked ([rows, n] per side),
    so that a flip decided at the candidate stage can be judged there."""

    slots: Tensor
    values: Tensor
    n: int = 0  # keys per side: slot = row · n + column
    topm: int = 0
    row_ranked: Tensor | None = None
    col_ranked: Tensor | None = None


class SiteRecorder(TorchDispatchMode):
    """Records every top-k and fused retrieval; ``run_op`` says how an op runs (as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[SiteRecord] = []

    def run_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = self.run_op(func, args, kwargs or {})
        if func is TOPK:
            x = args[0]
            dim = args[2] if len(args) > 2 else (kwargs or {}).get("dim", -1)
            values, indices = out
            dim = int(dim) % max(x.dim(), 1)
            self.records.append(
                TopkRecord(values.detach(), indices.detach(), x.shape[dim], dim, x.detach())
            )
        elif func is RETRIEVE_OP:
            bound = RETRIEVE.bind(*args, **(kwargs or {}))
            scores, slots = out
            self.records.append(
                RetrieveRecord(
                    scores.detach(),
                    slots.detach(),
                    bound["row_scores"].detach(),
                    bound["col_scores"].detach(),
                    bound["cores"].detach(),
                    bound["row_weight"].detach(),
                    bound["col_weight"].detach(),
                )
            )
        return out


def tensor_leaves(out: Any) -> list[Tensor]:
    """The tensors of a (nested) output, in order."""
    return [x for x in tree_leaves(out) if isinstance(x, Tensor)]


def run_recording_sites(
    fn: Callable[..., Any], inputs: tuple[Any, ...], recorder: SiteRecorder | None = None
) -> tuple[Any, list[SiteRecord]]:
    """Run ``fn`` and record every top-k and fused retrieval it computes, in order."""
    recorder = recorder if recorder is not None else SiteRecorder()
    with torch.no_grad(), recorder:
        out = fn(*inputs)
    return out, recorder.records


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, _ = list(stack.values())[-1]
    return str(path) or "<root>"


def site_plan(graph: Graph, readings: Mapping[str, GridReading] | None = None) -> SitePlan:
    """The plan of a captured (or rewritten) graph: one site per top-k or retrieve node, in
    graph order. ``readings`` says, per lookup (by final top-k), how its fused selection
    reads the top-ks (default: rows first and outer)."""
    readings = readings or {}
    lookups = find_lookups(graph)
    anchors = {lk.final: lk for lk in lookups}
    sites: list[Site] = []
    names: list[str] = []
    roles: dict[Node, Site] = {}
    count = 0
    for node in graph.nodes:
        if node in anchors:
            lk = anchors[node]
            reading = readings.get(lk.name, GridReading())
            order = lk.candidates[::-1] if reading.rows_second else lk.candidates
            if lk.grid is not None:
                roles[node] = Site("final", count, exhaustive_n=lk.grid.n)
            elif lk.joint:
                side = 1 if reading.rows_second else 0
                roles[lk.candidates[0]] = Site("joint", count, lk.side_dim or 0, side)
            else:
                roles[order[0]], roles[order[1]] = Site("row", count), Site("col", count)
            roles.setdefault(node, Site("final", count, rows_outer=reading.rows_outer))
            names.append(_module_path(node))
            count += 1
        elif node.op == "call_function" and node.target is RETRIEVE_OP:
            roles[node] = Site("retrieve", count)
            names.append(_module_path(node))
            count += 1
    for node in graph.nodes:
        if node.op == "call_function" and (node.target is TOPK or node.target is RETRIEVE_OP):
            sites.append(roles.get(node, Site("other")))
    return SitePlan(tuple(sites), _unique(names))


def inlined(plan: SitePlan) -> SitePlan:
    """The plan of a program whose retrieves are inlined into standard ops (the portable
    ONNX form): each retrieve's body ranks rows, then columns, then the grid."""
    sites: list[Site] = []
    for site in plan.sites:
        if site.role == "retrieve":
            sites += [Site(role, site.lookup) for role in ("row", "col", "final")]
        else:
            sites.append(site)
    return SitePlan(tuple(sites), plan.names)


def _unique(names: list[str]) -> tuple[str, ...]:
    """Module paths, numbered where one module holds several lookups (heads in a loop)."""
    totals = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if totals[n] == 1 else f"{n}#{seen[n]}")
    return tuple(out)


def memory_layer_names(graph: Graph) -> list[str]:
    """Names (module paths) of the lookups in a graph, fused or not, in order."""
    return list(site_plan(graph).names)


def layer_selections(records: list[SiteRecord], plan: SitePlan) -> list[Selection] | str:
    """One selection per lookup of ``plan`` (in its order), or why the records do not
    follow the plan."""
    if len(records) != len(plan.sites):
        return (
            f"{len(records)} top-k/retrieve calls recorded, the graph has {len(plan.sites)}: "
            "selections cannot be aligned"
        )
    parts: dict[int, dict[str, Any]] = {}
    for record, site in zip(records, plan.sites, strict=True):
        if site.lookup is not None:
            parts.setdefault(site.lookup, {})[site.role] = (record, site)
    out = []
    for index in range(len(plan.names)):
        part = parts.get(index, {})
        selection = _selection(part)
        if isinstance(selection, str):
            return f"lookup {plan.names[index]}: {selection}"
        out.append(selection)
    return out


def retrieve_selections(records: list[SiteRecord], plan: SitePlan) -> list[Selection | None] | str:
    """For a runtime that compiles top-k into its own code (AOTInductor: an unfused
    lookup's or a router's ``topk`` never reaches the dispatcher), the selections of the
    fused lookups alone, None for the others; or why the records do not follow even that."""
    if any(isinstance(r, TopkRecord) for r in records):
        return "it recorded top-ks, so all of them should have been"
    sites = [s for s in plan.sites if s.role == "retrieve"]
    if len(records) != len(sites):
        return (
            f"{len(records)} retrieve calls recorded, the graph has {len(sites)}: "
            "selections cannot be aligned"
        )
    out: list[Selection | None] = [None] * len(plan.names)
    for record, site in zip(records, sites, strict=True):
        if site.lookup is not None:
            selection = _selection({"retrieve": (record, site)})
            out[site.lookup] = selection if isinstance(selection, Selection) else None
    return out


def _selection(part: dict[str, Any]) -> Selection | str:
    """The lookup's selection from its recorded sites, or why it cannot be read."""
    if "retrieve" in part:
        rec: RetrieveRecord = part["retrieve"][0]
        k = rec.slots.shape[-1]
        ranking = ranking_scores(rec.row_scores, rec.col_scores, rec.cores, rec.slots)
        n, topm = rec.row_scores.shape[2], 0
        merged: list[Tensor | None] = [None, None]
        if rec.row_weight is not None and rec.col_weight is not None:
            merged = [
                (scores.float() * weight.float()[None, :, None, :]).sum(-1).reshape(-1, n)
                for scores, weight in (
                    (rec.row_scores, rec.row_weight),
                    (rec.col_scores, rec.col_weight),
                )
            ]
        return Selection(rec.slots.reshape(-1, k), ranking.reshape(-1, k), n, topm, *merged)
    if "final" not in part:
        return "its final top-k was not recorded"
    final: TopkRecord = part["final"][0]
    final_site: Site = part["final"][1]
    if final_site.exhaustive_n:  # the n × n grid flattened rows outer: positions are slots
        values, slots = final.ranked_last()
        k, n = slots.shape[-1], final_site.exhaustive_n
        return Selection(slots.reshape(-1, k), values.reshape(-1, k).float(), n, n)
    ranked: tuple[Tensor | None, Tensor | None] = (None, None)
    if "joint" in part:
        joint, site = part["joint"]
        indices = (
            joint.indices.select(site.side_dim, site.row_side),
            joint.indices.select(site.side_dim, 1 - site.row_side),
        )
        dim = joint.dim - (1 if site.side_dim < joint.dim else 0)
        rows, cols = (ranked_last(i, dim) for i in indices)
        n = joint.input_size
        if joint.ranked is not None:
            sides = (site.row_side, 1 - site.row_side)
            ranked = tuple(ranked_last(joint.ranked.select(site.side_dim, s), dim) for s in sides)  # type: ignore[assignment]
    elif "row" in part and "col" in part:
        row, col = part["row"][0], part["col"][0]
        rows, cols = row.ranked_last()[1], col.ranked_last()[1]
        n = col.input_size
        if row.ranked is not None and col.ranked is not None:
            ranked = (ranked_last(row.ranked, row.dim), ranked_last(col.ranked, col.dim))
    else:
        return "its candidate top-ks were not recorded"
    values, pos = final.ranked_last()
    slots = grid_slots(rows, cols, pos, n, final_site.rows_outer)
    if slots is None:
        return (
            f"the final top-k's positions {tuple(pos.shape)} do not index the grid of "
            f"candidates {tuple(rows.shape)} x {tuple(cols.shape)}"
        )
    k = pos.shape[-1]
    row_ranked, col_ranked = (
        r.reshape(-1, r.shape[-1]).float() if r is not None and r.shape[-1] == n else None
        for r in ranked
    )
    if any(r is None or r.shape[0] != slots.numel() // k for r in (row_ranked, col_ranked)):
        row_ranked = col_ranked = None  # the rows do not line up: judge the grid alone
    return Selection(
        slots.reshape(-1, k), values.reshape(-1, k).float(), n, int(rows.shape[-1]),
        row_ranked, col_ranked,
    )  # fmt: skip


def ranking_scores(row_scores: Tensor, col_scores: Tensor, cores: Tensor, slots: Tensor) -> Tensor:
    """The grid score Σ_c row[s div n] · C_c · col[s mod n] of each selected slot [T, H, k]:
    what a retrieve ranked, before any activation."""
    return core_scores(row_scores, col_scores, cores, slots).sum(-1)


def core_scores(row_scores: Tensor, col_scores: Tensor, cores: Tensor, slots: Tensor) -> Tensor:
    """Each core's grid score row[s div n] · C_c · col[s mod n] of slots [T, H, k], in
    fp32: [T, H, k, M], a retrieve's scores before its activation."""
    n, rank = row_scores.shape[2], row_scores.shape[3]
    index = slots.long()
    rows = row_scores.float().gather(2, (index // n).unsqueeze(-1).expand(-1, -1, -1, rank))
    cols = col_scores.float().gather(2, (index % n).unsqueeze(-1).expand(-1, -1, -1, rank))
    return torch.einsum("thkp,chpq,thkq->thkc", rows, cores.float(), cols)


class ForcingRecorder(SiteRecorder):
    """A :class:`SiteRecorder` whose fused retrieves select the given slots instead of
    their own: ``forced[i]`` are the slots [T, H, k] of the i-th top-k/retrieve call, its
    scores computed from the call's own inputs as the op would (half-precision parity
    compares outputs with the model's selections, where near-tie flips moved them)."""

    def __init__(self, forced: dict[int, Tensor]) -> None:
        super().__init__()
        self.forced = forced
        self.calls = 0

    def run_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        index = self.calls
        if func is TOPK or func is RETRIEVE_OP:
            self.calls += 1
        if func is not RETRIEVE_OP or index not in self.forced:
            return func(*args, **kwargs)
        bound = RETRIEVE.bind(*args, **kwargs)
        slots = self.forced[index].to(bound["row_scores"].device)
        scores = core_scores(bound["row_scores"], bound["col_scores"], bound["cores"], slots)
        scores = apply_activation(scores, bound["activation"])
        return scores.to(bound["row_scores"].dtype), slots


def forced_slots(
    plan: SitePlan, selections: list[Selection], records: list[SiteRecord]
) -> dict[int, Tensor] | None:
    """Per retrieve call of a stage (by call index, its ``records`` read with ``plan``),
    the reference's slots of its lookup in the call's own [T, H, k] shape; None when a
    lookup's rows do not line up with the call's."""
    forced = {}
    for index, (site, record) in enumerate(zip(plan.sites, records, strict=True)):
        if site.role != "retrieve" or site.lookup is None:
            continue
        wanted = selections[site.lookup].slots
        if not isinstance(record, RetrieveRecord) or wanted.numel() != record.slots.numel():
            return None
        forced[index] = wanted.reshape(record.slots.shape).to(record.slots.dtype)
    return forced
