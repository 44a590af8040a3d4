"""Latency measurement: warm-up, enough repetitions, percentiles.

On the CPU, ``time.perf_counter_ns`` around each call. On a GPU, CUDA events around each
call, after a synchronising warm-up, so that the figure is device time plus launch
overhead as a caller sees it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MIN_REPS = 5
MAX_REPS = 200


@dataclass
class Timing:
    samples_ms: list[float]

    def percentile(self, q: float) -> float:
        data = sorted(self.samples_ms)
        if not data:
            return float("nan")
        pos = (len(data) - 1) * q
        lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    @property
    def p50(self) -> float:
        return self.percentile(0.5)

    @property
    def p90(self) -> float:
        return self.percentile(0.9)

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else float("nan")


def measure(
    fn: Callable[[], Any], device: str = "cpu", budget_s: float = 1.0, warmup: int = 3
) -> Timing:
    """Time ``fn`` until about ``budget_s`` seconds are spent (between MIN_REPS and MAX_REPS)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < MAX_REPS and (len(samples) < MIN_REPS or spent < budget_s):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter_ns()
            fn()
            ms = (time.perf_counter_ns() - t0) / 1e6
        samples.append(ms)
        spent += ms / 1e3
    return Timing(samples)


def copy_bandwidth_gbs(device: str = "cpu", mbytes: int = 256) -> float:
    """Measured read+write bandwidth of a large copy: the reference for memory floors."""
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, budget_s=0.3)
    return 2 * src.numel() * 4 / (timing.p50 / 1e3) / 1e9
