"""Parity stages: run the original model and each artifact on the same inputs, compare."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import first_line
from .compare import (
    OutputComparison,
    ParityReport,
    SelectionComparison,
    StageReport,
    Tolerance,
    compare_outputs,
    compare_selections,
    judge_by_fp32_distance,
    tolerance_for,
)
from .flips import (
    HALF_DTYPES,
    ForcedFn,
    as_its_source_program,
    by_direction,
    fp32_outputs,
    with_the_models_selections,
)
from .selections import (
    ForcingRecorder,
    Selection,
    SitePlan,
    SiteRecord,
    TopkRecord,
    layer_selections,
    retrieve_selections,
    run_recording_sites,
    tensor_leaves,
)

StageFn = Callable[[tuple[Any, ...], list[SiteRecord]], tuple[list[Tensor], list[SiteRecord]]]
"""Runs one stage on inputs; also gets the reference's site records, should a stage need them."""


@dataclass
class Stage:
    name: str
    run: StageFn | None
    reason: str = ""  # why it cannot run, when run is None
    plan: SitePlan | None = None  # its sites' lookups (None: the reference's)
    forced: ForcedFn | None = None  # where its retrieves can be made to select given slots


def torch_stage(name: str, fn: Callable[..., Any], plan: SitePlan | None = None) -> Stage:
    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> tuple[list[Tensor], list[SiteRecord]]:
        out, records = run_recording_sites(fn, inputs)
        return tensor_leaves(out), records

    def forced(inputs: tuple[Any, ...], slots: dict[int, Tensor]) -> list[Tensor]:
        out, _ = run_recording_sites(fn, inputs, ForcingRecorder(slots))
        return tensor_leaves(out)

    return Stage(name, run, plan=plan, forced=forced)


def run_parity(
    reference: Callable[..., Any],
    stages: list[Stage],
    inputs_list: list[tuple[Any, ...]],
    plan: SitePlan,
    tolerance: Tolerance | None = None,
    source: str | None = None,
) -> ParityReport:
    """Every stage against ``reference`` on every input: outputs, and per lookup of
    ``plan`` (the reference's sites) the selected slots. ``source``: the stage that runs
    the program the others' artifacts were made from (half precision: an artifact that
    selects as it does is compared with it where near-tie flips moved an output)."""
    ref_runs = [run_recording_sites(reference, inputs) for inputs in inputs_list]
    first_out = tensor_leaves(ref_runs[0][0])[0] if ref_runs else None
    dtype = first_out.dtype if first_out is not None else torch.float32
    if tolerance is None:
        tolerance = tolerance_for(dtype)
    refs32 = fp32_outputs(reference, inputs_list) if dtype in HALF_DTYPES else None
    reports = []
    source_runs: dict[int, tuple[list[Tensor], list[SiteRecord], SitePlan]] = {}
    for stage in stages:
        report = StageReport.of(stage.name, None if stage.run is not None else stage.reason)
        if stage.run is None:
            reports.append(report)
            continue
        for i, (inputs, (ref_out, ref_records)) in enumerate(
            zip(inputs_list, ref_runs, strict=True)
        ):
            tag = "x".join(str(s) for s in _shape_of(inputs))
            try:
                outs, records = stage.run(inputs, ref_records)
            except Exception as exc:  # a runtime's own error: the stage fails, others go on
                msg = f"the stage raised {type(exc).__name__}: {first_line(exc, 300)}"
                report.outputs.append(_failed_output(f"input {i} @ {tag}", msg))
                break
            ref_outs = tensor_leaves(ref_out)
            if len(outs) != len(ref_outs):
                msg = f"{len(outs)} outputs != reference {len(ref_outs)}"
                report.outputs.append(_failed_output(f"input {i} @ {tag}", msg))
                continue
            refs32_i = refs32[i] if refs32 is not None else []
            if len(refs32_i) != len(outs):  # no fp32 run, or one with other outputs
                refs32_i = [None] * len(outs)
            compared = [
                compare_outputs(f"output {j} @ {tag}", r, c, tolerance, r32)
                for j, (r, c, r32) in enumerate(zip(ref_outs, outs, refs32_i, strict=True))
            ]
            selections = compare_lookups(
                tag, ref_records, plan, records, stage.plan or plan, tolerance
            )
            half = tolerance.resolution is not None
            # fp32 too: a runtime that compiles the unfused maths its own way (AOTInductor)
            # may flip a near-tie, and with the model's selections it must then match
            if any(not c.passed for c in compared) and (
                half or any(c.near_ties for c in selections)
            ):
                # the rules for outputs a flip moved, in compare.py's order; a stage run
                # with the model's selections has its verdict from that run
                forced = with_the_models_selections(
                    stage.forced, stage.plan or plan, inputs, ref_outs, ref_records, plan,
                    records, compared, selections, tolerance,
                )  # fmt: skip
                if half and not forced and i in source_runs and all(c.passed for c in selections):
                    as_its_source_program(
                        outs, records, stage.plan or plan, source_runs[i], compared, tolerance
                    )
                if half and not forced:
                    by_direction(compared, selections, tolerance)
            if stage.name == source and all(c.passed for c in compared + selections):
                source_runs[i] = (outs, records, stage.plan or plan)
            report.outputs += compared
            report.selections += selections
        judge_by_fp32_distance(report.outputs, tolerance)
        reports.append(report)
    return ParityReport(reports, [[list(_shape_of(x))] for x in inputs_list], tolerance)


