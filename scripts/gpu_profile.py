"""Measure the fused lookup on a GPU: torch.profiler, a CUDA graph of the decode step, ncu's target.

    python scripts/gpu_profile.py profile --out profile.txt --json profile.json \\
        [--estimate kernel-report.json] [--tokens 1,64,4096] [--cpu]
    python scripts/gpu_profile.py graph --json graph.json [--tokens 1]
    ncu --clock-control none --profile-from-start off python scripts/gpu_profile.py ncu-target

The lookup is ``scripts/bench_lookup.py``'s fused path (``FusedLookup``: the query
projection, the scoring GEMM, ``ultramem.retrieve`` and ``ultramem.aggregate``, the output
projection) on its paper config, bf16, CUDA.

``profile``: per token count, ``torch.profiler`` over warm calls: each kernel's device
time per call, the kernels launched and the scalars read back to the host
(``aten::_local_scalar_dense``: a synchronisation each) per lookup; the registers, spills
and shared memory of the Triton kernels the JIT built (the driver's figures); beside each
kernel, ``scripts/kernel_report.py``'s estimate when ``--estimate`` names its JSON; and
the CUDA-graph result of ``graph``, run in a child process (a capture that a host
synchronisation breaks can leave the CUDA context unusable). ``--cpu``: the tiny config
on CPU tensors with the Triton kernels under ``TRITON_INTERPRET=1`` (no device kernels, no
graph): the same code path, checked without a GPU.

``graph``: the decode step (1 token) eager, timed with CUDA events, then captured in a CUDA
graph and replayed. A lookup that synchronises with the host cannot be captured: that is
recorded as the result (``captured: false`` and the error), not a failure.

``ncu-target``: one warm lookup per token count between ``cudaProfilerStart`` and
``cudaProfilerStop``, each in an NVTX range named for its tokens, for
``ncu --profile-from-start off``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ESTIMATE_LAUNCH_US = 3.0  # kernel_report.LAUNCH_US: host overhead its est_us includes
SYNC_EVENTS = ("aten::_local_scalar_dense",)  # a scalar read back: one host sync each


def _bench_lookup() -> Any:
    # scripts/ is no package; register the module first so its dataclasses resolve
    spec = importlib.util.spec_from_file_location("bench_lookup", SCRIPTS / "bench_lookup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tokens(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


class Lookup:
    """The bench's fused lookup of one config's layer, and inputs for it."""

    def __init__(self, config: str, device: str, dtype_name: str) -> None:
        import torch

        from ultramem.models.ultramem import UltraMemLayer

        self.bench = _bench_lookup()
        self.name, self.config = config, self.bench.CONFIGS[config]
        self.device = device
        self.dtype = torch.float32 if dtype_name == "fp32" else self.bench.DTYPES[dtype_name]
        layer = UltraMemLayer(self.config.layer, seed=0).eval()
        self.fused = self.bench.FusedLookup(layer.to(device=device, dtype=self.dtype))

    def inputs(self, tokens: int) -> Any:
        import torch

        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(1, tokens, self.config.layer.d_model, generator=gen)
        return x.to(self.device, self.dtype)

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


# ---- profile ---------------------------------------------------------------------------


def _kernel_times(events: list[Any], device_type: Any) -> dict[str, list[float]]:
    """Each device kernel's own intervals (µs) from the profiler's raw events."""
    times: dict[str, list[float]] = {}
    for event in events:
        if getattr(event, "device_type", None) == device_type:
            times.setdefault(event.name, []).append(event.time_range.elapsed_us())
    return times


def _count(events: list[Any], names: tuple[str, ...]) -> int:
    return sum(1 for e in events if e.name in names)


def profile_tokens(
    lookup: Lookup, tokens: int, warmup: int, iterations: int
) -> tuple[dict[str, Any], Any]:
    """One token count under torch.profiler: per-kernel times, launches, host syncs."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    x = lookup.inputs(tokens)
    cuda = lookup.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(warmup):  # JIT compiles and autotuning stay out of the profile
        lookup.fused(x)
    lookup.sync()
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            with record_function("fused_lookup"):
                lookup.fused(x)
        lookup.sync()
    events = list(prof.events())
    kernels = _kernel_times(events, torch.autograd.DeviceType.CUDA) if cuda else {}
    launches = sum(len(t) for t in kernels.values())
    result = {
        "tokens": tokens,
        "iterations": iterations,
        "device_us_per_lookup": sum(sum(t) for t in kernels.values()) / iterations,
        "launches_per_lookup": launches / iterations,
        "host_syncs_per_lookup": _count(events, SYNC_EVENTS) / iterations,
        "kernels": [
            {
                "name": name,
                "calls_per_lookup": len(t) / iterations,
                "us_per_call": sum(t) / len(t),
                "us_per_lookup": sum(t) / iterations,
            }
            for name, t in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
        ],
    }
    return result, prof


