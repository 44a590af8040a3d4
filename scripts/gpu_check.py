"""The Python half of ``scripts/gpu_check.sh``: wheels, the environment record, notes, selfcheck.

    python scripts/gpu_check.py wheels --target DIR WHEEL_DIR...   # install what is missing
    python scripts/gpu_check.py env --out env.json [--cpu]         # versions, GPU, verdict
    python scripts/gpu_check.py junit gpu-tests.xml                # one line of counts
    python scripts/gpu_check.py note lookup|bench FILE.json        # one line of results
    python scripts/gpu_check.py selfcheck --plan DIR               # the dry run's check

``wheels`` and ``junit`` use the standard library only: they run before anything says
whether torch is there. ``env`` exits 2 with one line on stderr when a package the checks
need is missing (or, without ``--cpu``, when torch sees no CUDA device), after writing
``env.json`` with what it found. ``selfcheck`` reads the commands a ``--dry-run`` planned
(one file per step, its words NUL-separated) and checks each as its program would take it,
running none: the script's syntax, that every Python file in ``scripts/`` compiles, each
script's and this helper's argparse, ``ultramem``'s click options, the gpu tests' files and
their pytest collection, ncu's flags. The measurements themselves are
``scripts/gpu_profile.py``'s and ``scripts/kernel_report.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
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
        "mode": "cpu" if args.cpu else "gpu",
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
        if not args.cpu and record["gpu"] is None:
            problems.insert(
                0,
                f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
                "none; --cpu runs the same steps on the CPU, --dry-run checks their commands",
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
    where = f"{gpu['name']} (sm {gpu['sm']})" if gpu else "no GPU" + (" (CPU rehearsal)" * args.cpu)
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


# ---- selfcheck: the dry run's check of the GPU run's commands -------------------------


class _Parsed(Exception):
    """Raised in place of running a program once its command line has parsed."""


@contextlib.contextmanager
def _parse_only() -> Iterator[None]:
    """argparse parses as usual, then stops the program before it does anything."""
    original = argparse.ArgumentParser.parse_args

    def parse(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> argparse.Namespace:
        raise _Parsed(original(self, *args, **kwargs))

    argparse.ArgumentParser.parse_args = parse  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def _compiles(path: Path) -> str | None:
    try:
        compile(path.read_text(), str(path), "exec")
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{path.name} does not compile: {exc}"
    return None


def _load_script(path: Path) -> Any:
    # registered under its own name, as bench_lookup's dataclasses need
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _parses(run: Callable[[], Any]) -> str | None:
    """None when ``run`` got as far as a parsed command line; else argparse's complaint."""
    errors = io.StringIO()
    try:
        with _parse_only(), contextlib.redirect_stderr(errors), contextlib.redirect_stdout(errors):
            run()
    except _Parsed:
        return None
    except SystemExit as exc:
        lines = errors.getvalue().strip().splitlines() or [f"exit {exc.code}"]
        return f"does not parse: {lines[-1]}"
    return "ran past its argument parsing without parsing (no argparse?)"


def check_script(words: list[str]) -> str:
    """``run_script NAME ARGS``: the script exists, compiles, and parses ARGS."""
    path = SCRIPTS / words[0]
    if not path.is_file():
        raise ValueError(f"scripts/{words[0]} does not exist")
    problem = _compiles(path)
    if problem is None:
        module = _load_script(path)
        if not hasattr(module, "main"):
            raise ValueError(f"scripts/{words[0]} has no main(argv)")
        problem = _parses(lambda: module.main(words[1:]))
    if problem:
        raise ValueError(f"scripts/{words[0]} {' '.join(words[1:])}: {problem}")
    return f"scripts/{words[0]} parses {' '.join(words[1:])}"


def check_helper(words: list[str]) -> str:
    """``helper SUBCOMMAND ARGS``: this script's own parser takes them."""
    problem = _parses(lambda: build_parser().parse_args(words))
    if problem:
        raise ValueError(f"gpu_check.py {' '.join(words)}: {problem}")
    return f"gpu_check.py parses {' '.join(words)}"


def check_ultramem(words: list[str]) -> str:
    """``ultramem COMMAND ARGS``: click parses them (the command's body replaced)."""
    import click

    from ultramem.cli.main import cli

    command = cli.commands.get(words[0]) if words else None
    if command is None:
        raise ValueError(f"ultramem has no command {words[:1]}")

    def parsed(*args: Any, **kwargs: Any) -> None:
        raise _Parsed(kwargs)

    original, command.callback = command.callback, parsed
    try:
        cli.main(args=words, prog_name="ultramem", standalone_mode=False)
    except _Parsed:
        return f"ultramem {' '.join(words)} parses"
    except click.ClickException as exc:
        raise ValueError(f"ultramem {' '.join(words)}: {exc.format_message()}") from None
    finally:
        command.callback = original
    raise ValueError(f"ultramem {' '.join(words)}: the command was not reached")


