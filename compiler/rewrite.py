"""The pass pipeline: rewrite a captured program, re-capture it, prove it, roll back what fails.

Order (one explicit list): fold weight-only maths, fuse memory lookups, remove dead
code. The rewritten module is captured again with ``torch.export`` and the same dynamic
axes, then compared with the original model on several inputs; a memory layer whose
selections or outputs differ is rolled back (the pipeline runs again with that layer
left unfused) and reported, and export goes on with what is safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram

from ..passes.base import Pass, PassContext, PassResult
from ..passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from ..passes.eliminate_dead_code import eliminate_dead_code
from ..passes.fold_constants import fold_constants
from ..passes.fuse_memory_lookup import fuse_memory_lookup
from .capture import CaptureResult, recapture
from .parity.compare import ParityReport
from .parity.stages import parity_inputs, run_parity, torch_stage

log = logging.getLogger(__name__)

PIPELINE: list[Pass] = [
    fold_constants,
    eliminate_common_subexpressions,
    fuse_memory_lookup,
    eliminate_dead_code,
]
FUSED_OPS = ("ultramem.retrieve", "ultramem.aggregate")


@dataclass
class RewriteResult:
    program: ExportedProgram
    passes: list[PassResult]
    fused_layers: list[str]
    rolled_back: dict[str, str] = field(default_factory=dict)
    parity: ParityReport | None = None

    def log_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.passes]


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
        res = p(gm, ctx)
        log.info(
            "%s: %d matched, %d changed, nodes %d -> %d",
            res.name,
            len(res.matched),
            len(res.changed),
            res.nodes_before,
            res.nodes_after,
        )
        results.append(res)
        gm = res.gm
    return recapture(gm, capture), results


def rewrite(
    model: torch.nn.Module,
    capture: CaptureResult,
    example_inputs: tuple[Any, ...],
    layer_names: list[str],
) -> RewriteResult:
    ctx = PassContext(example_inputs)
    inputs = parity_inputs(example_inputs, capture)
    rolled_back: dict[str, str] = {}

    def attempt(context: PassContext) -> tuple[ExportedProgram, list[PassResult], ParityReport]:
        program, results = run_passes(capture, context)
        stage = torch_stage("fused", program.module())
        return program, results, run_parity(model, [stage], inputs, layer_names)

    while True:
        program, results, report = attempt(ctx)
        fuse = next(r for r in results if r.name == "fuse_memory_lookup")
        if report.passed or not fuse.changed:
            return RewriteResult(program, results, fuse.changed, rolled_back, report)
        failed = [x for x in _failed_layers(report, fuse.matched, layer_names) if x in fuse.changed]
        if not failed:
            # Outputs differ but no selection does: find the culprits by fusing one at a time.
            for name in fuse.changed:
                alone = PassContext(example_inputs, {*fuse.matched} - {name})
                if not attempt(alone)[2].passed:
                    failed.append(name)
        reason = next(x for x in report.summary_lines() if x.startswith("FAILED"))
        for name in failed or fuse.changed:
            rolled_back[name] = f"parity against the original failed after fusion: {reason}"
            ctx.skip_layers.add(name)
            log.warning("rolled back the fusion of %s: %s", name, reason)


def _failed_layers(report: ParityReport, matched: list[str], layer_names: list[str]) -> list[str]:
    """Fused layers (by final top-k name) whose selections differed."""
    bad = {
        c.layer.split(" @ ")[0] for stage in report.stages for c in stage.selections if not c.passed
    }
    return [m for m, name in zip(matched, layer_names, strict=False) if name in bad]
