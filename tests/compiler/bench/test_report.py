"""bench.md from a report with known figures: p10 and p90 beside the median, the noise
warning when a spread is above the threshold and only then, ``≈`` within noise of eager,
the busy-machine warning from other processes' CPU time."""

from __future__ import annotations

from typing import Any

from ultramem.compiler.bench.report import markdown
from ultramem.compiler.bench.run import BUSY_RULE, NOISE_RULE, _against_eager
from ultramem.compiler.bench.timing import (
    BUSY_CORES,
    NOISE_SPREAD,
    OtherProcesses,
    relative_spread,
    too_busy,
    too_noisy,
)


def _row(p10: float, p50: float, p90: float) -> dict[str, Any]:
    spread = relative_spread(p10, p50, p90)
    return {
        "tokens": 64,
        "batch": 1,
        "status": "ok",
        "p10_ms": p10,
        "p50_ms": p50,
        "p90_ms": p90,
        "spread": spread,
        "noisy": too_noisy(p10, p50, p90),
    }


def _report(rows: dict[str, dict[str, Any]], other_cores: tuple[float, ...] = ()) -> dict[str, Any]:
    results = {name: [row] for name, row in rows.items()}
    _against_eager(results)
    noisy = [
        {"backend": n, "tokens": r["tokens"], "spread": r["spread"]}
        for n, r in rows.items()
        if r["noisy"]
    ]
    return {
        "model": "builtin:test",
        "batch": 1,
        "device": "cpu",
        "machine": {"processor": "x86_64", "cpu_count": 2},
        "created": "2026-01-01T00:00:00+00:00",
        "tokens": [64],
        "threads": 2,
        "timing": {
            "warmup": 3,
            "warm_per_round": 1,
            "warm_s": 0.002,
            "calls_per_round": 3,
            "block_s": 0.005,
            "budget_s": 0.5,
        },
        "noise": {"rule": NOISE_RULE, "threshold": NOISE_SPREAD, "noisy": noisy},
        "load": {
            "rule": BUSY_RULE,
            "threshold_cores": BUSY_CORES,
            "sizes": [
                {"tokens": 64, "other_cores": c, "window_s": 1.0, "busy": too_busy(c, 1.0)}
                for c in other_cores
            ],
        },
        "copy_bandwidth_gbs": 10.0,
        "backends": [
            {"name": n, "available": True, "reason": None, "results": results[n]} for n in rows
        ],
        "lookups": [],
    }


def test_tight_figures_give_no_warning_and_show_their_range() -> None:
    # (binary fractions: exact)
    report = _report(
        {"eager": _row(1.875, 2.0, 2.125), "onnxruntime-cpu": _row(0.9375, 1.0, 1.125)}
    )
    text = markdown(report)
    assert "| eager | 2.000 [1.875–2.125] (1.00×) |" in text
    assert "| onnxruntime-cpu | 1.000 [0.938–1.125] (2.00×) |" in text
    assert "too noisy" not in text and " !" not in text and "threads: 2" in text


def test_a_wide_spread_warns_and_overlapping_figures_are_marked() -> None:
    # eager spread (3 - 1) / 2 = 1.0 > 0.5; the other overlaps it with a median 0.25 away
    report = _report({"eager": _row(1.0, 2.0, 3.0), "aotinductor": _row(1.5, 1.75, 2.0)})
    rows = {b["name"]: b["results"][0] for b in report["backends"]}
    assert rows["eager"]["noisy"] and not rows["aotinductor"]["noisy"]
    assert rows["aotinductor"]["within_noise_of_eager"] is True
    text = markdown(report)
    assert "| eager | 2.000 [1.000–3.000] (1.00×) ! |" in text
    assert "| aotinductor | 1.750 [1.500–2.000] (≈1.14×) |" in text
    assert "**WARNING: too noisy to compare**" in text and "eager at 64 tok (1.00)" in text


class _Fake:
    """Readings of (all CPU seconds, this process's) and a clock, one per call."""

    def __init__(self, readings: list[tuple[float, float] | None], times: list[float]) -> None:
        self.readings, self.times = iter(readings), iter(times)

    def read(self) -> tuple[float, float] | None:
        return next(self.readings)

    def clock(self) -> float:
        return next(self.times)


def test_other_processes_are_all_cpu_time_minus_this_ones_over_the_window() -> None:
    # 2 s of wall: the machine spent 3.5 CPU s, this process 2.5 of them: 0.5 cores
    fake = _Fake([(100.0, 10.0), (103.5, 12.5)], [50.0, 52.0])
    assert OtherProcesses(fake.read, fake.clock).cores() == (0.5, 2.0)
    # tick rounding can make the difference negative: never below 0
    fake = _Fake([(100.0, 10.0), (101.0, 11.5)], [0.0, 1.0])
    assert OtherProcesses(fake.read, fake.clock).cores() == (0.0, 1.0)
    fake = _Fake([None, None], [0.0, 1.0])  # no /proc/stat: no figure
    assert OtherProcesses(fake.read, fake.clock).cores() == (None, 1.0)
    # a real reading where there is one: a figure, or None, never an error
    cores, window = OtherProcesses().cores()
    assert cores is None or cores >= 0.0
    assert window >= 0.0


def test_busy_verdict_needs_the_threshold_and_a_long_enough_window() -> None:
    assert BUSY_CORES == 0.25
    assert too_busy(0.25, 1.0) and not too_busy(0.24, 1.0)
    assert not too_busy(2.0, 0.1)  # 10 ms ticks: too short a window to tell
    assert not too_busy(None, 10.0)
    quiet = markdown(_report({"eager": _row(1.875, 2.0, 2.125)}, other_cores=(0.125,)))
    assert "busy machine" not in quiet
    busy = markdown(_report({"eager": _row(1.875, 2.0, 2.125)}, other_cores=(1.0,)))
    assert "**WARNING: busy machine**: other processes used cores while timing (1.00 at 64" in busy
