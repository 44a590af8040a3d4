"""compare_outputs / compare_selections against hand-built cases with known answers."""

from __future__ import annotations

import torch

from ultramem.compiler.parity.compare import (
    TOLERANCES,
    ParityReport,
    StageReport,
    compare_outputs,
    compare_selections,
)
from ultramem.compiler.parity.selections import Selection

FP32 = TOLERANCES[torch.float32]


def test_identical_outputs_pass_and_need_no_tolerance() -> None:
    x = torch.randn(4, 5)
    c = compare_outputs("y", x, x.clone(), FP32)
    assert c.passed and c.max_abs == 0.0 and c.needed_atol == 0.0 and c.cosine > 0.9999999


def test_error_beyond_tolerance_fails_and_records_the_needed_atol() -> None:
    ref = torch.zeros(3)
    cand = torch.tensor([0.0, 5e-3, 0.0])
    c = compare_outputs("y", ref, cand, FP32)
    assert not c.passed
    assert abs(c.max_abs - 5e-3) < 1e-9 and abs(c.needed_atol - 5e-3) < 1e-9
    assert "allowed atol" in c.message


def test_nan_and_inf_fail_explicitly() -> None:
    ref = torch.ones(4)
    for bad in (float("nan"), float("inf")):
        cand = ref.clone()
        cand[2] = bad
        c = compare_outputs("y", ref, cand, FP32)
        assert not c.passed and c.nonfinite == 1 and "NaN/Inf" in c.message


def test_shape_mismatch_fails() -> None:
    c = compare_outputs("y", torch.zeros(2, 3), torch.zeros(3, 2), FP32)
    assert not c.passed and "shape" in c.message


def _selection(slots: list[list[int]], values: list[list[float]]) -> Selection:
    return Selection(torch.tensor(slots), torch.tensor(values))


def test_same_slots_in_another_order_agree() -> None:
    ref = _selection([[1, 2, 3]], [[3.0, 2.0, 1.0]])
    cand = _selection([[3, 1, 2]], [[1.0, 3.0, 2.0]])
    c = compare_selections("L", ref, cand, FP32)
    assert c.passed and c.differing == 0 and c.rows == 1


def test_flip_between_equal_scores_is_a_near_tie() -> None:
    # reference kept slot 3 (score 1.0); candidate kept slot 9 whose score ties it
    ref = _selection([[1, 2, 3], [4, 5, 6]], [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    cand = _selection([[1, 2, 9], [4, 5, 6]], [[3.0, 2.0, 1.0 - 1e-7], [3.0, 2.0, 1.0]])
    c = compare_selections("L", ref, cand, FP32)
    assert c.passed and c.differing == 1 and c.near_ties == 1 and c.rows == 2


def test_flip_to_a_clearly_lower_score_fails() -> None:
    ref = _selection([[1, 2, 3]], [[3.0, 2.0, 1.0]])
    cand = _selection([[1, 2, 9]], [[3.0, 2.0, 0.5]])
    c = compare_selections("L", ref, cand, FP32)
    assert not c.passed and c.differing == 1 and c.near_ties == 0


def test_slots_numbered_differently_are_not_near_ties() -> None:
    # the same (row, col) pairs read with rows and columns swapped: every value is one the
    # reference also has, so a one-sided gap test would call each row a tie; the slots
    # that differ sit far above the k-th score, so none is
    n = 16
    pairs = [(1, 5), (2, 7), (3, 9)]
    ref = _selection([[r * n + c for r, c in pairs]], [[3.0, 2.0, 1.0]])
    cand = _selection([[c * n + r for r, c in pairs]], [[3.0, 2.0, 1.0]])
    c = compare_selections("L", ref, cand, FP32)
    assert not c.passed and c.differing == 1 and c.near_ties == 0


def test_a_report_that_compared_nothing_fails() -> None:
    report = ParityReport([StageReport("onnx")], [], FP32)
    assert not report.passed and not bool(report)
    assert any(
        line.startswith("FAILED | onnx | nothing was compared") for line in report.summary_lines()
    )


def test_a_skipped_stage_is_reported_but_does_not_pass_alone() -> None:
    only_skipped = ParityReport([StageReport("trt", executed=False, reason="no GPU")], [], FP32)
    assert not only_skipped.passed
    assert only_skipped.summary_lines()[0] == "SKIPPED | trt | no GPU"
