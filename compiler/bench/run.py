"""``ultramem bench``: every available backend, the same inputs, one run.

For each token count: the eager model's output is the reference; each backend is first
checked against it on the bench's own inputs (a fast but wrong backend is reported as
wrong, not timed), then timed (``compiler.timing``). Each fused memory layer's lookup is
also timed on its own, next to its memory-traffic floor at the copy bandwidth measured
in the same run. A backend that cannot run here is listed with the reason, never dropped.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ...kernels import AGGREGATE, AGGREGATE_OP, RETRIEVE, RETRIEVE_OP, OpSpec
from ..aoti import AOTI_FILE, load_aoti
from ..artifacts import versions
from ..capture import like_inputs
from ..formats import ENGINE_FILE, ONNX_FILE, ProgressFn, engine_stage, native_code_refusal
from ..onnx.runner import OnnxRunner
from ..parity.compare import compare_outputs, tolerance_for
from ..parity.stages import tensor_leaves
from ..pipeline import Compiled
from .timing import copy_bandwidth_gbs, measure

BENCH_SCHEMA = "ultramem-bench/1"
ALL_BACKENDS = (
    "eager",
    "torch.compile",
    "fused-ops",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "plugin-kernels",
    "aotinductor",
    "tensorrt",
)

RunFn = Callable[[tuple[Any, ...]], Any]


@dataclass
class Backend:
    name: str
    run: RunFn | None
    reason: str = ""


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_backends(
    compiled: Compiled,
    artifacts: Path | None,
    wanted: list[str],
    formats: Collection[str] = (),
    native_code: bool = False,
) -> list[Backend]:
    """The backends in ``wanted``; those that run a file of ``artifacts`` only where its
    manifest lists the format (``formats``), and the AOTInductor package, a shared
    library, only with ``native_code``."""
    model = compiled.loaded.model
    on_gpu = _device() == "cuda"

    def listed(fmt: str, file: str) -> Path | None:
        return artifacts / file if artifacts is not None and fmt in formats else None

    onnx_path = listed("onnx", ONNX_FILE)
    no_onnx = f"no {ONNX_FILE} (pass --artifacts DIR from `ultramem export`)"
    out = []
    for name in wanted:
        if name == "eager":
            out.append(Backend(name, lambda x: model(*x)))
        elif name == "torch.compile":
            compiled_model = torch.compile(model, dynamic=True)
            out.append(Backend(name, lambda x, m=compiled_model: m(*x)))
        elif name == "fused-ops":
            fused = compiled.rewrite.program.module()
            out.append(Backend(name, lambda x, m=fused: m(*x)))
        elif name == "onnxruntime-cpu":
            if onnx_path is None or not onnx_path.is_file():
                out.append(Backend(name, None, no_onnx))
            else:
                runner = OnnxRunner(onnx_path, probe_selections=False)
                out.append(Backend(name, lambda x, r=runner: r(x)[0]))
        elif name == "onnxruntime-cuda":
            out.append(Backend(name, None, _ort_cuda_reason(on_gpu)))
        elif name == "plugin-kernels":
            reason = (
                "the launcher runs the lookup's AOT kernels, not a whole model; needs a GPU"
                if not on_gpu
                else "whole-model runs through the launcher are not wired yet"
            )
            out.append(Backend(name, None, reason))
        elif name == "aotinductor":
            path = listed("aoti", AOTI_FILE)
            if path is None or not path.is_file():
                out.append(Backend(name, None, f"no {AOTI_FILE} (export --format aoti)"))
            elif not native_code:
                out.append(Backend(name, None, native_code_refusal(path)))
            else:
                package = load_aoti(path)
                out.append(Backend(name, lambda x, p=package: p(*x)))
        elif name == "tensorrt":
            engine = listed("tensorrt", ENGINE_FILE)
            if engine is None or not engine.is_file():
                out.append(Backend(name, None, f"no {ENGINE_FILE} (export --format tensorrt)"))
            else:
                stage = engine_stage(engine, None)
                runner = stage.run
                out.append(
                    Backend(name, None, stage.reason)
                    if runner is None
                    else Backend(name, lambda x, r=runner: r(x, [])[0])
                )
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")
    return out


def _ort_cuda_reason(on_gpu: bool) -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime-gpu is not installed (CPU build only)"
    return "" if on_gpu else "no GPU"


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
) -> dict[str, Any]:
    device = _device()
    bandwidth = copy_bandwidth_gbs(device)
    progress(f"measured copy bandwidth: {bandwidth:.1f} GB/s on {device}")
    gen = torch.Generator().manual_seed(0)
    results: dict[str, list[dict[str, Any]]] = {b.name: [] for b in backends}
    lookups: list[dict[str, Any]] = []
    eager_p50: dict[int, float] = {}
    for t in tokens:
        inputs = like_inputs(compiled.loaded.example_inputs, batch, t, gen)
        with torch.no_grad():
            reference = tensor_leaves(compiled.loaded.model(*inputs))
        tol = tolerance_for(reference[0].dtype)
        for backend in backends:
            if backend.run is None:
                continue
            progress(f"tokens={t} {backend.name}")
            run = backend.run
            with torch.no_grad():
                outs = tensor_leaves(run(inputs))
            checks = [
                compare_outputs("output", r, c, tol) for r, c in zip(reference, outs, strict=False)
            ]
            row: dict[str, Any] = {"tokens": t, "batch": batch}
            if len(outs) != len(reference) or not all(c.passed for c in checks):
                message = (
                    "; ".join(c.message for c in checks if not c.passed) or "output count differs"
                )
                results[backend.name].append({**row, "status": "wrong", "parity": message})
                progress(f"WRONG | {backend.name} | tokens={t} | {message}")
                continue
            with torch.no_grad():
                timing = measure(lambda run=run, x=inputs: run(x), device, budget_s)
            if backend.name == "eager":
                eager_p50[t] = timing.p50
            row.update(
                status="ok",
                p50_ms=timing.p50,
                p90_ms=timing.p90,
                p99_ms=timing.p99,
                mean_ms=timing.mean,
                reps=len(timing.samples_ms),
                tokens_per_s=batch * t / (timing.p50 / 1e3),
                max_abs_error=max(c.max_abs for c in checks),
            )
            results[backend.name].append(row)
        lookups += _time_lookups(compiled, inputs, t, batch, device, budget_s, bandwidth)
    for rows in results.values():
        for row in rows:
            if row.get("status") == "ok" and row["tokens"] in eager_p50:
                row["speedup_vs_eager"] = eager_p50[row["tokens"]] / row["p50_ms"]
    return {
        "schema": BENCH_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": compiled.loaded.source,
        "device": device,
        "machine": _machine(device),
        "versions": versions(),
        "batch": batch,
        "tokens": tokens,
        "copy_bandwidth_gbs": bandwidth,
        "backends": [
            {
                "name": b.name,
                "available": b.run is not None,
                "reason": b.reason or None,
                "results": results[b.name],
            }
            for b in backends
        ],
        "lookups": lookups,
    }


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
    with torch.no_grad(), recorder:
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

        with torch.no_grad():
            timing = measure(lookup, device, budget_s / 2)
        floor = lookup_floor_bytes(ret_args, agg_args)
        rows.append(
            {
                "layer": compiled.layers[layer]
                if layer < len(compiled.layers)
                else f"layer {layer}",
                "tokens": t,
                "batch": batch,
                "p50_ms": timing.p50,
                "p90_ms": timing.p90,
                "p99_ms": timing.p99,
                "floor_bytes": floor,
                "floor_ms": floor / (bandwidth * 1e9) * 1e3,
                "achieved_gbs": floor / (timing.p50 / 1e3) / 1e9,
            }
        )
    return rows


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