def _pytest_collection(words: list[str]) -> subprocess.Popen[str]:
    """The step's pytest arguments, collecting only (its report file left out)."""
    args = [w for w in words if not w.startswith("--junitxml")]
    command = [sys.executable, "-m", "pytest", *args, "--collect-only", "-p", "no:xdist"]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def check_pytest_files(words: list[str]) -> str:
    """``repo_pytest ARGS``: the test files exist and compile (collection runs aside)."""
    files = [REPO / w for w in words if w.endswith(".py")]
    if not files:
        raise ValueError("the gpu-tests step names no test file")
    for path in files:
        problem = "does not exist" if not path.is_file() else _compiles(path)
        if problem:
            raise ValueError(f"{path.relative_to(REPO)}: {problem}")
    return f"{len(files)} test files exist and compile"


def check_collected(process: subprocess.Popen[str]) -> str:
    output, _ = process.communicate(timeout=120)
    last = (output.strip().splitlines() or ["no output"])[-1]
    if process.returncode != 0 or "collected" not in last:
        raise ValueError(f"pytest collection failed (exit {process.returncode}): {last}")
    return f"pytest collects them: {last}"


def check_ncu(words: list[str]) -> str:
    """``in_run NCU FLAGS... PYTHON SCRIPT ARGS``: the flags a GPU run needs, and the
    target's own command line (ncu itself is checked where it is installed)."""
    flags = " ".join(words)
    for needed in ("--clock-control none", "--profile-from-start off"):
        if needed not in flags:
            raise ValueError(f"ncu without {needed}")
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if script is None:
        raise ValueError("ncu runs no script of ours")
    found = check_script([Path(words[script]).name, *words[script + 1 :]])
    ncu = shutil.which(words[0])
    if ncu:
        known = subprocess.run([ncu, "--help"], capture_output=True, text=True).stdout
        unknown = [w for w in words[1:script] if w.startswith("--") and w not in known]
        if unknown:
            raise ValueError(f"{ncu} does not know {unknown}")
        found += f"; {ncu} knows every flag"
    return found


CHECKS: dict[str, Callable[[list[str]], str]] = {
    "run_script": check_script,
    "helper": check_helper,
    "ultramem": check_ultramem,
    "repo_pytest": check_pytest_files,
    "in_run": check_ncu,
}


def read_plan(folder: Path) -> list[tuple[str, list[str]]]:
    """The planned steps, in order: (step, [function, words...])."""
    plan = []
    for path in sorted(folder.iterdir()):
        words = [w.decode() for w in path.read_bytes().split(b"\0")[:-1]]
        plan.append((words[0], words[1:]))
    return plan


def cmd_selfcheck(args: argparse.Namespace) -> int:
    results: list[tuple[str, str, bool]] = []

    def check(step: str, run: Callable[[], str]) -> None:
        try:
            results.append((step, run(), True))
        except Exception as exc:  # every check's failure is a line of the report
            results.append(
                (
                    step,
                    f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc),
                    False,
                )
            )

    check("script", lambda: _bash_syntax(Path(args.script)))
    check("python", _scripts_compile)
    plan = read_plan(Path(args.plan))
    if not plan:
        results.append(("plan", "no step planned", False))
    collection = None
    for _step, (function, *words) in plan:
        if function == "repo_pytest":
            collection = _pytest_collection(words)  # the slowest check: started first
    for step, (function, *words) in plan:
        if function not in CHECKS:
            results.append((step, f"no check for `{function}`: extend gpu_check.py CHECKS", False))
            continue
        check(step, lambda f=function, w=words: CHECKS[f](w))
    if collection is not None:
        check("gpu-tests", lambda: check_collected(collection))
    for step, text, ok in results:
        print(f"{'ok' if ok else 'FAILED'} {step}: {text}")
    failed = [step for step, _, ok in results if not ok]
    print(
        f"selfcheck: {len(results)} checks of {len(plan)} planned commands: "
        + (f"FAILED {', '.join(failed)}" if failed else "all hold")
    )
    return 1 if failed else 0


def _bash_syntax(script: Path) -> str:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if done.returncode:
        raise ValueError(f"{script.name}: {done.stderr.strip()}")
    return f"{script.name}: bash -n passes"


def _scripts_compile() -> str:
    paths = sorted(SCRIPTS.glob("*.py"))
    problems = [p for p in map(_compiles, paths) if p]
    if problems:
        raise ValueError("; ".join(problems))
    return f"{len(paths)} Python files in scripts/ compile"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="install carried wheels whose package is missing")
    wheels.add_argument("--target", required=True)
    wheels.add_argument("dirs", nargs="*")
    env = sub.add_parser("env", help="record versions and the GPU; fail on what is missing")
    env.add_argument("--out", required=True)
    env.add_argument("--cpu", action="store_true", help="a CPU rehearsal: no GPU needed")
    env.add_argument("--ultramem-via", default="installed")
    env.add_argument("--wheels-note", default="")
    junit = sub.add_parser("junit", help="one line of counts from a junit xml")
    junit.add_argument("file")
    note = sub.add_parser("note", help="one line of a bench JSON; exit 1 on wrong rows")
    note.add_argument("kind", choices=("lookup", "bench"))
    note.add_argument("file")
    check = sub.add_parser("selfcheck", help="check a dry run's planned commands")
    check.add_argument("--plan", required=True, help="the folder of planned commands")
    check.add_argument("--script", default=str(SCRIPTS / "gpu_check.sh"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "wheels": cmd_wheels,
        "env": cmd_env,
        "junit": cmd_junit,
        "note": cmd_note,
        "selfcheck": cmd_selfcheck,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