def jit_kernels() -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every Triton kernel the JIT built for the
    ops (the driver's figures, for the static report's): ``JITFunction.device_caches``,
    the same in Triton 3.6 and 3.9; empty where that changes."""
    import triton

    found: list[dict[str, Any]] = []
    functions = {
        id(v): v
        for name, module in list(sys.modules.items())
        if name.startswith("ultramem.kernels.")
        for v in vars(module).values()
        if isinstance(v, triton.runtime.JITFunction)
    }
    for fn in functions.values():
        for cache in getattr(fn, "device_caches", {}).values():
            compiled = cache[0] if isinstance(cache, tuple) else {}
            for kernel in compiled.values():
                md = getattr(kernel, "metadata", None)
                found.append(
                    {
                        "kernel": fn.__name__,
                        "registers": getattr(kernel, "n_regs", None),
                        "spills": getattr(kernel, "n_spills", None),
                        "shared_bytes": getattr(md, "shared", None),
                        "num_warps": getattr(md, "num_warps", None),
                    }
                )
    return found


def beside_estimate(measured: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Each kernel of the static report beside its measured device time (the estimate
    without its launch overhead: the profiler times the kernel alone)."""
    report = json.loads(path.read_text())
    by_tokens = {m["tokens"]: {k["name"]: k for k in m["kernels"]} for m in measured}
    rows = []
    for row in report["rows"]:
        name = row["kernel"].split("#")[0]
        kernel = by_tokens.get(row["tokens"], {}).get(name)
        estimate = max(row["est_us"] - ESTIMATE_LAUNCH_US, 1e-9)
        rows.append(
            {
                "kernel": row["kernel"],
                "tokens": row["tokens"],
                "est_device_us": round(estimate, 3),
                "measured_us": round(kernel["us_per_call"], 3) if kernel else None,
                "measured_over_estimate": round(kernel["us_per_call"] / estimate, 2)
                if kernel
                else None,
                "floor_us": row["floor_us"],
                "registers_estimated": row["registers"],
            }
        )
    return rows


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def run_graph_child(tokens: int, dtype: str, timeout_s: float) -> dict[str, Any]:
    """``graph`` in a child process: its capture may leave a CUDA context unusable."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "graph.json"
        command = [sys.executable, __file__, "graph", "--json", str(out)]
        command += ["--tokens", str(tokens), "--dtype", dtype]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"tokens": tokens, "captured": None, "reason": f"timed out after {timeout_s} s"}
        if out.is_file():
            return dict(json.loads(out.read_text()))
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tokens": tokens, "captured": None, "reason": f"exit {done.returncode}: {tail}"}


def cmd_profile(args: argparse.Namespace) -> int:
    if args.cpu:
        # triton.jit picks the interpreter when a kernel is defined: before any import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from ultramem.kernels import triton_on_cpu

    if not args.cpu and not torch.cuda.is_available():
        print("profile: no CUDA device (use --cpu on a CPU)", file=sys.stderr)
        return 2
    # the interpreter's CPU run in fp32, as the tiny config is
    dtype = args.dtype or ("fp32" if args.cpu else "bf16")
    lookup = Lookup("tiny" if args.cpu else "paper", "cpu" if args.cpu else "cuda", dtype)
    tokens = _tokens(args.tokens) if args.tokens else ([2] if args.cpu else [1, 64, 4096])
    # the interpreter runs each Triton program in Python: a CPU run profiles few calls
    warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    iterations = args.iterations or (2 if args.cpu else 20)
    measured, tables = [], []
    # on CPU tensors the ops run their C++/reference kernels; --cpu routes them to the
    # Triton launchers instead, so the kernels a GPU would launch run (interpreted) here too
    with torch.no_grad(), triton_on_cpu(args.cpu):
        for count in tokens:
            result, prof = profile_tokens(lookup, count, warmup, iterations)
            measured.append(result)
            tables.append((count, prof.key_averages()))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if not args.cpu else "cpu (rehearsal)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "config": lookup.name,
        "dtype": str(lookup.dtype).removeprefix("torch."),
        "measured": measured,
        "jit_kernels": jit_kernels() if not args.cpu else [],
    }
    if args.estimate and Path(args.estimate).is_file():
        report["estimate_vs_measured"] = beside_estimate(measured, Path(args.estimate))
    report["cuda_graph"] = (
        run_graph_child(args.graph_tokens, dtype, args.graph_timeout_s)
        if not args.cpu
        else {"captured": None, "reason": "no CUDA device (CPU rehearsal)"}
    )
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    text = profile_text(report, tables, args.rows, lookup.device)
    Path(args.out).write_text(text)
    print(text.split("\n## key_averages")[0])
    print(f"profile: {_one_line(report)}")
    return 0


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _one_line(report: dict[str, Any]) -> str:
    parts = [
        f"{m['tokens']} tokens {m['device_us_per_lookup']:.1f} µs, {m['launches_per_lookup']:g} "
        f"launches, {m['host_syncs_per_lookup']:g} syncs"
        for m in report["measured"]
    ]
    graph = report["cuda_graph"]
    if graph.get("captured"):
        parts.append(f"graph replay {graph['replay_us_per_call']:.1f} µs")
    else:
        parts.append(f"no graph ({str(graph.get('reason'))[:80]})")
    return "; ".join(parts)


def profile_text(
    report: dict[str, Any], tables: list[tuple[int, Any]], rows: int, device: str
) -> str:
    lines = [
        f"# fused lookup ({report['config']} config, {report['dtype']}) on {report['device']}",
        f"torch {report['torch']}, triton {report['triton']}; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
        "",
        "## per lookup",
        *_table(
            report["measured"],
            ["tokens", "device_us_per_lookup", "launches_per_lookup", "host_syncs_per_lookup"],
        ),
    ]
    for m in report["measured"]:
        lines += ["", f"## kernels at {m['tokens']} tokens (device time)"]
        lines += _table(m["kernels"], ["name", "calls_per_lookup", "us_per_call", "us_per_lookup"])
    if report["jit_kernels"]:
        lines += ["", "## Triton kernels as the JIT built them (driver's figures)"]
        lines += _table(
            report["jit_kernels"], ["kernel", "registers", "spills", "shared_bytes", "num_warps"]
        )
    if "estimate_vs_measured" in report:
        lines += ["", "## static estimate (kernel_report.py) beside the measurement"]
        columns = [
            "kernel",
            "tokens",
            "est_device_us",
            "measured_us",
            "measured_over_estimate",
            "floor_us",
        ]
        lines += _table(report["estimate_vs_measured"], columns)
    lines += ["", "## CUDA graph of the decode step", json.dumps(report["cuda_graph"])]
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    for tokens, averages in tables:
        lines += [
            "",
            f"## key_averages at {tokens} tokens, by {sort}",
            _averages(averages, sort, rows),
        ]
    return "\n".join(lines) + "\n"


def _averages(averages: Any, sort: str, rows: int) -> str:
    try:
        return str(averages.table(sort_by=sort, row_limit=rows))
    except (AttributeError, KeyError):  # an older torch names device time after CUDA
        return str(averages.table(sort_by="self_cuda_time_total", row_limit=rows))


# ---- graph -----------------------------------------------------------------------------


def _time_cuda(fn: Callable[[], Any], iterations: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean µs per call of ``iterations`` calls (CUDA events)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        means.append(1e3 * start.elapsed_time(end) / iterations)
    return statistics.median(means)


def capture(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """``fn`` captured in a CUDA graph after warm-up calls on a side stream (as
    ``torch.cuda.graphs`` asks), and the graph's output tensor."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cmd_graph(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("graph: no CUDA device", file=sys.stderr)
        return 2
    lookup = Lookup("paper", "cuda", args.dtype)
    x = lookup.inputs(args.tokens)
    result: dict[str, Any] = {"tokens": args.tokens, "dtype": args.dtype}
    with torch.no_grad():
        result["eager_us_per_call"] = round(_time_cuda(lambda: lookup.fused(x), args.iterations), 2)
        Path(args.json).write_text(json.dumps(result))  # kept if the capture kills us
        try:
            graph, out = capture(lambda: lookup.fused(x))
        except Exception as exc:  # the answer (a host sync, an unsupported op), not a crash
            result.update(captured=False, reason=f"{type(exc).__name__}: {str(exc).strip()[:400]}")
        else:
            result["replay_us_per_call"] = round(_time_cuda(graph.replay, args.iterations), 2)
            graph.replay()
            result.update(
                captured=True, replay_matches_eager=bool(torch.equal(out, lookup.fused(x)))
            )
    Path(args.json).write_text(json.dumps(result) + "\n")
    print(f"graph: {json.dumps(result)}")
    return 0


