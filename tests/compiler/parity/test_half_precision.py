"""Half-precision parity: near-ties at the dtype's resolution, the candidate stage, flips
after an earlier flip, and outputs judged by their distance from the fp32 maths.

Hand-built selections with known answers (bf16: eps = 2⁻⁷, the resolution 8·eps = 1/16
of a row's largest score), and a layer run in bf16 against itself in fp32.
"""

from __future__ import annotations

import pytest
import torch

from ultramem.compiler.parity.compare import (
    TOLERANCES,
    compare_outputs,
    compare_selections,
    judge_by_fp32_distance,
)
from ultramem.compiler.parity.selections import Selection

BF16 = TOLERANCES[torch.bfloat16]
FP16 = TOLERANCES[torch.float16]
FP32 = TOLERANCES[torch.float32]
N = 16  # keys per side: slot = row · N + column


def _selection(slots: list[int], values: list[float], **kw: object) -> Selection:
    return Selection(torch.tensor([slots]), torch.tensor([values]), N, **kw)  # type: ignore[arg-type]


def test_the_resolution_is_the_dtypes() -> None:
    assert BF16.resolution == pytest.approx(8 * 2**-7)
    assert FP16.resolution == pytest.approx(8 * 2**-10)
    assert FP32.resolution is None  # fp32 stays exact up to ties


def test_a_flip_within_the_bf16_resolution_is_a_near_tie_and_fp32_refuses_it() -> None:
    # k-th 1.00, the row's largest 4.00: bf16 resolves 0.25 there, so 0.95 ties 1.00
    ref = _selection([1, 2, 3], [4.0, 2.0, 1.0])
    cand = _selection([1, 2, 9], [4.0, 2.0, 0.95])
    half = compare_selections("L", ref, cand, BF16)
    assert half.passed and (half.differing, half.near_ties) == (1, 1)
    assert not compare_selections("L", ref, cand, FP32).passed


def test_a_flip_beyond_the_resolution_fails() -> None:
    ref = _selection([1, 2, 3], [4.0, 2.0, 1.0])
    cand = _selection([1, 2, 9], [4.0, 2.0, 0.6])  # 0.4 below the k-th; bf16 resolves 0.25
    assert not compare_selections("L", ref, cand, BF16).passed
    # fp16 resolves 0.031 at 4.0: 0.95 is a tie in bf16 and a real flip in fp16
    cand = _selection([1, 2, 9], [4.0, 2.0, 0.95])
    assert compare_selections("L", ref, cand, BF16).passed
    assert not compare_selections("L", ref, cand, FP16).passed


def test_a_slot_far_above_the_kth_is_no_tie_unless_its_row_was_a_boundary_candidate() -> None:
    ref_rows = torch.zeros(N)
    ref_rows[[0, 1, 2]] = torch.tensor([3.0, 2.0, 1.0])  # top-3 rows, the 3rd at 1.0
    ref_rows[5] = 0.99  # row 5 ties the 3rd candidate: a stage may keep it instead
    cols = torch.linspace(1.0, 0.0, N)
    kw = {"topm": 3, "row_ranked": ref_rows[None], "col_ranked": cols[None]}
    ref = _selection([0, 1, 2], [4.0, 3.0, 2.0], **kw)
    # the candidate kept row 5 among its candidates and found a slot scoring 3.5 there
    from_boundary = _selection([0, 1, 5 * N + 3], [4.0, 3.0, 3.5])
    assert compare_selections("L", ref, from_boundary, BF16).passed
    # the same score from row 7, which no stage had any reason to keep: a wrong ranking
    from_nowhere = _selection([0, 1, 7 * N + 3], [4.0, 3.0, 3.5])
    assert not compare_selections("L", ref, from_nowhere, BF16).passed


def test_after_an_earlier_flip_a_lookups_flips_are_counted_as_consequences() -> None:
    ref = _selection([1, 2, 3], [4.0, 2.0, 1.0])
    cand = _selection([1, 2, 9], [4.0, 2.0, 0.2])
    alone = compare_selections("L", ref, cand, BF16)
    after = compare_selections("L", ref, cand, BF16, after_flip=True)
    assert not alone.passed
    assert after.passed and after.consequential == 1 and "after an earlier flip" in after.message
    # fp32 stays exact: an earlier flip excuses nothing
    assert not compare_selections("L", ref, cand, FP32, after_flip=True).passed


def _bf16_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 maths, the model in bf16, a stage closer to fp32 than the model)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 32, generator=gen), torch.randn(32, 32, generator=gen)
    exact = x @ w
    model = (x.bfloat16() @ w.bfloat16()).float()
    return exact, model, exact.bfloat16().float()


def test_an_output_a_flip_moved_passes_when_no_further_from_fp32_than_the_model() -> None:
    exact, model, _ = _bf16_pair()
    moved = model.clone()
    moved[0] += 3.0  # one token's output moved by a value row: outside any tolerance
    outs = [compare_outputs("output 0 @ 64", model, moved, BF16, exact)]
    assert not outs[0].passed
    # the same stage elsewhere is as close to fp32 as the model, so over the inputs it is
    outs += [compare_outputs(f"output 0 @ {i}", model, model, BF16, exact) for i in range(40)]
    judge_by_fp32_distance(outs, BF16)
    assert outs[0].passed and "no further from the fp32 maths" in outs[0].message


