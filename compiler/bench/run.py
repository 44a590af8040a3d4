"""``ultramem bench``: every available backend, the same inputs, one run.

For each token count: the eager model's output is the reference; each backend is first
checked against it on the bench's own inputs (a fast but wrong backend is reported as
wrong, not timed), then the backends that passed are timed together, interleaved round
by round (``timing.interleave``), so that a shared machine's changing load hits them
alike. Every backend runs with the same thread count: torch's intra-op pool (eager,
torch.compile, the fused ops and the AOTInductor package, whose OpenMP loops use the
same libgomp) and ONNX Runtime's session options. Each fused memory layer's lookup is
also timed on its own, next to its memory-traffic floor at the copy bandwidth measured
in the same run. A backend that cannot run here is listed with the reason, never dropped.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ...kernels import AGGREGATE, AGGREGATE_OP, RETRIEVE, RETRIEVE_OP, OpSpec
from ..artifacts import versions
from ..capture import like_inputs
from ..formats import ProgressFn
from ..inputs.options import BENCH_SCHEMA as BENCH_SCHEMA
from ..parity.compare import compare_outputs, tolerance_for
from ..parity.stages import tensor_leaves
from ..pipeline import Compiled, programs_of
from ..runners import Backend, RunContext, RunFn, bench_backends
from .timing import (
    BLOCK_S,
    BUSY_CORES,
    CALLS_PER_ROUND,
    MAX_ROUNDS,
    MIN_REPS,
    MIN_ROUNDS,
    MIN_WINDOW_S,
    NOISE_SPREAD,
    WARM_PER_ROUND,
    WARM_S,
    OtherProcesses,
    copy_bandwidth_gbs,
    interleave,
    measure,
    too_busy,
    too_noisy,
    within_noise,
)

# the backends whose CPU work runs on torch's intra-op pool (``torch_threads``)
TORCH_BACKENDS = ("eager", "torch.compile", "fused-ops", "aotinductor")

WARMUP = 3
# interleaving spreads other processes' load over all backends, but not evenly: a backend
# whose every operator waits for all its threads suffers far more than one that runs a
# small call on one, so a busy machine is a warning of its own
BUSY_RULE = (
    f"busy: other processes used >= {BUSY_CORES} cores on average while a size was timed "
    f"(all CPU time in /proc/stat minus this process's, over a window of >= {MIN_WINDOW_S} s)"
)
NOISE_RULE = (
    f"too noisy to compare: (p90 - p10) / p50 > {NOISE_SPREAD}; within noise of eager: "
    "p10-p90 ranges overlap and the medians differ by less than the wider range"
)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to ``threads`` (None: left as it is) inside, the
    previous count restored after: the bench is also called in-process (tests)."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_backends(
    compiled: Compiled,
    artifacts: Path | None,
    wanted: list[str],
    formats: Collection[str] = (),
    native_code: bool = False,
    threads: int | None = None,
) -> list[Backend]:
    """The backends in ``wanted`` (the runners'); those that run a file of ``artifacts``
    only where its manifest lists the format (``formats``), and native code (the
    AOTInductor package, the kernel bundle) only with ``native_code``. ``threads``: ONNX
    Runtime's operator threads (the torch backends take torch's count, ``torch_threads``)."""
    context = RunContext(programs_of(compiled), artifacts, formats, None, native_code, threads)
    return bench_backends(context, wanted)


class _LookupRecorder(TorchDispatchMode):
    """Keeps the arguments (by contract name) of every fused-op call, to time them alone."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[OpSpec, dict[str, Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _CONTRACTS:
            self.calls.append((_CONTRACTS[func], _CONTRACTS[func].bind(*args, **(kwargs or {}))))
        return func(*args, **(kwargs or {}))


_CONTRACTS = {RETRIEVE_OP: RETRIEVE, AGGREGATE_OP: AGGREGATE}


def lookup_floor_bytes(retrieve: dict[str, Any], aggregate: dict[str, Any]) -> int:
    """Bytes a lookup must move at the fused ops' boundary: both score tensors read, k value
    rows per token and head read, the pooled values written (arguments by contract name)."""
    row_scores, col_scores = retrieve["row_scores"], retrieve["col_scores"]
    values, weights = aggregate["values"], aggregate["weights"]
    tokens, heads, k, _ = weights.shape
    rows = tokens * heads * k * values.shape[1] * values.element_size()
    pooled = tokens * aggregate["groups"] * values.shape[1] * values.element_size()
    read_scores = (row_scores.numel() + col_scores.numel()) * row_scores.element_size()
    return int(read_scores + rows + pooled)


