"""The Python half of ``scripts/gpu_check.sh``: wheels, the environment record, the profile.

    python scripts/gpu_check.py wheels --target DIR WHEEL_DIR...   # install what is missing
    python scripts/gpu_check.py env --out env.json [--dry-run]     # versions, GPU, verdict
    python scripts/gpu_check.py junit gpu-tests.xml                # one line of counts
    python scripts/gpu_check.py note lookup|bench FILE.json        # one line of results
    python scripts/gpu_check.py profile --out profile.txt [--dry-run]

``wheels`` and ``junit`` use the standard library only: they run before anything says
whether torch is there. ``env`` exits 2 with one line on stderr when a package the checks
need is missing (or, outside ``--dry-run``, when torch sees no CUDA device), after writing
``env.json`` with what it found. ``profile`` runs the fused lookup of
``scripts/bench_lookup.py`` (its paper config, bf16, on CUDA; with ``--dry-run`` its tiny
config on CPU tensors, the Triton kernels under ``TRITON_INTERPRET=1``) under
``torch.profiler`` and writes the per-kernel times and the ``key_averages`` table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent

# distribution name -> import name; every check needs these (ultramem's own dependencies,
# pytest for the gpu tests)
REQUIRED = {
    "torch": "torch",
    "triton": "triton",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "click": "click",
    "matplotlib": "matplotlib",
    "pytest": "pytest",
}
# recorded, and the steps that need one say so when it is missing
OPTIONAL = {
    "tensorrt": "tensorrt",  # full TensorRT: fp16 engines, plugin mode
    "tensorrt_rtx": "tensorrt_rtx",  # builds engines; runs none on sm 9.0
    "cuda-bindings": "cuda.bindings",  # the kernel-bundle launcher (plugin-kernels stage)
    "hypothesis": "hypothesis",
    "onnxruntime-gpu": None,  # only its distribution name tells it from the CPU build
}


# ---- wheels ----------------------------------------------------------------------------


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """A wheel's distribution and version, from its file name (PEP 427)."""
    parts = path.name.split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name")
    return _normalise(parts[0]), parts[1]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cmd_wheels(args: argparse.Namespace) -> int:
    wheels = sorted(p for d in args.dirs if Path(d).is_dir() for p in Path(d).glob("*.whl"))
    by_name: dict[str, list[Path]] = {}
    for path in wheels:
        by_name.setdefault(wheel_name_version(path)[0], []).append(path)
    twice = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if twice:
        # pip would refuse the whole install; say which, not pip's page of resolver output
        names = ", ".join(f"{n} ({len(ps)} files)" for n, ps in sorted(twice.items()))
        print(f"wheels: more than one version of {names}; keep one", file=sys.stderr)
        return 2
    # a carried wheel is wanted where its distribution is missing or at another version:
    # the machine's own packages are kept otherwise
    wanted = [
        ps[0]
        for n, ps in sorted(by_name.items())
        if installed_version(n) != wheel_name_version(ps[0])[1]
    ]
    if not wanted:
        print(f"wheels: none needed ({len(wheels)} carried, all installed)")
        return 0
    command = [
        sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
        "--no-compile", "--no-cache-dir", "--upgrade", "--target", args.target,
        *map(str, wanted),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        print(f"wheels: pip could not install {len(wanted)} wheels: {last}", file=sys.stderr)
        return 2
    print(f"wheels: installed {', '.join(p.name for p in wanted)} into {args.target}")
    return 0


# ---- env -------------------------------------------------------------------------------


def _probe(dist: str, module: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"version": installed_version(dist)}
    if module is None:
        return entry
    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # any import failure is the answer, not a crash of the check
        entry["import_error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        return entry
    entry["version"] = entry["version"] or getattr(imported, "__version__", None)
    where = getattr(imported, "__file__", None)
    entry["path"] = str(Path(where).parent) if where else None
    return entry


def _nvidia_smi() -> dict[str, str] | None:
    fields = "name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def _gpu() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "sm": f"{props.major}{props.minor}",
        "capability": [props.major, props.minor],
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_cache_mb": round(getattr(props, "L2_cache_size", 0) / 1e6, 1) or None,
        "count": torch.cuda.device_count(),
        "nvidia_smi": _nvidia_smi(),
    }


def cmd_env(args: argparse.Namespace) -> int:
    packages = {d: _probe(d, m) for d, m in {**REQUIRED, **OPTIONAL}.items()}
    absent = [d for d in REQUIRED if packages[d]["version"] is None]
    broken = [d for d in REQUIRED if d not in absent and "import_error" in packages[d]]
    problems = [f"{d} does not import ({packages[d]['import_error']})" for d in broken]
    if absent:
        problems.insert(0, f"not installed: {', '.join(absent)}")
    if problems:
        problems.append("carry their wheels in wheels/ or .whl/ (README: On a GPU)")
    record: dict[str, Any] = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "packages": packages,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "ultramem": {"importable_via": args.ultramem_via},
        "wheels": args.wheels_note,
    }
    if packages["torch"].get("path"):
        import torch

        record["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        }
        record["gpu"] = _gpu()
        if not args.dry_run and record["gpu"] is None:
            problems.insert(
                0,
                f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
                "none; --dry-run runs the same steps on the CPU",
            )
    if packages["onnxruntime"].get("path"):
        import onnxruntime

        record["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if not problems:
        # the CLI's import chain pulls in every module the steps use: a missing piece
        # shows here, in one line, and not halfway through the run
        try:
            import ultramem
            import ultramem.cli.main
        except Exception as exc:
            problems.append(
                f"ultramem does not import ({type(exc).__name__}: {str(exc).strip()[:200]})"
            )
        else:
            where = Path(ultramem.__file__).resolve().parent
            # the checkout's own version: an installed copy's metadata may be another's
            version = getattr(ultramem, "__version__", None)
            record["ultramem"].update(path=str(where), version=version)
            # the native CPU kernels build on first import; the record says if they loaded
            registry = sys.modules.get("ultramem.kernels.registry")
            native = getattr(registry, "NATIVE_LIBRARY", None)
            record["ultramem"]["native_cpu_kernels"] = str(native) if native else None
            if where != REPO:
                problems.append(f"ultramem imports from {where}, not this checkout ({REPO})")
    record["missing"] = problems
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if problems:
        print(f"env: {'; '.join(problems)}", file=sys.stderr)
        return 2
    gpu = record.get("gpu")
    where = f"{gpu['name']} (sm {gpu['sm']})" if gpu else "no GPU" + (" (dry run)" * args.dry_run)
    tensorrt = packages["tensorrt"]["version"] or packages["tensorrt_rtx"]["version"]
    print(
        f"env: python {record['python']['version']}, torch {record['torch']['version']}, "
        f"triton {packages['triton']['version']}, onnxruntime "
        f"{packages['onnxruntime']['version']}, TensorRT {tensorrt or 'none'}; {where}"
    )
    return 0


# ---- junit -----------------------------------------------------------------------------


def cmd_junit(args: argparse.Namespace) -> int:
    try:
        root = ET.parse(args.file).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"no junit report ({type(exc).__name__})")
        return 1
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    passed = total["tests"] - total["failures"] - total["errors"] - skipped
    print(
        f"{total['tests']} tests: {passed} passed, {total['failures']} failed, "
        f"{total['errors']} errors, {skipped} skipped"
    )
    return 0


# ---- notes: one line of a step's results for summary.md -------------------------------

FAILED_ROWS = ("wrong", "failed", "error")  # a row's status that fails its step


def lookup_note(report: dict[str, Any]) -> tuple[str, bool]:
    """bench_lookup.py's JSON: the fused lookup at the largest token count; rows that are
    wrong or failed make the step fail (an unavailable backend says why, and is no failure)."""
    rows = report["rows"]
    bad = [
        f"{r['backend']}@{r['tokens']}: {r['status']}" for r in rows if r["status"] in FAILED_ROWS
    ]
    fused = [r for r in rows if r["backend"] == "fused-ops" and r["status"] == "ok"]
    parts = [
        f"floor at {report['bandwidth_tbs']:.3g} TB/s ({report.get('bandwidth_source', 'given')})"
    ]
    if fused:
        top = max(fused, key=lambda r: r["tokens"])
        speedup = top.get("speedup_vs_eager")
        parts.append(
            f"fused-ops at {top['tokens']} tokens: {1e3 * top['median_ms']:.1f} µs"
            + (f", {speedup:.2f}x eager" if speedup else "")
            + f", {100 * top['fraction_of_floor']:.1f}% of the floor"
        )
    if report.get("complete") is False:
        parts.append("incomplete: the run stopped before its last token count")
    if bad:
        parts.append("NOT OK: " + ", ".join(bad))
    return "; ".join(parts), not bad


def bench_note(report: dict[str, Any]) -> tuple[str, bool]:
    """``ultramem bench``'s bench.json: p50 per backend at the largest token count; a row
    that is wrong (parity) or failed makes the step fail, other statuses are listed."""
    largest = max(report["tokens"])
    cells, bad, other = [], [], []
    for backend in report["backends"]:
        for row in backend["results"]:
            where = f"{backend['name']}@{row['tokens']}: {row['status']}"
            if row["status"] in FAILED_ROWS:
                bad.append(where)
            elif row["status"] != "ok":
                other.append(where)
            elif row["tokens"] == largest:
                cells.append(f"{backend['name']} {row['p50_ms']:.3g}")
    parts = [
        f"copy {report['copy_bandwidth_gbs']:.4g} GB/s on {report['device']}",
        f"p50 ms at {largest} tokens: " + (", ".join(cells) or "none"),
    ]
    if other:
        parts.append("also " + ", ".join(other))
    if bad:
        parts.append("NOT OK: " + ", ".join(bad))
    return "; ".join(parts), not bad


def cmd_note(args: argparse.Namespace) -> int:
    """Exit 1: the JSON holds wrong or failed rows; 2: it cannot be summarised (a missing
    file, another schema), which the caller reports without judging the step by it."""
    try:
        report = json.loads(Path(args.file).read_text())
        text, ok = {"lookup": lookup_note, "bench": bench_note}[args.kind](report)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{Path(args.file).name}: no summary ({type(exc).__name__}: {exc})")
        return 2
    print(text)
    return 0 if ok else 1


# ---- profile ---------------------------------------------------------------------------


def _bench_lookup() -> Any:
    # scripts/ is no package; register the module first so its dataclasses resolve
    spec = importlib.util.spec_from_file_location("bench_lookup", SCRIPTS / "bench_lookup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _kernel_table(events: list[Any], device_type: Any, iterations: int) -> list[str]:
    """Per-kernel device time from the profiler's raw events (each launch's own interval)."""
    totals: dict[str, list[float]] = {}
    for event in events:
        if getattr(event, "device_type", None) != device_type:
            continue
        totals.setdefault(event.name, []).append(event.time_range.elapsed_us())
    if not totals:
        return ["(no device kernels recorded)"]
    lines = [f"{'kernel':<72} {'calls':>6} {'total us':>10} {'us/iter':>9} {'us/call':>9}"]
    ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1]))
    for name, times in ranked:
        total = sum(times)
        lines.append(
            f"{name[:72]:<72} {len(times):>6} {total:>10.1f} {total / iterations:>9.2f} "
            f"{total / len(times):>9.2f}"
        )
    all_us = sum(sum(t) for t in totals.values())
    lines.append(f"{'all kernels':<72} {'':>6} {all_us:>10.1f} {all_us / iterations:>9.2f}")
    return lines


