"""Percentiles, the noise rules and the interleaving order, on known samples and fake
backends: no test here depends on how fast anything runs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ultramem.compiler.bench import timing
from ultramem.compiler.bench.timing import (
    MIN_REPS,
    MIN_ROUNDS,
    NOISE_SPREAD,
    Timing,
    interleave,
    too_noisy,
    within_noise,
)


def test_percentiles_of_known_samples() -> None:
    # 1..11 in shuffled order: rank (n-1)·q lands exactly on a sample
    samples = [float(v) for v in range(1, 12)]
    random.Random(0).shuffle(samples)
    timing = Timing(samples)
    assert (timing.p10, timing.p50, timing.p90) == (2.0, 6.0, 10.0)
    assert timing.p99 == pytest.approx(10.9, abs=1e-12)
    assert timing.spread == pytest.approx((10 - 2) / 6, abs=1e-12)


def test_percentiles_match_numpy_between_ranks() -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(0.0, 0.4, size=37).tolist()
    timing = Timing(samples)
    for q in (0.1, 0.5, 0.9, 0.99):
        want = float(np.percentile(samples, 100 * q, method="linear"))
        assert timing.percentile(q) == pytest.approx(want, rel=1e-12, abs=0)
    assert np.isnan(Timing([]).p50)


def test_noise_warning_on_a_wide_spread_and_not_on_a_tight_one() -> None:
    rng = np.random.default_rng(1)
    tight = Timing((1.0 + 0.02 * rng.standard_normal(100)).tolist())  # ±2 %: spread ≈ 0.05
    wide = Timing(rng.uniform(0.5, 2.0, 100).tolist())  # spread ≈ 1.2 / 1.25
    assert tight.spread < 0.1 and not too_noisy(tight.p10, tight.p50, tight.p90)
    assert wide.spread > 0.8 and too_noisy(wide.p10, wide.p50, wide.p90)
    # the threshold itself: exactly at it is not noisy, just above it is
    assert not too_noisy(0.75, 1.0, 1.25) and too_noisy(0.75, 1.0, 1.25 + 1e-9)
    assert NOISE_SPREAD == 0.5
    assert too_noisy(float("nan"), float("nan"), float("nan"))


def test_within_noise_needs_overlap_and_a_small_median_gap() -> None:
    # (binary fractions, so the comparisons are exact)
    # overlapping ranges, medians 0.125 apart, ranges 0.5 wide: indistinguishable
    assert within_noise((0.75, 1.0, 1.25), (1.0, 1.125, 1.5))
    # disjoint ranges: distinguishable however wide they are
    assert not within_noise((0.75, 1.0, 1.25), (1.5, 1.75, 2.0))
    # touching ranges, but medians 0.75 apart, wider than either range (0.5, 0.625)
    assert not within_noise((0.75, 1.0, 1.25), (1.25, 1.75, 1.875))


def _recording(log: list[str], names: list[str]) -> dict[str, Callable[[], None]]:
    return {name: (lambda name=name: log.append(name)) for name in names}


def test_rounds_rotate_and_every_backend_gets_as_many_samples() -> None:
    log: list[str] = []
    names = ["a", "b", "c"]
    # an unreachable budget: the cap on rounds ends it; no minimum seconds per block, so
    # the call counts alone shape a round
    result = interleave(
        _recording(log, names),
        budget_s=1e9,
        warmup=2,
        calls_per_round=3,
        warm_per_round=1,
        block_s=0.0,
        warm_s=0.0,
        max_rounds=7,
    )
    assert result.rounds == 7
    assert result.order == [names[r % 3 :] + names[: r % 3] for r in range(7)]
    # warm-up first, backend by backend; then per round, per backend 1 untimed + 3 timed
    expected = [n for n in names for _ in range(2)]
    for order in result.order:
        expected += [n for n in order for _ in range(1 + 3)]
    assert log == expected
    assert {n: len(t.samples_ms) for n, t in result.timings.items()} == dict.fromkeys(names, 21)


def test_a_spent_budget_still_gives_the_minimum_rounds() -> None:
    log: list[str] = []
    result = interleave(
        _recording(log, ["x", "y"]),
        budget_s=0.0,
        warmup=0,
        calls_per_round=2,
        block_s=0.0,
        warm_s=0.0,
    )
    rounds = max(MIN_ROUNDS, -(-MIN_REPS // 2))
    assert result.order == [["x", "y"], ["y", "x"], ["x", "y"]][:rounds]
    assert all(len(t.samples_ms) == 2 * rounds for t in result.timings.values())
    assert interleave({}, budget_s=1.0).rounds == 0


def test_fast_calls_fill_a_block_of_minimum_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call "takes" 1 ms (a fake clock): a block of >= 4.5 ms is 5 timed calls, its
    warm-up of >= 1.5 ms 2 untimed ones, and the budget counts timed calls only."""

    def one_ms(fn: Callable[[], Any], device: str = "cpu") -> float:
        fn()
        return 1.0

    monkeypatch.setattr(timing, "time_call", one_ms)
    log: list[str] = []
    result = interleave(
        _recording(log, ["a", "b"]),
        budget_s=0.0195,  # 2 × 19.5 ms of timed calls: 4 rounds of 2 × 5 ms
        warmup=1,
        calls_per_round=3,
        warm_per_round=1,
        block_s=0.0045,
        warm_s=0.0015,
    )
    assert result.rounds == 4
    assert all(t.samples_ms == [1.0] * 20 for t in result.timings.values())
    expected = ["a", "b"]
    for order in result.order:
        expected += [n for n in order for _ in range(2 + 5)]
    assert log == expected
