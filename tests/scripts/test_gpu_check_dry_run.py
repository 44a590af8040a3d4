"""``scripts/gpu_check.sh --dry-run``: the GPU run's commands checked on a CPU, in seconds.

The dry run runs no step: it plans each as a GPU run would run it and ``gpu_check.py
selfcheck`` checks the plan (the script's syntax, every Python file compiling, each command
line parsing with its own program's parser, the gpu tests collecting). A broken command
fails here, not in the one GPU run a session gets. And the gpu tests a GPU machine without
TensorRT runs: every one marked ``trt`` skips there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_dry_run_checks_every_command_of_the_gpu_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script("--dry-run", "--pack", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu_check: dry run") and "**result: passed**" in summary
    # --pack: at most 8 files come back from the device tool; the archive holds every log
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "gpu_check.tar.gz" in files, files
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        log = archive.extractfile("./selfcheck.log")
        assert log is not None
        checked = log.read().decode()
    # every planned step was checked, the measurements among them
    for step in ("env", "kernel-report", "profile", "ncu", "bench-lookup-bf16", "gpu-tests"):
        assert f"ok {step}:" in checked, (step, checked[-3000:])
    assert "pytest collects them" in checked and "FAILED" not in checked


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="checks a machine without tensorrt"
)
def test_trt_marked_tests_skip_without_the_full_tensorrt() -> None:
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "mark.trt" in p.read_text()
    )
    assert files, "no test is marked trt any more: drop this test"
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "--import-mode=importlib"]
    command += ["-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rs", "-m", "trt", *files]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "skipped" in last and "passed" not in last and "failed" not in last, last
    assert "needs the full `tensorrt` package" in done.stdout