def cmd_profile(args: argparse.Namespace) -> int:
    if args.dry_run:
        # triton.jit picks the interpreter when a kernel is defined: before any import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    bench = _bench_lookup()
    from ultramem.kernels import triton_on_cpu
    from ultramem.models.ultramem import UltraMemLayer

    name = "tiny" if args.dry_run else "paper"
    config = bench.CONFIGS[name]
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else bench.DTYPES[args.dtype]
    # the interpreter runs each Triton program in Python, about a second per tiny call:
    # a dry run profiles few of them
    tokens = args.tokens or (2 if args.dry_run else 4096)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    iterations = args.iterations or (2 if args.dry_run else 10)
    if device == "cuda" and not torch.cuda.is_available():
        print("profile: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    layer = UltraMemLayer(config.layer, seed=0).eval().to(device=device, dtype=dtype)
    fused = bench.FusedLookup(layer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, config.layer.d_model, generator=gen).to(device, dtype)
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else lambda: None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # on CPU tensors the ops run their C++/reference kernels; the dry run routes them to the
    # Triton launchers instead, so the kernels a GPU would launch run (interpreted) here too
    with torch.no_grad(), triton_on_cpu(args.dry_run):
        for _ in range(warmup):  # JIT compiles and autotuning stay out of the profile
            fused(x)
        sync()
        with profile(activities=activities) as prof:
            for _ in range(iterations):
                with record_function("fused_lookup"):
                    fused(x)
            sync()
    averages = prof.key_averages()
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    try:
        table = averages.table(sort_by=sort, row_limit=args.rows)
    except (AttributeError, KeyError):  # an older torch names device time after CUDA
        table = averages.table(sort_by="self_cuda_time_total", row_limit=args.rows)
    kernel_type = torch.autograd.DeviceType.CUDA if device == "cuda" else None
    header = [
        f"fused lookup ({name} config: {config.layer}), {str(dtype).removeprefix('torch.')}, "
        f"{tokens} tokens, {iterations} profiled calls after {warmup} warm-ups",
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run)'}; "
        f"torch {torch.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
        "",
        "per-kernel device time (each launch's own interval):",
    ]
    kernels = (
        _kernel_table(list(prof.events()), kernel_type, iterations)
        if kernel_type is not None
        else ["(a CPU run launches no device kernels: see the table below)"]
    )
    text = "\n".join([*header, *kernels, "", f"key_averages, by {sort}:", table]) + "\n"
    Path(args.out).write_text(text)
    print("\n".join([*header, *kernels]))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="install carried wheels whose package is missing")
    wheels.add_argument("--target", required=True)
    wheels.add_argument("dirs", nargs="*")
    env = sub.add_parser("env", help="record versions and the GPU; fail on what is missing")
    env.add_argument("--out", required=True)
    env.add_argument("--dry-run", action="store_true")
    env.add_argument("--ultramem-via", default="installed")
    env.add_argument("--wheels-note", default="")
    junit = sub.add_parser("junit", help="one line of counts from a junit xml")
    junit.add_argument("file")
    note = sub.add_parser("note", help="one line of a bench JSON; exit 1 on wrong rows")
    note.add_argument("kind", choices=("lookup", "bench"))
    note.add_argument("file")
    prof = sub.add_parser("profile", help="torch.profiler summary of the fused lookup")
    prof.add_argument("--out", required=True)
    prof.add_argument("--dry-run", action="store_true")
    prof.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    prof.add_argument("--tokens", type=int)
    prof.add_argument("--warmup", type=int, help="calls before profiling (3; dry run 1)")
    prof.add_argument("--iterations", type=int, help="profiled calls (10; dry run 2)")
    prof.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    commands = {
        "wheels": cmd_wheels,
        "env": cmd_env,
        "junit": cmd_junit,
        "note": cmd_note,
        "profile": cmd_profile,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
