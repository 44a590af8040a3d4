"""Parity stages: run the original model and each artifact on the same inputs, compare."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

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
from .selections import (
    ForcingRecorder,
    SitePlan,
    SiteRecord,
    forced_slots,
    layer_selections,
    run_recording_sites,
)

StageFn = Callable[[tuple[Any, ...], list[SiteRecord]], tuple[list[Tensor], list[SiteRecord]]]
"""Runs one stage on inputs; also gets the reference's site records, should a stage need them."""


ForcedFn = Callable[[tuple[Any, ...], dict[int, Tensor]], list[Tensor]]
"""Runs one stage on inputs with its fused retrieves selecting the given slots."""


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


def tensor_leaves(out: Any) -> list[Tensor]:
    return [x for x in tree_leaves(out) if isinstance(x, Tensor)]


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
    refs32 = _fp32_outputs(reference, inputs_list) if dtype in HALF_DTYPES else None
    reports = []
    source_runs: dict[int, tuple[list[Tensor], list[SiteRecord], SitePlan]] = {}
    for stage in stages:
        report = StageReport(stage.name)
        if stage.run is None:
            report.executed, report.reason = False, stage.reason
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
            refs32_i = refs32[i] if refs32 is not None else [None] * len(outs)
            compared = [
                compare_outputs(f"output {j} @ {tag}", r, c, tolerance, r32)
                for j, (r, c, r32) in enumerate(zip(ref_outs, outs, refs32_i, strict=True))
            ]
            selections = compare_lookups(
                tag, ref_records, plan, records, stage.plan or plan, tolerance
            )
            if tolerance.resolution is not None and any(not c.passed for c in compared):
                _with_the_models_selections(
                    stage, inputs, ref_outs, ref_records, plan, records, compared, selections,
                    tolerance,
                )  # fmt: skip
                if i in source_runs and all(c.passed for c in selections):
                    _as_its_source_program(
                        outs, records, stage.plan or plan, source_runs[i], compared, tolerance
                    )
                _by_direction(compared, selections, tolerance)
            if stage.name == source and all(c.passed for c in compared + selections):
                source_runs[i] = (outs, records, stage.plan or plan)
            report.outputs += compared
            report.selections += selections
        judge_by_fp32_distance(report.outputs, tolerance)
        reports.append(report)
    return ParityReport(reports, [[list(_shape_of(x))] for x in inputs_list], tolerance)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _by_direction(
    compared: list[OutputComparison], selections: list[SelectionComparison], tol: Tolerance
) -> None:
    """Half precision, the last resort for a runtime that can neither be made to select
    as the model did nor selected as its source program did: where every flip on this
    input was a near-tie (at least one), an output that still points the model's way
    (cosine at least the dtype's) passes, saying so. The other inputs, with no flip, are
    held to the tolerance itself."""
    flipped = any(c.differing for c in selections)
    if not flipped or not all(c.passed for c in selections):
        return
    for out in compared:
        if not out.passed and out.cosine >= tol.min_cosine:
            out.passed = True
            out.message = (
                f"{out.message.split(' | ')[0]} | near-tie flips moved it; its cosine to the "
                f"model's ({out.cosine:.6f}) is within the dtype's {tol.min_cosine}"
            )


def _as_its_source_program(
    outs: list[Tensor],
    records: list[SiteRecord],
    plan: SitePlan,
    source: tuple[list[Tensor], list[SiteRecord], SitePlan],
    compared: list[OutputComparison],
    tolerance: Tolerance,
) -> None:
    """Half precision, an artifact that cannot be made to select as the model did (a
    runtime outside PyTorch): where it selected exactly what the program it was made from
    selected, on the same input, and that program passed, its outputs are compared with
    that program's, within the tolerance."""
    source_outs, source_records, source_plan = source
    mine, theirs = layer_selections(records, plan), layer_selections(source_records, source_plan)
    if isinstance(mine, str) or isinstance(theirs, str) or len(mine) != len(theirs):
        return
    for a, b in zip(mine, theirs, strict=True):
        if a.slots.shape != b.slots.shape or not torch.equal(
            a.slots.sort(-1).values, b.slots.sort(-1).values
        ):
            return
    if len(source_outs) != len(outs):
        return
    for j, (out, want, got) in enumerate(zip(compared, source_outs, outs, strict=True)):
        if out.passed:
            continue
        again = compare_outputs(f"output {j}", want, got, tolerance)
        if again.passed:
            out.passed = True
            out.message = (
                f"{out.message.split(' | ')[0]} | near-tie flips moved it; it selects as the "
                f"fused program it was made from, and matches it: max_abs={again.max_abs:.3g}"
            )