def test_an_output_further_from_fp32_than_the_model_fails() -> None:
    exact, model, _ = _bf16_pair()
    wrong = model + 0.5 * exact.abs().mean()  # a systematic error, far beyond bf16's own
    outs = [compare_outputs("output 0 @ 64", model, wrong, BF16, exact)]
    judge_by_fp32_distance(outs, BF16)
    assert not outs[0].passed and "fp32 distance" in outs[0].message


def test_fp32_distances_are_reported_for_every_half_precision_output() -> None:
    exact, model, closer = _bf16_pair()
    out = compare_outputs("y", model, closer, BF16, exact)
    assert out.passed
    assert out.stage_fp32_distance is not None and out.model_fp32_distance is not None
    assert out.stage_fp32_distance < out.model_fp32_distance  # rounded once, not per product
    assert compare_outputs("y", exact, exact, FP32, exact).fp32_squares is None


def _retrieve_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    rows, cols = (torch.randn(5, 2, N, 2, generator=gen).to(dtype) for _ in range(2))
    u, v = torch.randn(2, 2, generator=gen), torch.randn(2, 2, generator=gen)
    return rows, cols, u, v, torch.randn(3, 2, 2, 2, generator=gen)


def test_a_forced_retrieve_selects_the_given_slots_and_scores_them_as_the_op_does() -> None:
    from ultramem.compiler.parity.selections import ForcingRecorder, run_recording_sites
    from ultramem.kernels import RETRIEVE_OP

    rows, cols, u, v, cores = _retrieve_inputs(torch.bfloat16)

    def lookup(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return RETRIEVE_OP(*args, 4, 3, "softmax")

    (own_scores, own_slots), _ = run_recording_sites(lookup, (rows, cols, u, v, cores))
    # forced to its own choice: the same outputs
    (scores, slots), _ = run_recording_sites(
        lookup, (rows, cols, u, v, cores), ForcingRecorder({0: own_slots})
    )
    assert torch.equal(slots, own_slots)
    torch.testing.assert_close(scores, own_scores, atol=0, rtol=0)
    # forced elsewhere: each core's grid score of those slots, softmax over them, in plain torch
    other = torch.randint(0, N * N, own_slots.shape)
    (scores, slots), _ = run_recording_sites(
        lookup, (rows, cols, u, v, cores), ForcingRecorder({0: other})
    )
    r = rows.float()[torch.arange(5)[:, None, None], torch.arange(2)[None, :, None], other // N]
    c = cols.float()[torch.arange(5)[:, None, None], torch.arange(2)[None, :, None], other % N]
    grid = torch.einsum("thkp,mhpq,thkq->thkm", r, cores, c)
    assert torch.equal(slots, other)
    torch.testing.assert_close(scores, grid.softmax(dim=2).bfloat16())


def test_an_input_whose_flips_are_all_near_ties_passes_on_direction_alone() -> None:
    from ultramem.compiler.parity.flips import by_direction

    _, model, _ = _bf16_pair()
    nudged = model.clone()
    nudged[0, :4] += 0.5  # a flip's share: outside the tolerance, the direction kept
    flipped = compare_selections(
        "L", _selection([1, 2, 3], [4.0, 2.0, 1.0]), _selection([1, 2, 9], [4.0, 2.0, 0.95]), BF16
    )
    out = compare_outputs("y", model, nudged, BF16)
    assert not out.passed and out.cosine >= BF16.min_cosine
    by_direction([out], [flipped], BF16)
    assert out.passed and "cosine to the model's" in out.message
    # no flip on the input: the tolerance itself holds
    same = compare_selections("L", _selection([1], [1.0]), _selection([1], [1.0]), BF16)
    out = compare_outputs("y", model, nudged, BF16)
    by_direction([out], [same], BF16)
    assert not out.passed


def test_with_the_models_selections_a_stage_still_off_is_left_to_the_fp32_distance() -> None:
    """Forced to the model's selections, an output still outside the tolerance differs for
    another reason than the flips: the cosine rule of runtimes outside PyTorch no longer
    applies to it, only the distance from the fp32 maths may still pass it."""
    from ultramem.compiler.parity.flips import with_the_models_selections
    from ultramem.compiler.parity.selections import RetrieveRecord, Site, SitePlan
    from ultramem.compiler.parity.stages import run_parity, torch_stage  # noqa: F401

    exact, model, _ = _bf16_pair()
    n, k = 8, 2
    rows, cols = torch.randn(1, 1, n, 1), torch.randn(1, 1, n, 1)
    record = RetrieveRecord(
        torch.zeros(1, 1, k, 1), torch.tensor([[[1, 2]]]), rows, cols, torch.ones(1, 1, 1, 1)
    )
    plan = SitePlan((Site("retrieve", 0),), ("L",))
    flipped = compare_selections(
        "L", _selection([1, 2, 3], [4.0, 2.0, 1.0]), _selection([1, 2, 9], [4.0, 2.0, 0.95]), BF16
    )
    moved = model + 0.5 * exact.abs().mean()  # off everywhere: no flip explains it

    def run(forced_output: torch.Tensor) -> tuple[bool, object]:
        out = compare_outputs("output 0 @ t", model, moved, BF16, exact)
        ran = with_the_models_selections(
            lambda inputs, slots: [forced_output], plan, (), [model], [record], plan,
            [record], [out], [flipped], BF16,
        )  # fmt: skip
        return ran, out

    ran, explained = run(model.clone())  # with the model's selections: the model's output
    assert ran and explained.passed and "with the model's selections" in explained.message
    ran, still_off = run(moved)
    assert ran and not still_off.passed and "still outside" in still_off.message
    judge_by_fp32_distance([still_off], BF16)
    assert not still_off.passed  # further from fp32 than the model: it fails