def run_bench(
    compiled: Compiled,
    backends: list[Backend],
    tokens: list[int],
    batch: int,
    budget_s: float,
    progress: ProgressFn,
    threads: int | None = None,
) -> dict[str, Any]:
    """Parity, then interleaved timing, of every available backend at each token count;
    the report ``bench.json`` holds (``report`` module). ``threads``: torch's thread count
    for the run (None: the current one), restored afterwards."""
    with torch_threads(threads) as threads, torch.no_grad():
        device = bench_device()
        progress(f"threads: {threads} for every backend")
        for b in backends:
            if b.run is not None and b.name in TORCH_BACKENDS:
                b.settings.setdefault("torch_threads", threads)
        bandwidth = copy_bandwidth_gbs(device)
        progress(f"measured copy bandwidth: {bandwidth:.1f} GB/s on {device}")
        gen = torch.Generator().manual_seed(0)
        results: dict[str, list[dict[str, Any]]] = {b.name: [] for b in backends}
        lookups: list[dict[str, Any]] = []
        noisy: list[dict[str, Any]] = []
        load: list[dict[str, Any]] = []
        for t in tokens:
            inputs = like_inputs(compiled.loaded.example_inputs, batch, t, gen)
            reference = tensor_leaves(compiled.loaded.model(*inputs))
            tol = tolerance_for(reference[0].dtype)
            # parity first, each backend alone: only those that pass are timed
            passed: dict[str, tuple[RunFn, float]] = {}
            for backend in backends:
                if backend.run is None:
                    continue
                progress(f"tokens={t} {backend.name}: parity")
                outs = tensor_leaves(backend.run(inputs))
                checks = [
                    compare_outputs("output", r, c, tol)
                    for r, c in zip(reference, outs, strict=False)
                ]
                if len(outs) != len(reference) or not all(c.passed for c in checks):
                    message = (
                        "; ".join(c.message for c in checks if not c.passed)
                        or "output count differs"
                    )
                    row = {"tokens": t, "batch": batch, "status": "wrong", "parity": message}
                    results[backend.name].append(row)
                    progress(f"WRONG | {backend.name} | tokens={t} | {message}")
                    continue
                passed[backend.name] = (backend.run, max(c.max_abs for c in checks))
            if passed:
                progress(f"tokens={t}: timing {', '.join(passed)} interleaved")
            others = OtherProcesses()
            timed = interleave(
                {name: (lambda run=run, x=inputs: run(x)) for name, (run, _) in passed.items()},
                device,
                budget_s,
                warmup=WARMUP,
            )
            other_cores, window_s = others.cores()
            busy = too_busy(other_cores, window_s)
            load.append(
                {"tokens": t, "other_cores": other_cores, "window_s": window_s, "busy": busy}
            )
            if busy:
                progress(
                    f"WARNING | busy machine | tokens={t} | other processes used {other_cores:.2f} "
                    f"of {os.cpu_count()} cores while it was timed (>= {BUSY_CORES})"
                )
            for name, timing in timed.timings.items():
                row = {
                    "tokens": t,
                    "batch": batch,
                    "status": "ok",
                    "p10_ms": timing.p10,
                    "p50_ms": timing.p50,
                    "p90_ms": timing.p90,
                    "p99_ms": timing.p99,
                    "mean_ms": timing.mean,
                    "reps": len(timing.samples_ms),
                    "rounds": timed.rounds,
                    "spread": timing.spread,
                    "noisy": too_noisy(timing.p10, timing.p50, timing.p90),
                    "tokens_per_s": batch * t / (timing.p50 / 1e3),
                    "max_abs_error": passed[name][1],
                }
                results[name].append(row)
                progress(
                    f"tokens={t} {name}: p50 {timing.p50:.3f} ms [p10 {timing.p10:.3f}, p90 "
                    f"{timing.p90:.3f}], {row['reps']} calls in {timed.rounds} rounds"
                )
                if row["noisy"]:
                    noisy.append({"backend": name, "tokens": t, "spread": timing.spread})
                    progress(
                        f"WARNING | too noisy to compare | {name} | tokens={t} | (p90-p10)/p50 = "
                        f"{timing.spread:.2f} > {NOISE_SPREAD}"
                    )
            lookups += _time_lookups(compiled, inputs, t, batch, device, budget_s, bandwidth)
        _against_eager(results)
        return {
            **report_head(BENCH_SCHEMA, compiled.loaded.source, device),
            "batch": batch,
            "tokens": tokens,
            "threads": threads,
            "timing": {
                "method": "interleaved",
                "budget_s": budget_s,
                "warmup": WARMUP,
                "calls_per_round": CALLS_PER_ROUND,
                "block_s": BLOCK_S,
                "warm_per_round": WARM_PER_ROUND,
                "warm_s": WARM_S,
                "min_rounds": MIN_ROUNDS,
                "min_reps": MIN_REPS,
                "max_rounds": MAX_ROUNDS,
            },
            "noise": {"rule": NOISE_RULE, "threshold": NOISE_SPREAD, "noisy": noisy},
            "load": {"rule": BUSY_RULE, "threshold_cores": BUSY_CORES, "sizes": load},
            "copy_bandwidth_gbs": bandwidth,
            "backends": [
                {
                    "name": b.name,
                    "available": b.run is not None,
                    "reason": b.reason or None,
                    "settings": b.settings,
                    "results": results[b.name],
                }
                for b in backends
            ],
            "lookups": lookups,
        }