def compare_lookups(
    tag: str,
    ref_records: list[SiteRecord],
    ref_plan: SitePlan,
    records: list[SiteRecord],
    plan: SitePlan,
    tolerance: Tolerance,
) -> list[SelectionComparison]:
    """Per lookup of ``ref_plan``, the reference's selected slots against a stage's (its
    sites read with ``plan``); one failed comparison when they cannot be aligned. A model
    with no lookup has no selection to compare (a router's top-k is no lookup's); a
    runtime that compiles top-k into its own code shows only its fused lookups'."""
    if not ref_plan.names:
        return []
    ref_sels = layer_selections(ref_records, ref_plan)
    cand_sels: list[Selection | None] | str = layer_selections(records, plan)  # type: ignore[assignment]
    if isinstance(cand_sels, str) and not any(isinstance(r, TopkRecord) for r in records):
        cand_sels = retrieve_selections(records, plan)
    problem = next((x for x in (ref_sels, cand_sels) if isinstance(x, str)), None)
    if problem is None and len(ref_sels) != len(cand_sels):
        problem = (
            f"{len(cand_sels)} memory lookups selected slots vs {len(ref_sels)} in the "
            "reference: selections cannot be aligned"
        )
    if problem is not None:
        return [SelectionComparison(f"all @ {tag}", 0, 0, 0, False, problem)]
    out: list[SelectionComparison] = []
    for name, ref_sel, cand_sel in zip(ref_plan.names, ref_sels, cand_sels, strict=True):  # type: ignore[arg-type]
        if cand_sel is None:
            unseen = "not observable: this runtime compiles the lookup's top-k into its code"
            out.append(SelectionComparison(f"{name} @ {tag}", 0, 0, 0, True, unseen))
            continue
        after_flip = any(c.differing for c in out)
        out.append(
            compare_selections(f"{name} @ {tag}", ref_sel, cand_sel, tolerance, after_flip)  # type: ignore[arg-type]
        )
    return out


def _failed_output(name: str, message: str) -> OutputComparison:
    inf = float("inf")
    return OutputComparison(name, [], inf, inf, 0.0, 0, inf, False, message)


def _shape_of(inputs: tuple[Any, ...]) -> tuple[int, ...]:
    first = next((x for x in inputs if isinstance(x, Tensor)), None)
    return tuple(first.shape) if first is not None else ()
