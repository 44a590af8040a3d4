"""Parity stages: run the original model and each artifact on the same inputs, compare."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ..capture import CaptureResult
from .compare import (
    OutputComparison,
    ParityReport,
    SelectionComparison,
    StageReport,
    Tolerance,
    compare_outputs,
    compare_selections,
    tolerance_for,
)
from .selections import (
    SiteRecord,
    layer_selections,
    run_recording_sites,
)

StageFn = Callable[[tuple[Any, ...], list[SiteRecord]], tuple[list[Tensor], list[SiteRecord]]]
"""Runs one stage on inputs; also gets the reference's site records, should a stage need them."""


@dataclass
class Stage:
    name: str
    run: StageFn | None
    reason: str = ""  # why it cannot run, when run is None


def torch_stage(name: str, fn: Callable[..., Any]) -> Stage:
    def run(inputs: tuple[Any, ...], _: list[SiteRecord]) -> tuple[list[Tensor], list[SiteRecord]]:
        out, records = run_recording_sites(fn, inputs)
        return tensor_leaves(out), records

    return Stage(name, run)


def tensor_leaves(out: Any) -> list[Tensor]:
    return [x for x in tree_leaves(out) if isinstance(x, Tensor)]


def parity_inputs(
    example_inputs: tuple[Any, ...], capture: CaptureResult, seed: int = 0
) -> list[tuple[Any, ...]]:
    """The example, plus batch/token sizes other than the example's, within the captured range."""
    gen = torch.Generator().manual_seed(seed)
    first = next((x for x in example_inputs if isinstance(x, Tensor) and x.dim() >= 2), None)
    if first is None:
        return [example_inputs]
    sizes = {(first.shape[0], first.shape[1])}
    batch_axis, token_axis = capture.axis(0, "batch"), capture.axis(0, "tokens")
    for b, t in ((1, 1), (1, 7), (3, 13), (1, 2 * first.shape[1] + 3)):
        b_ok = batch_axis is not None and batch_axis.dynamic and _within(b, batch_axis)
        t_ok = token_axis is not None and token_axis.dynamic and _within(t, token_axis)
        sizes.add((b if b_ok else first.shape[0], t if t_ok else first.shape[1]))
    example_size = (first.shape[0], first.shape[1])
    others = sorted(sizes - {example_size})
    return [example_inputs, *(like_inputs(example_inputs, b, t, gen) for b, t in others)]


def _within(size: int, axis: Any) -> bool:
    return (axis.min is None or size >= axis.min) and (axis.max is None or size <= axis.max)


def like_inputs(
    example: tuple[Any, ...], batch: int, tokens: int, gen: torch.Generator
) -> tuple[Any, ...]:
    out = []
    for x in example:
        if not isinstance(x, Tensor) or x.dim() < 2:
            out.append(x)
            continue
        shape = (batch, tokens, *x.shape[2:])
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(x.dtype))
        else:
            low, high = int(x.min()), int(x.max()) + 1
            out.append(torch.randint(low, high, shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def run_parity(
    reference: Callable[..., Any],
    stages: list[Stage],
    inputs_list: list[tuple[Any, ...]],
    layer_names: list[str],
    tolerance: Tolerance | None = None,
) -> ParityReport:
    ref_runs = [run_recording_sites(reference, inputs) for inputs in inputs_list]
    if tolerance is None:
        first_out = tensor_leaves(ref_runs[0][0])[0] if ref_runs else None
        dtype = first_out.dtype if first_out is not None else torch.float32
        tolerance = tolerance_for(dtype)
    reports = []
    for stage in stages:
        report = StageReport(stage.name)
        if stage.run is None:
            report.executed, report.reason = False, stage.reason
            reports.append(report)
            continue
        for i, (inputs, (ref_out, ref_records)) in enumerate(
            zip(inputs_list, ref_runs, strict=True)
        ):
            outs, records = stage.run(inputs, ref_records)
            ref_outs = tensor_leaves(ref_out)
            tag = "x".join(str(s) for s in _shape_of(inputs))
            if len(outs) != len(ref_outs):
                msg = f"{len(outs)} outputs != reference {len(ref_outs)}"
                report.outputs.append(_failed_output(f"input {i} @ {tag}", msg))
                continue
            for j, (r, c) in enumerate(zip(ref_outs, outs, strict=True)):
                report.outputs.append(compare_outputs(f"output {j} @ {tag}", r, c, tolerance))
            ref_sels, cand_sels = layer_selections(ref_records), layer_selections(records)
            if len(ref_sels) != len(cand_sels):
                msg = (
                    f"{len(cand_sels)} memory layers selected slots vs {len(ref_sels)} in the "
                    "reference: selections cannot be aligned"
                )
                report.selections.append(SelectionComparison(f"all @ {tag}", 0, 0, 0, False, msg))
                continue
            for j, (ref_sel, cand_sel) in enumerate(zip(ref_sels, cand_sels, strict=True)):
                layer = layer_names[j] if j < len(layer_names) else f"layer {j}"
                name = f"{layer} @ {tag}"
                report.selections.append(compare_selections(name, ref_sel, cand_sel, tolerance))
        reports.append(report)
    return ParityReport(reports, [[list(_shape_of(x))] for x in inputs_list], tolerance)


def _failed_output(name: str, message: str) -> OutputComparison:
    inf = float("inf")
    return OutputComparison(name, [], inf, inf, 0.0, 0, inf, False, message)


def _shape_of(inputs: tuple[Any, ...]) -> tuple[int, ...]:
    first = next((x for x in inputs if isinstance(x, Tensor)), None)
    return tuple(first.shape) if first is not None else ()
