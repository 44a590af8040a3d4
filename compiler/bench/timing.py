"""Latency measurement: warm-up, enough repetitions, percentiles, backends interleaved.

On the CPU, ``time.perf_counter_ns`` around each call. On a GPU, CUDA events around each
call, after a synchronising warm-up, so that the figure is device time plus launch
overhead as a caller sees it.

``interleave`` times several backends together, round by round, each round running every
backend a few calls in a rotating order: on a shared machine the load changes while a
sweep runs, and timing one backend after the other would charge a busy minute to
whichever backend happened to run in it. Interleaved, drift and noise hit all alike.

The noise rules (``NOISE_SPREAD``, ``within_noise``) say when figures cannot be compared;
``OtherProcesses`` measures how much CPU the rest of the machine took meanwhile.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

MIN_REPS = 5
MAX_REPS = 200
# interleaving: timed calls per backend per round, after untimed ones that take the cost
# of switching backends (caches refilled with this backend's weights, the previous one's
# worker threads going idle), so a figure is the steady state a backend running alone has
CALLS_PER_ROUND = 3
WARM_PER_ROUND = 1
# ... and for at least these seconds: calls well under a millisecond still pay for the
# switch for a few milliseconds (the other pools' threads spinning down, caches refilling)
BLOCK_S = 0.005
WARM_S = 0.002
MIN_ROUNDS = 2
MAX_ROUNDS = 100
# a run is too noisy to compare a backend when its middle 80 % of calls spans more than
# half its median: (p90 - p10) / p50 > NOISE_SPREAD
NOISE_SPREAD = 0.5
# the machine is too busy to trust when other processes kept a quarter of a core busy on
# average while a size was timed: on 2 cores, one other busy core made eager 10× slower at
# one token (every parallel region waits for the descheduled thread) and ONNX Runtime not
BUSY_CORES = 0.25
# /proc/stat counts in 10 ms ticks: a shorter window gives no verdict
MIN_WINDOW_S = 0.5


@dataclass
class Timing:
    samples_ms: list[float]

    def percentile(self, q: float) -> float:
        """Linear interpolation between the two nearest ranks (numpy's default method)."""
        data = sorted(self.samples_ms)
        if not data:
            return float("nan")
        pos = (len(data) - 1) * q
        lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    p10 = property(lambda self: self.percentile(0.10))
    p50 = property(lambda self: self.percentile(0.50))
    p90 = property(lambda self: self.percentile(0.90))
    p99 = property(lambda self: self.percentile(0.99))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def spread(self) -> float:
        return relative_spread(self.p10, self.p50, self.p90)


def relative_spread(p10: float, p50: float, p90: float) -> float:
    """(p90 - p10) / p50: the width of the middle 80 % of calls, relative to the median."""
    return (p90 - p10) / p50 if p50 > 0 and math.isfinite(p50) else float("nan")


def too_noisy(p10: float, p50: float, p90: float, threshold: float = NOISE_SPREAD) -> bool:
    spread = relative_spread(p10, p50, p90)
    return not math.isfinite(spread) or spread > threshold


def within_noise(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Two (p10, p50, p90) figures that cannot be told apart: their p10–p90 ranges
    overlap and their medians differ by less than the wider of the two ranges."""
    (a10, a50, a90), (b10, b50, b90) = a, b
    overlap = a10 <= b90 and b10 <= a90
    return overlap and abs(a50 - b50) < max(a90 - a10, b90 - b10)


def time_call(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Milliseconds of one call of ``fn``."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


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
        ms = time_call(fn, device)
        samples.append(ms)
        spent += ms / 1e3
    return Timing(samples)


@dataclass
class Interleaved:
    timings: dict[str, Timing]
    order: list[list[str]]  # the backends of each round, in the order they ran

    @property
    def rounds(self) -> int:
        return len(self.order)


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    device: str = "cpu",
    budget_s: float = 1.0,
    warmup: int = 3,
    calls_per_round: int = CALLS_PER_ROUND,
    warm_per_round: int = WARM_PER_ROUND,
    block_s: float = BLOCK_S,
    warm_s: float = WARM_S,
    max_rounds: int = MAX_ROUNDS,
) -> Interleaved:
    """Time every function of ``fns`` round by round until ``budget_s`` per function is
    spent on average (at least MIN_ROUNDS rounds and MIN_REPS calls each, at most
    ``max_rounds`` rounds). Round r runs the functions rotated by r places, so each sits at
    every place in the order as often as the others. In a round each function runs untimed
    (``warm_per_round`` calls and ``warm_s`` seconds at least), then timed
    (``calls_per_round`` calls and ``block_s`` seconds at least)."""
    if calls_per_round < 1:
        raise ValueError(f"calls_per_round = {calls_per_round} must be at least 1")
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    order: list[list[str]] = []
    if not names:
        return Interleaved({}, order)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if device == "cuda":
        torch.cuda.synchronize()
    target_s = budget_s * len(names)
    spent_s = 0.0
    while len(order) < max_rounds:
        fewest = min(len(samples[name]) for name in names)
        if len(order) >= MIN_ROUNDS and fewest >= MIN_REPS and spent_s >= target_s:
            break
        shift = len(order) % len(names)
        this_round = names[shift:] + names[:shift]
        for name in this_round:
            fn = fns[name]
            calls, warm = 0, 0.0
            while calls < warm_per_round or warm < warm_s:
                warm += time_call(fn, device) / 1e3
                calls += 1
            calls, block = 0, 0.0
            while calls < calls_per_round or block < block_s:
                ms = time_call(fn, device)
                samples[name].append(ms)
                block += ms / 1e3
                calls += 1
            spent_s += block
        order.append(this_round)
    return Interleaved({name: Timing(samples[name]) for name in names}, order)


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process has spent since boot, this process's), or None where the
    kernel does not say (``/proc/stat`` is Linux's)."""
    try:
        import resource

        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait is work; steal
    # is a hypervisor running other machines on our cores, competition all the same
    user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq + steal) / ticks, own.ru_utime + own.ru_stime


class OtherProcesses:
    """How many cores the rest of the machine kept busy since this was made: every
    process's CPU time minus this one's (all its threads, spinning ones included), over
    the wall time."""

    def __init__(
        self,
        read: Callable[[], tuple[float, float] | None] = _cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._clock = read, clock
        self._start = read()
        self._t0 = clock()

    def cores(self) -> tuple[float | None, float]:
        """(average cores used by other processes or None where unknown, window seconds)."""
        end, wall = self._read(), self._clock() - self._t0
        if self._start is None or end is None or wall <= 0:
            return None, wall
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return max(0.0, others / wall), wall


def too_busy(other_cores: float | None, window_s: float) -> bool:
    return other_cores is not None and window_s >= MIN_WINDOW_S and other_cores >= BUSY_CORES


def copy_bandwidth_gbs(device: str = "cpu", mbytes: int = 256) -> float:
    """Measured read+write bandwidth of a large copy: the reference for memory floors."""
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, budget_s=0.3)
    return 2 * src.numel() * 4 / (timing.p50 / 1e3) / 1e9
