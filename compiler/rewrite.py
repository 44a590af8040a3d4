"""The pass pipeline: rewrite a captured program, re-capture it, prove it, roll back what fails.

Order (one explicit list): drop inference-mode dropout, fold weight-only maths, merge common
subexpressions, give exhaustive grids candidate top-ks, fuse memory lookups, write the
embedding bags left as gathers and reductions and exclusive-ors of flags without bitwise
ops, turn einsums with a weight into matrix products, remove dead code. The rewritten
module is captured again with ``torch.export`` and the same dynamic axes, then compared
with the original model on several inputs, always, fused or not. When parity fails:

- with lookups fused: the lookups whose selections differ (else, found one at a time) are
  rolled back (the pipeline runs again with them left unfused) and reported;
- with none fused (or when rolling back does not help): a pass other than the fusion
  changed the model's numbers. That is the pass's fault, not a near-tie: each is left out
  in turn, the first one whose absence restores parity is disabled and reported, and
  export goes on without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram

from ..passes.base import Pass, PassContext, PassResult
from ..passes.decompose_embedding_bag import decompose_embedding_bag
from ..passes.drop_inference_dropout import drop_inference_dropout
from ..passes.einsum_weights_to_matmul import einsum_weights_to_matmul
from ..passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from ..passes.eliminate_dead_code import eliminate_dead_code
from ..passes.exhaustive_grids_to_candidates import exhaustive_grids_to_candidates
from ..passes.flags_without_bitwise_ops import flags_without_bitwise_ops
from ..passes.fold_constants import fold_constants
from ..passes.fuse_memory_lookup import fuse_memory_lookup
from ..passes.lookups import LookupReport, SelectionSummary
from .capture import CaptureResult, parity_inputs, recapture
from .parity.compare import ParityReport
from .parity.selections import GridReading, SitePlan, site_plan
from .parity.stages import run_parity, torch_stage

log = logging.getLogger(__name__)

PIPELINE: list[Pass] = [
    drop_inference_dropout,
    fold_constants,
    eliminate_common_subexpressions,
    exhaustive_grids_to_candidates,
    fuse_memory_lookup,
    decompose_embedding_bag,
    flags_without_bitwise_ops,
    einsum_weights_to_matmul,
    eliminate_dead_code,
]
FUSED_OPS = ("ultramem.retrieve", "ultramem.aggregate")
FUSION = "fuse_memory_lookup"


@dataclass
class RewriteResult:
    program: ExportedProgram
    passes: list[PassResult]
    fused_layers: list[str]  # lookups (final top-k names) whose selection is fused
    plan: SitePlan  # the original program's lookups, as parity reads them
    rolled_back: dict[str, str] = field(default_factory=dict)
    disabled_passes: dict[str, str] = field(default_factory=dict)
    parity: ParityReport | None = None

    def log_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.passes]

    @property
    def fusion(self) -> PassResult:
        return next(p for p in self.passes if p.name == FUSION)


def op_counts(program: ExportedProgram) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "_name", None) or getattr(node.target, "__name__", "")
            name = str(name or node.target).removeprefix("aten::").replace("::", ".")
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def run_passes(
    capture: CaptureResult, ctx: PassContext
) -> tuple[ExportedProgram, list[PassResult]]:
    gm = capture.program.module()
    results = []
    for p in PIPELINE:
        if p.__name__ in ctx.disabled_passes:
            continue
        res = p(gm, ctx)
        log.info(
            "%s: %d matched, %d changed, nodes %d -> %d",
            res.name, len(res.matched), len(res.changed), res.nodes_before, res.nodes_after,
        )  # fmt: skip
        results.append(res)
        gm = res.gm
    return recapture(gm, capture), results


def _readings(results: list[PassResult]) -> dict[str, GridReading]:
    """How parity reads each fused lookup's top-ks, as its fused selection proved them."""
    fusion = next((r for r in results if r.name == FUSION), None)
    lookups: dict[str, LookupReport] = (
        fusion.details.get("lookups", {}) if fusion is not None else {}
    )
    out = {}
    for name, report in lookups.items():
        summary = report.selection.summary if report.selection is not None else None
        if isinstance(summary, SelectionSummary):
            out[name] = GridReading(summary.rows_second, summary.rows_outer)
    return out


def rewrite(
    model: torch.nn.Module, capture: CaptureResult, example_inputs: tuple[Any, ...]
) -> RewriteResult:
    inputs = parity_inputs(example_inputs, capture)
    # the passes prove their rewrites on the activations of the inputs the capture traced:
    # a batch-1 or one-token example is widened there, and sizes of 1 read from the user's
    # would be baked into a graph whose dims are symbolic
    traced = capture.program.example_inputs
    example_inputs = tuple(traced[0]) if traced is not None else example_inputs
    ctx = PassContext(example_inputs)
    rolled_back: dict[str, str] = {}
    disabled: dict[str, str] = {}

    def attempt(context: PassContext) -> tuple[ExportedProgram, list[PassResult], ParityReport]:
        program, results = run_passes(capture, context)
        plan = site_plan(capture.program.graph, _readings(results))
        stage = torch_stage("fused", program.module(), site_plan(program.graph))
        return program, results, run_parity(model, [stage], inputs, plan)

    while True:
        program, results, report = attempt(ctx)
        plan = site_plan(capture.program.graph, _readings(results))
        fusion = next((r for r in results if r.name == FUSION), None)
        fused = list(fusion.changed) if fusion is not None else []
        if report.passed:
            return RewriteResult(program, results, fused, plan, rolled_back, disabled, report)
        reason = next((x for x in report.summary_lines() if x.startswith("FAILED")), "FAILED")
        if fused:
            failed = [x for x in _failed_layers(report, fusion.matched, plan) if x in fused]
            if not failed:  # outputs differ but no selection does: one layer at a time
                for name in fused:
                    alone = PassContext(
                        example_inputs, {*fusion.matched} - {name}, set(ctx.disabled_passes)
                    )
                    if not attempt(alone)[2].passed:
                        failed.append(name)
            for name in failed or fused:
                rolled_back[name] = f"parity against the original failed after fusion: {reason}"
                ctx.skip_layers.add(name)
                log.warning("rolled back the fusion of %s: %s", name, reason)
            continue
        culprit = _culprit(attempt, ctx, example_inputs)
        if culprit is None:
            log.warning("parity fails even with every pass left out: %s", reason)
            return RewriteResult(program, results, fused, plan, rolled_back, disabled, report)
        disabled[culprit] = f"changed the model's numbers, so it was left out: {reason}"
        ctx.disabled_passes.add(culprit)
        log.warning("pass %s changed the model's numbers; left out: %s", culprit, reason)


def _culprit(attempt: Any, ctx: PassContext, example_inputs: tuple[Any, ...]) -> str | None:
    """The first pass (other than the fusion) whose absence restores parity."""
    for p in PIPELINE:
        name = p.__name__
        if name == FUSION or name in ctx.disabled_passes:
            continue
        trial = PassContext(example_inputs, set(ctx.skip_layers), {*ctx.disabled_passes, name})
        if attempt(trial)[2].passed:
            return name
    return None


def _failed_layers(report: ParityReport, matched: list[str], plan: SitePlan) -> list[str]:
    """Fused lookups (by final top-k name) whose selections differed."""
    bad = {c.layer.split(" @ ")[0] for s in report.stages for c in s.selections if not c.passed}
    return [m for m, name in zip(matched, plan.names, strict=False) if name in bad]
