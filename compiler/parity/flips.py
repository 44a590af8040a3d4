"""Half-precision outputs that near-tie flips moved outside the tolerance: the rules
that still judge them (``compare.py``'s module docstring gives the order), and the fp32
reference they are measured against."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .compare import OutputComparison, SelectionComparison, Tolerance, compare_outputs
from .selections import SitePlan, SiteRecord, forced_slots, layer_selections, tensor_leaves

ForcedFn = Callable[[tuple[Any, ...], dict[int, Tensor]], list[Tensor]]
"""Runs one stage on inputs with its fused retrieves selecting the given slots."""

HALF_DTYPES = (torch.float16, torch.bfloat16)


def by_direction(
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


def as_its_source_program(
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
    _pass_within_tolerance(
        compared, source_outs, outs, tolerance,
        "it selects as the fused program it was made from, and matches it",
    )  # fmt: skip


def with_the_models_selections(
    forced: ForcedFn | None,
    stage_plan: SitePlan,
    inputs: tuple[Any, ...],
    ref_outs: list[Tensor],
    ref_records: list[SiteRecord],
    plan: SitePlan,
    records: list[SiteRecord],
    compared: list[OutputComparison],
    selections: list[SelectionComparison],
    tolerance: Tolerance,
) -> bool:
    """Half precision, outputs outside the tolerance where every flip was a near-tie: run
    the stage again with its fused retrieves selecting what the model selected. Within the
    tolerance then, the outputs differed by the flips alone, which the selection rule
    judged: they pass, saying so. Outside it, only the fp32-distance rule may still pass
    them (a stage that computes more exactly than a coarse model, as the fused ops do,
    differs from it even with its selections); the rules for stages that cannot be run so
    do not apply. True when the stage could be run so."""
    if forced is None or not selections or not all(c.passed for c in selections):
        return False
    reference = layer_selections(ref_records, plan)
    if isinstance(reference, str):
        return False
    slots = forced_slots(stage_plan, reference, records)
    if not slots:
        return False
    try:
        outs = forced(inputs, slots)
    except Exception:  # the stage cannot take these slots: the later rules decide
        return False
    if len(outs) != len(ref_outs):
        return False
    _pass_within_tolerance(compared, ref_outs, outs, tolerance, "with the model's selections")
    for out in compared:
        if not out.passed:
            out.message += " | with the model's selections still outside the tolerance"
    return True


def _pass_within_tolerance(
    compared: list[OutputComparison],
    wanted: list[Tensor],
    got: list[Tensor],
    tolerance: Tolerance,
    why: str,
) -> None:
    """Pass each failed output of ``compared`` whose ``got`` is within the tolerance of
    ``wanted`` (another run that explains the flips away), saying ``why``."""
    if len(wanted) != len(got):
        return
    for j, (out, want, have) in enumerate(zip(compared, wanted, got, strict=True)):
        if out.passed:
            continue
        again = compare_outputs(f"output {j}", want, have, tolerance)
        if again.passed:
            out.passed = True
            out.message = (
                f"{out.message.split(' | ')[0]} | near-tie flips moved it; {why}: "
                f"max_abs={again.max_abs:.3g} cosine={again.cosine:.8f}"
            )


def fp32_outputs(
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
