"""``scripts/gpu_check.sh --cpu``: every step of the GPU run, for real, on CPU tensors.

The GPU run cannot happen here; the CPU rehearsal runs the same steps on CPU tensors (the
tiny bench config, few tokens, small budgets), so a renamed flag, a moved file or a changed
JSON field breaks this test rather than the one GPU run a session gets. No mocks: the
script, the CLI and the helpers run as they would on the device. About 150 CPU-seconds
(two steps at a time): 2 to 4 minutes on two cores, so it is marked slow (``pytest -m
slow tests/scripts``); ``test_gpu_check_dry_run.py`` checks the GPU run's own commands in
seconds and the steps' scripts have their own tests (``test_kernel_report.py``,
``test_gpu_profile.py``, ``test_bench_lookup.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = (
    "env",
    "kernel-report",
    "profile",
    "ncu",
    "bench-lookup-bf16",
    "bench-lookup-fp16",
    "gpu-tests",
    "export-fp32",
    "check-fp32",
    "export-fp16",
    "check-fp16",
    "bench",
)


def run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    # the interpreter of this test run, whatever .venv the checkout has
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def summary_rows(summary: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in STEPS:
            rows[cells[0]] = {"status": cells[1], "seconds": cells[2], "line": line}
    return rows


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _check_rehearsal_passes_and_summarises_every_step(
    out: Path, done: subprocess.CompletedProcess
) -> None:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu_check: CPU rehearsal")
    rows = summary_rows(summary)
    assert list(rows) == list(STEPS), summary
    has_tensorrt = any(importlib.util.find_spec(n) for n in ("tensorrt", "tensorrt_rtx"))
    for step, row in rows.items():
        optional = step in ("export-fp16", "check-fp16") and not has_tensorrt
        skipped = optional or step == "ncu"  # no GPU, no Nsight Compute run
        assert row["status"] == ("skipped" if skipped else "ok"), row["line"]
        assert row["seconds"].isdigit(), row["line"]
        assert (out / f"{step}.log").is_file() or row["status"] == "skipped"
    assert "**result: passed**" in summary


def _check_env_json_records_the_machine(out: Path, done: subprocess.CompletedProcess) -> None:
    env = read_json(out / "env.json")
    assert env["mode"] == "cpu" and env["missing"] == []
    assert env["packages"]["torch"]["version"] == torch.__version__
    assert env["torch"]["cuda_available"] == torch.cuda.is_available()
    for name in ("triton", "onnxruntime", "onnx", "pytest"):
        assert env["packages"][name]["version"], name
    assert Path(env["ultramem"]["path"]) == REPO
    assert "tensorrt" in env["packages"] and "tensorrt_rtx" in env["packages"]


def _check_gpu_tests_ran_as_pytest_and_skipped_cleanly(
    out: Path, done: subprocess.CompletedProcess
) -> None:
    root = ET.parse(out / "gpu-tests.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    assert tests > 0
    assert sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites) == 0
    if not torch.cuda.is_available():
        assert sum(int(s.get("skipped", 0)) for s in suites) == tests


def _check_exports_pass_parity_and_are_checked(
    out: Path, done: subprocess.CompletedProcess
) -> None:
    manifest = read_json(out / "export-fp32.manifest.json")
    assert manifest["formats"] == ["onnx", "kernels", "aoti"]
    assert manifest["parity"]["passed"] is True
    parity = read_json(out / "export-fp32.parity.json")
    stages = {s["stage"]: s for s in parity["stages"]}
    for stage in ("fused-ops", "onnxruntime-cpu", "aotinductor"):
        assert stages[stage]["executed"] and stages[stage]["passed"], stage
    check = read_json(out / "check-fp32.parity.json")
    assert {s["stage"]: s["passed"] for s in check["stages"]}["aotinductor"] is True
    if (out / "export-fp16.manifest.json").exists():
        fp16 = read_json(out / "export-fp16.manifest.json")
        assert fp16["tensorrt"]["precision"] == "fp16" and fp16["parity"]["passed"] is True
        assert read_json(out / "check-fp16.parity.json")["stages"]


def _check_benchmarks_and_profile_are_written(out: Path, done: subprocess.CompletedProcess) -> None:
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / "bench" / name).stat().st_size > 0, name
    bench = read_json(out / "bench" / "bench.json")
    assert bench["lookups"] and bench["copy_bandwidth_gbs"] > 0
    for dtype in ("bf16", "fp16"):
        report = read_json(out / f"bench-lookup-{dtype}.json")
        assert report["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
        assert report["bandwidth_source"].startswith("measured")
        fused = [r for r in report["rows"] if r["backend"] == "fused-ops"]
        assert fused and all(r["status"] == "ok" and r["selection"]["passed"] for r in fused)
    profile = (out / "profile.txt").read_text()
    assert "key_averages" in profile and "ultramem::retrieve" in profile
    measured = read_json(out / "profile.json")
    assert [m["tokens"] for m in measured["measured"]] == [2]
    assert measured["cuda_graph"]["captured"] is None  # no CUDA here: said, not failed
    # the static estimate ran first and is put beside the (here empty) measurement
    report = read_json(out / "kernel-report.json")
    assert report["rows"] and len(measured["estimate_vs_measured"]) == len(report["rows"])


@pytest.mark.slow  # 2 to 4 minutes; its steps are tested alone in tests/scripts/
def test_the_cpu_rehearsal_runs_every_step_and_writes_every_record(tmp_path: Path) -> None:
    # one test, not one per record: under xdist a module fixture would run the 2-minute
    # rehearsal once per worker
    out = tmp_path / "out"
    done = run_script("--cpu", str(out))
    _check_rehearsal_passes_and_summarises_every_step(out, done)
    _check_env_json_records_the_machine(out, done)
    _check_gpu_tests_ran_as_pytest_and_skipped_cleanly(out, done)
    _check_exports_pass_parity_and_are_checked(out, done)
    _check_benchmarks_and_profile_are_written(out, done)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_a_gpu_run_without_a_gpu_fails_in_one_line(tmp_path: Path) -> None:
    done = run_script(str(tmp_path / "out"), timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run" in lines[0]
    rows = summary_rows((tmp_path / "out" / "summary.md").read_text())
    assert rows["env"]["status"] == "failed"
    assert {r["status"] for s, r in rows.items() if s != "env"} == {"skipped"}


def test_usage_errors_exit_2_before_any_work(tmp_path: Path) -> None:
    assert run_script(timeout=60).returncode == 2
    assert run_script("--no-such-flag", str(tmp_path), timeout=60).returncode == 2
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    done = run_script("--cpu", str(foreign), timeout=60)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (foreign / "notes.txt").read_text() == "not ours"
