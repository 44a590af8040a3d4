"""fp32 parity of a stage that flips an exact tie: a runtime that computes the unfused
maths its own way (AOTInductor reorders a sum) may rank two tied slots the other way.

The flip is a near-tie at fp32's tolerance and passes as one; the output it moved (a whole
value row swapped) passes only when the stage, run again with its retrieves selecting what
the model selected, matches the model within the fp32 tolerance. A stage that cannot be
run so, or still differs with the model's selections, fails. Reference: the same function
in plain PyTorch on the unnudged scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ultramem.compiler.parity.selections import Site, SitePlan
from ultramem.compiler.parity.stages import Stage, run_parity, torch_stage
from ultramem.kernels import RETRIEVE_OP

N, T = 8, 3
PLAN = SitePlan((Site("retrieve", 0),), ("memory",))


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.rand(T, 1, N, 1, generator=gen)
    rows[:, :, 2] = rows[:, :, 5] = 10.0  # rows 2 and 5 tie exactly, at the top
    cols = torch.rand(T, 1, N, 1, generator=gen)
    return rows, cols, torch.randn(N * N, 4, generator=gen)


def lookup(rows: Tensor, cols: Tensor, table: Tensor) -> Tensor:
    ones = torch.ones(1, 1)
    scores, slots = RETRIEVE_OP(rows, cols, ones, ones, torch.ones(1, 1, 1, 1), 4, 1, "softmax")
    return (table[slots] * scores[..., None]).sum(-2)


def nudged(rows: Tensor, cols: Tensor, table: Tensor) -> Tensor:
    """The tie broken the other way by a rounding-sized change of row 5's scores."""
    rows = rows.clone()
    rows[:, :, 5] += 1e-5
    return lookup(rows, cols, table)


def test_a_flipped_tie_passes_when_the_models_selections_give_the_models_output() -> None:
    stage = torch_stage("compiled", nudged)
    report = run_parity(lookup, [stage], [_inputs()], PLAN)
    (selections,) = report.stages[0].selections
    assert selections.differing == T and selections.near_ties == T
    (out,) = report.stages[0].outputs
    assert report.passed and "with the model's selections" in out.message, out.message


def test_a_flipped_tie_fails_where_the_stage_cannot_be_run_with_the_models_selections() -> None:
    stage = torch_stage("compiled", nudged)
    report = run_parity(lookup, [Stage("runtime", stage.run)], [_inputs()], PLAN)
    assert report.stages[0].selections[0].near_ties == T
    assert not report.passed


def test_a_stage_off_beyond_the_flip_fails_with_the_models_selections() -> None:
    def off(rows: Tensor, cols: Tensor, table: Tensor) -> Tensor:
        return nudged(rows, cols, table) + 1e-2

    report = run_parity(lookup, [torch_stage("compiled", off)], [_inputs()], PLAN)
    (out,) = report.stages[0].outputs
    assert not report.passed and "still outside" in out.message, out.message