def _with_the_models_selections(
    stage: Stage,
    inputs: tuple[Any, ...],
    ref_outs: list[Tensor],
    ref_records: list[SiteRecord],
    plan: SitePlan,
    records: list[SiteRecord],
    compared: list[OutputComparison],
    selections: list[SelectionComparison],
    tolerance: Tolerance,
) -> None:
    """Half precision, outputs outside the tolerance where every flip was a near-tie: run
    the stage again with its fused retrieves selecting what the model selected. Within the
    tolerance then, the outputs differed by the flips alone, which the selection rule
    judged: they pass, saying so. Where a stage cannot be run so (a runtime outside
    PyTorch), :func:`judge_by_fp32_distance` decides."""
    if stage.forced is None or not selections or not all(c.passed for c in selections):
        return
    reference = layer_selections(ref_records, plan)
    if isinstance(reference, str):
        return
    slots = forced_slots(stage.plan or plan, reference, records)
    if not slots:
        return
    try:
        outs = stage.forced(inputs, slots)
    except Exception:  # the stage cannot take these slots: the distance rule decides
        return
    if len(outs) != len(ref_outs):
        return
    for j, (out, ref, got) in enumerate(zip(compared, ref_outs, outs, strict=True)):
        if out.passed:
            continue
        again = compare_outputs(f"output {j}", ref, got, tolerance)
        if again.passed:
            out.passed = True
            out.message = (
                f"{out.message.split(' | ')[0]} | near-tie flips moved it; with the model's "
                f"selections: max_abs={again.max_abs:.3g} cosine={again.cosine:.8f}"
            )


def _fp32_outputs(
    reference: Callable[..., Any], inputs_list: list[tuple[Any, ...]]
) -> list[list[Tensor | None]] | None:
    """The reference's outputs with its weights and inputs in fp32: the maths a
    half-precision model approximates, which its stages are measured against when
    near-tie flips move an output (``compare.py``). None where it cannot be had."""
    if not isinstance(reference, torch.nn.Module):
        return None
    try:
        wide = copy.deepcopy(reference).float()
        outs = []
        with torch.no_grad():
            for inputs in inputs_list:
                leaves = tensor_leaves(wide(*tree_map(_fp32, inputs)))
                outs.append([x if x.is_floating_point() else None for x in leaves])
    except Exception:  # a model that cannot run in fp32 is judged against itself alone
        return None
    return outs


def _fp32(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dtype in HALF_DTYPES:
        return value.float()
    return value


def compare_lookups(
    tag: str,
    ref_records: list[SiteRecord],
    ref_plan: SitePlan,
    records: list[SiteRecord],
    plan: SitePlan,
    tolerance: Tolerance,
) -> list[SelectionComparison]:
    """Per lookup of ``ref_plan``, the reference's selected slots against a stage's (its
    sites read with ``plan``); one failed comparison when they cannot be aligned."""
    ref_sels = layer_selections(ref_records, ref_plan)
    cand_sels = layer_selections(records, plan)
    problem = next((x for x in (ref_sels, cand_sels) if isinstance(x, str)), None)
    if problem is None and len(ref_sels) != len(cand_sels):
        problem = (
            f"{len(cand_sels)} memory lookups selected slots vs {len(ref_sels)} in the "
            "reference: selections cannot be aligned"
        )
    if problem is not None:
        return [SelectionComparison(f"all @ {tag}", 0, 0, 0, False, problem)]
    out: list[SelectionComparison] = []
    for name, ref_sel, cand_sel in zip(ref_plan.names, ref_sels, cand_sels, strict=True):
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