def _percentiles(row: dict[str, Any]) -> tuple[float, float, float]:
    return row["p10_ms"], row["p50_ms"], row["p90_ms"]


def _against_eager(results: dict[str, list[dict[str, Any]]]) -> None:
    """Each timed row's speedup over eager at its token count, and whether the two cannot
    be told apart (``within_noise``)."""
    eager = {r["tokens"]: r for r in results.get("eager", []) if r.get("status") == "ok"}
    for name, rows in results.items():
        for row in rows:
            base = eager.get(row["tokens"])
            if row.get("status") != "ok" or base is None:
                continue
            row["speedup_vs_eager"] = base["p50_ms"] / row["p50_ms"]
            if name != "eager":
                row["within_noise_of_eager"] = within_noise(_percentiles(row), _percentiles(base))


def _time_lookups(
    compiled: Compiled,
    inputs: tuple[Any, ...],
    t: int,
    batch: int,
    device: str,
    budget_s: float,
    bandwidth: float,
) -> list[dict[str, Any]]:
    recorder = _LookupRecorder()
    with recorder:
        compiled.rewrite.program.module()(*inputs)
    # each retrieve with the aggregate that follows it (a layer whose glue sits between
    # the two is timed as the two ops on their recorded inputs, the glue left out)
    pairs = [
        (first, second)
        for (op, first), (next_op, second) in zip(recorder.calls, recorder.calls[1:], strict=False)
        if op is RETRIEVE and next_op is AGGREGATE
    ]
    rows = []
    for layer, (ret_args, agg_args) in enumerate(pairs):

        def lookup(ret_args=ret_args, agg_args=agg_args) -> Any:  # type: ignore[no-untyped-def]
            RETRIEVE_OP(**ret_args)
            return AGGREGATE_OP(**agg_args)

        # alone: no other backend's figure is compared with a lookup's
        timing = measure(lookup, device, budget_s / 2)
        floor = lookup_floor_bytes(ret_args, agg_args)
        rows.append(
            {
                "layer": compiled.layers[layer]
                if layer < len(compiled.layers)
                else f"layer {layer}",
                "tokens": t,
                "batch": batch,
                "p10_ms": timing.p10,
                "p50_ms": timing.p50,
                "p90_ms": timing.p90,
                "p99_ms": timing.p99,
                "floor_bytes": floor,
                "floor_ms": floor / (bandwidth * 1e9) * 1e3,
                "achieved_gbs": floor / (timing.p50 / 1e3) / 1e9,
            }
        )
    return rows


def report_head(schema: str, model: str, device: str) -> dict[str, Any]:
    """What every bench report opens with: what it is, of which model, where and when."""
    return {
        "schema": schema,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model,
        "device": device,
        "machine": machine_record(device),
        "versions": versions(),
    }


def machine_record(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
