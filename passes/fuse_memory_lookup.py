"""Fuse each memory lookup's two expensive parts into ``ultramem::retrieve`` and ``::aggregate``.

Rewrite, per lookup (``lookups.find_lookups``: a final top-k over a grid of candidates):

- selection: score tensors → rank-1 merge → top-m → grid scores → top-k → the selection's
  outputs (slot ids or their rows/columns, per-core scores, ranked values)  ⟶  one
  ``retrieve`` call and views of its outputs (``_lookup/selection/``);
- aggregation: value-table reads at indices computed from the slot ids → weighting →
  pooling (scatter-add, scatter, sums, ``embedding_bag``)  ⟶  one ``aggregate`` call with
  the index maps computed from the model's own glue (``_lookup/aggregation/``).

Each part is bound and fused on its own: a gate, a shared table or an activation between
them stays as the model's ordinary ops on [T, H, k] tensors, and a part that does not bind
leaves the other fused. Several lookups pooled by one aggregation (heads in a Python loop,
joined with ``cat``) fuse their selections one by one and their aggregation once.

Constraints: a part is replaced only when the fused op reproduces it on the model's real
activations and on random inputs; anything else is left alone and reported, per part,
with the reason and the furthest binding rule it reached (``details["lookups"]``: typed
``LookupReport`` records, JSON in ``PassResult.to_json``). Run after ``fold_constants``
(weights reached through SVDs or norms are plain buffers) and before dead-code removal.
"""

from __future__ import annotations

import logging
import traceback

from torch.fx import GraphModule, Node

from ._lookup.aggregation import AGGREGATION_RULES, bind_aggregation, fuse_aggregation
from ._lookup.anchors import merged_grids
from ._lookup.reads import read_indices, value_reads
from ._lookup.records import LookupReport, PartReport
from ._lookup.rules import Failure, NotALookup, furthest
from ._lookup.selection import bind_selection, fuse_selection
from .base import PassContext, PassResult, Refusal, count_nodes, finish
from .lookups import LookupAnchors, find_lookups

log = logging.getLogger(__name__)


def _internal(part: str, exc: Exception) -> str:
    """A binder error is a bug to report, not "not a lookup": say so, keep the graph."""
    log.warning("fuse_memory_lookup: %s binder failed:\n%s", part, traceback.format_exc())
    return f"internal error while binding the {part} (please report): {type(exc).__name__}: {exc}"


def _in_sorted_order(lookup: LookupAnchors) -> None:
    """A lookup's top-ks with ``sorted=False`` (Csordas's PKM) promise their k entries in
    no order: sorted is one order they may return, and the one the fused op's is."""
    for node in (*lookup.candidates, lookup.final):
        if len(node.args) > 4:
            node.args = (*node.args[:4], True, *node.args[5:])
        elif node.kwargs.get("sorted") is False:
            node.kwargs = {**node.kwargs, "sorted": True}


def fuse_memory_lookup(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "fuse_memory_lookup", nodes_before=count_nodes(gm))
    lookups = find_lookups(gm.graph)
    if not lookups:
        result.details["note"] = "no memory lookup in this graph: passed through unchanged"
    merged = {
        final.name: (
            f"its top-k ranks the candidate grids of {count} selections together (a top-k "
            "across heads or memories): ultramem::retrieve selects per head, so it is left "
            "as the model wrote it"
        )
        for final, count in merged_grids(gm.graph)
    }
    if merged:
        result.details["merged_grids"] = merged
        result.refused += [Refusal(name, reason) for name, reason in merged.items()]
    parts: dict[str, LookupReport] = {}
    calls: dict[Node, str] = {}  # retrieve call -> its lookup
    for index, lookup in enumerate(lookups):
        name = lookup.name
        result.matched.append(name)
        parts[name] = LookupReport()
        if name in ctx.skip_layers or lookup.exhaustive:
            reason = (
                "kept unfused: its fusion failed parity earlier"
                if name in ctx.skip_layers
                else "an exhaustive grid is fused once exhaustive_grids_to_candidates gave it "
                "candidates, and that pass did not run"
            )
            parts[name].selection = PartReport.refused(reason)
            result.refused.append(Refusal(name, reason))
            continue
        _in_sorted_order(lookup)
        reached: Failure | None = None
        try:
            binding, _ = bind_selection(gm, lookup, ctx.example_inputs)
        except NotALookup as exc:
            reason, reached = str(exc), exc.furthest
        except Exception as exc:  # a bug in the binder must not cost the user the export
            reason = _internal("selection", exc)
        else:
            call = fuse_selection(gm, binding, f"_ultramem_{index}")
            calls[call] = name
            parts[name].selection = PartReport(fused=True, summary=binding.summary())
            result.changed.append(name)
            continue
        parts[name].selection = PartReport.refused(reason, reached)
        result.refused.append(Refusal(name, f"selection: {reason}"))
    finish(gm)
    _fuse_aggregations(gm, ctx, calls, parts, result)
    finish(gm)
    result.details["lookups"] = parts
    result.nodes_after = count_nodes(gm)
    log.info("fuse_memory_lookup: %d of %d selections fused", len(result.changed), len(lookups))
    return result


def _fuse_aggregations(
    gm: GraphModule,
    ctx: PassContext,
    calls: dict[Node, str],
    parts: dict[str, LookupReport],
    result: PassResult,
) -> None:
    """Bind each read's aggregation once; report, per fused selection, why none bound."""
    sources = [n for n in gm.graph.nodes if n in calls]
    reasons: dict[Node, list[str]] = {}  # every read tried, and why it did not bind
    reached: dict[Node, list[Failure]] = {}  # and the furthest rule each try reached
    done: set[Node] = set()
    for index, (read, sharing) in enumerate(value_reads(gm, sources)):
        if read in done or read.graph is not gm.graph or not read.users:
            continue
        group = [read]
        siblings = [
            r for r, s in value_reads(gm, list(sharing))
            if r is not read and r not in done and read_indices(r) == read_indices(read)
        ]  # fmt: skip
        attempts = [group + siblings, group] if siblings else [group]
        for reads in attempts:
            try:
                binding, _ = bind_aggregation(gm, reads, list(sharing), ctx.example_inputs)
            except NotALookup as exc:
                for s in sharing:
                    reasons.setdefault(s, []).append(str(exc))
                    if exc.furthest is not None:
                        reached.setdefault(s, []).append(exc.furthest)
                continue
            except Exception as exc:
                for s in sharing:
                    reasons.setdefault(s, []).append(_internal("aggregation", exc))
                continue
            fuse_aggregation(gm, binding, f"_ultramem_agg_{index}")
            done.update(reads)
            summary = binding.summary(shared_with=tuple(calls[x] for x in sharing))
            for s in sharing:
                parts[calls[s]].aggregation = PartReport(fused=True, summary=summary)
                reasons.pop(s, None)
                reached.pop(s, None)
            break
    for call, name in calls.items():
        if parts[name].aggregation is None:
            tried = reasons.get(call)
            why = (
                "; ".join(dict.fromkeys(tried))
                if tried
                else ("no value table is read at indices computed from its slots")
            )
            got_to = furthest(reached.get(call, []), AGGREGATION_RULES)
            parts[name].aggregation = PartReport.refused(why, got_to)
            result.refused.append(Refusal(name, f"aggregation: {why}"))