# ---- ncu-target ------------------------------------------------------------------------


def cmd_ncu_target(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("ncu-target: no CUDA device", file=sys.stderr)
        return 2
    lookup = Lookup("paper", "cuda", args.dtype)
    inputs = {t: lookup.inputs(t) for t in _tokens(args.tokens)}
    with torch.no_grad():
        for x in inputs.values():  # JIT compiles outside the profiled ranges
            for _ in range(2):
                lookup.fused(x)
        torch.cuda.synchronize()
        for tokens, x in inputs.items():
            torch.cuda.nvtx.range_push(f"lookup {tokens} tokens")
            torch.cuda.profiler.start()
            lookup.fused(x)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            torch.cuda.nvtx.range_pop()
            print(f"ncu-target: one lookup at {tokens} tokens profiled")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="torch.profiler of the fused lookup, and its graph")
    prof.add_argument("--out", required=True, help="profile.txt")
    prof.add_argument("--json", required=True, help="profile.json")
    prof.add_argument("--estimate", help="kernel_report.py's JSON, put beside the measurement")
    prof.add_argument("--cpu", action="store_true", help="the tiny config on CPU tensors")
    prof.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="bf16; --cpu: fp32")
    prof.add_argument("--tokens", help="token counts (1,64,4096; --cpu: 2)")
    prof.add_argument("--warmup", type=int, help="calls before profiling (3; --cpu 1)")
    prof.add_argument("--iterations", type=int, help="profiled calls (20; --cpu 2)")
    prof.add_argument("--rows", type=int, default=25)
    prof.add_argument("--graph-tokens", type=int, default=1, help="the decode step's tokens")
    prof.add_argument("--graph-timeout-s", type=float, default=60.0)
    graph = sub.add_parser("graph", help="the decode step eager and as a CUDA graph")
    graph.add_argument("--json", required=True)
    graph.add_argument("--tokens", type=int, default=1)
    graph.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    graph.add_argument("--iterations", type=int, default=50)
    ncu = sub.add_parser("ncu-target", help="one lookup per token count for ncu")
    ncu.add_argument("--tokens", default="1,4096")
    ncu.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"profile": cmd_profile, "graph": cmd_graph, "ncu-target": cmd_ncu_target}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
