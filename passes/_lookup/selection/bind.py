"""Bind a lookup's selection to ``ultramem::retrieve``: the rules in order, depth first.

``SELECTION_RULES`` is the order; each rule admits alternatives or fails (``rules``), and
the first hypothesis ``output_proof`` accepts is the binding. A refusal carries the
furthest rule any hypothesis reached (``NotALookup.furthest``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import record_values, run_widened
from ..anchors import LookupAnchors, topk_count, topk_dim
from ..region import Region, region_between
from ..rules import Failure, NotALookup, RuleTracer
from . import activation, grid_order, layout, merge_weights, outputs, proof, score_source
from .binding import ScoreSide, SelectionBinding
from .score_source import Side

RANDOM_PROBES = 2
CANDIDATES_RULE = "candidate_counts"
SELECTION_RULES = (
    outputs.RULE,
    CANDIDATES_RULE,
    score_source.SOURCE_RULE,
    score_source.SIDES_RULE,
    layout.RULE,
    merge_weights.VECTORS_RULE,
    merge_weights.CORES_RULE,
    proof.RULE,
    grid_order.RULE,
    activation.RULE,
)


def token_sizes(example: tuple[Any, ...]) -> frozenset[int]:
    """Sizes the example's batch and sequence give a token dim (b, l, b·l)."""
    first = next((x for x in example if isinstance(x, Tensor) and x.dim() >= 2), None)
    if first is None:
        return frozenset()
    batch, seq = int(first.shape[0]), int(first.shape[1])
    return frozenset({batch, seq, batch * seq})


def bind_selection(
    gm: GraphModule, lookup: LookupAnchors, example: tuple[Any, ...]
) -> tuple[SelectionBinding, Region]:
    tracer = RuleTracer(SELECTION_RULES)
    found = outputs.check(lookup)
    if isinstance(found, Failure):
        raise tracer.refuse(found.reason, found)
    outs = found
    topm = topk_count(lookup.candidates[0])
    if any(topk_count(c) != topm for c in lookup.candidates):
        reason = f"row and column keep different candidate counts in {lookup.name}"
        raise tracer.refuse(reason, Failure.at(CANDIDATES_RULE, reason, lookup.final))
    cand_inputs = [c.args[0] for c in lookup.candidates]
    n = int(cand_inputs[0].meta["val"].shape[topk_dim(lookup.candidates[0])])
    topk = topk_count(lookup.final)
    tokens = token_sizes(example)
    sources_found = score_source.check_sources(lookup)
    if isinstance(sources_found, Failure):
        raise tracer.refuse(sources_found.reason, sources_found)
    tried = 0
    for sources, additive in sources_found:
        distinct = list(dict.fromkeys(sources))
        with tracer.rule(score_source.SOURCE_RULE):
            region = region_between(gm, distinct, outs, f"the selection ending at {lookup.name}")
        wanted = {*distinct, *outs, *region.extra_inputs, *cand_inputs}
        wanted |= {*lookup.candidates, lookup.final}
        real = record_values(gm, example, wanted)
        module = region.module(gm)
        extras = [real[e] for e in region.extra_inputs]
        gen = torch.Generator().manual_seed(0)
        probes = [([real[s] for s in distinct], [real[o] for o in outs])]
        for _ in range(RANDOM_PROBES):
            xs = [torch.randn(real[s].shape, generator=gen).to(real[s].dtype) for s in distinct]
            with torch.no_grad():
                ys = run_widened(module, *xs, *extras)
            probes.append((xs, list(ys)))
        sides = score_source.check_sides(lookup, sources)
        if isinstance(sides, Failure):
            raise tracer.refuse(sides.reason, sides)
        for swapped, (row_side, col_side) in enumerate([sides, sides[::-1]]):
            hypotheses = _hypotheses(
                gm, lookup, row_side, col_side, additive, n, topm, topk, real, tokens, tracer
            )
            for binding in hypotheses:
                tried += 1
                error = proof.check(binding, outs, probes, distinct)
                if isinstance(error, Failure):
                    tracer.record(error)
                    continue
                binding.verified_max_abs = error
                binding.rows_second = bool(swapped)
                binding.rows_outer = grid_order.rows_outer(lookup, binding, real, n)
                activation.absorb_activation(gm, binding, distinct, probes, example)
                return binding, region
    raise NotALookup(
        f"no binding of ultramem::retrieve reproduces the selection ending at {lookup.name} "
        f"({tried} hypotheses: the scores are not a Tucker or additive grid of two sides)",
        tracer.furthest,
    )


def _hypotheses(
    gm: GraphModule,
    lookup: LookupAnchors,
    row_side: Side,
    col_side: Side,
    additive: bool,
    n: int,
    topm: int,
    topk: int,
    real: dict[Node, Any],
    tokens: frozenset[int],
    tracer: RuleTracer,
) -> Iterator[SelectionBinding]:
    """Every binding the rules admit for one assignment of the sides, in the order tried."""
    final = lookup.final
    if additive:
        weights: list[Tensor] = []
        core_weights: list[Tensor] = []
    else:
        weights = merge_weights.weights_on_path(gm, [row_side[0]], lookup.candidates[0].args[0])
        if not lookup.joint:
            weights += merge_weights.weights_on_path(
                gm, [col_side[0]], lookup.candidates[-1].args[0]
            )
        core_weights = merge_weights.weights_on_path(gm, list(lookup.candidates), final.args[0])
    views = layout.check(row_side, col_side, n, additive, tokens)
    if isinstance(views, Failure):
        tracer.record(views)
        return
    sizes = {"n": n, "topm": topm, "topk": topk}
    for row_layout, col_layout, heads, rank in views:
        head_counts = [heads]
        if heads == 1 and not additive:  # no head dim: maybe one tensor read by H heads
            counts = {w.numel() // rank for w in weights if w.numel() % rank == 0}
            head_counts += sorted(counts - {0, 1})
        rows = ScoreSide(row_side[0], row_side[1], row_layout)
        cols = ScoreSide(col_side[0], col_side[1], col_layout)
        for h in head_counts:
            broadcast = h != heads
            if additive:  # score = row + column: rank 2, rows [s, 1], columns [1, s]
                yield SelectionBinding(
                    lookup=lookup, rows=rows, cols=cols, heads=h, rank=2, **sizes,
                    row_weight=torch.tensor([[1.0, 0.0]]).repeat(h, 1),
                    col_weight=torch.tensor([[0.0, 1.0]]).repeat(h, 1),
                    cores=torch.eye(2).repeat(1, h, 1, 1), additive=True, broadcast=broadcast,
                )  # fmt: skip
                continue
            us = merge_weights.check_vectors(
                rows, weights, h, rank, real, lookup.candidates[0], broadcast, n
            )
            vs = merge_weights.check_vectors(
                cols, weights, h, rank, real, lookup.candidates[-1], broadcast, n
            )
            cores = merge_weights.check_cores(core_weights, h, rank)
            failed = [f for f in (us, vs, cores) if isinstance(f, Failure)]
            if failed:
                tracer.record(failed[0])
                continue
            for u, v, core in itertools.product(us, vs, cores):  # type: ignore[arg-type]
                yield SelectionBinding(
                    lookup=lookup, rows=rows, cols=cols, heads=h, rank=rank, **sizes,
                    row_weight=u, col_weight=v, cores=core, additive=False, broadcast=broadcast,
                )  # fmt: skip
