"""``ultramem export FILE.pt2`` on a hostile archive: exit 2, one line, and the machine is
as it was.

A graph that calls ``aten::from_file`` would create, grow and zero, or read the file it
names while the program is loaded or run for capture; a zip bomb of a few hundred KB would
take its inflated size (twice over) in memory. Both are refused before they act.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ultramem.cli.main import run
from ultramem.tests.compiler.test_safe_pt2 import Small, _program, _rewrite
from ultramem.tests.compiler.test_safe_pt2_hostile import WEIGHT, _from_file, _replace_member

MB = 1 << 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = torch.export.export(Small().eval(), (torch.randn(3, 5, 4),))
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(program, str(path))
    return path


def _refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = run(list(args))
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if not ln.startswith("[ultramem]")]
    assert code == 2, (code, captured.err, captured.out)
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "read"])
def test_a_pt2_calling_from_file_creates_no_file(
    capsys: pytest.CaptureFixture[str], saved: Path, tmp_path: Path, shared: bool
) -> None:
    victim, out = tmp_path / "created", tmp_path / "out"
    evil = _rewrite(saved, tmp_path / "evil.pt2", _program(_from_file(victim, shared, 1 << 20)))
    line = _refusal(capsys, "export", str(evil), "--out", str(out))
    assert "'torch.ops.aten.from_file.default' is not a pure tensor operator" in line
    assert "(it reads or writes files)" in line
    # the opt-in is named because it would load the archive: torch.export.load runs it
    assert "--allow-unsafe-pickle" in line
    assert not victim.exists() and not out.exists()


def test_a_pt2_calling_from_file_leaves_an_existing_file_as_it_was(
    capsys: pytest.CaptureFixture[str], saved: Path, tmp_path: Path
) -> None:
    victim, out = tmp_path / "notes.txt", tmp_path / "out"
    victim.write_bytes(b"keep me")
    evil = _rewrite(saved, tmp_path / "evil.pt2", _program(_from_file(victim, True, 1 << 20)))
    _refusal(capsys, "export", str(evil), "--out", str(out))
    assert victim.read_bytes() == b"keep me" and not out.exists()


# Runs the CLI on each archive in a fresh interpreter and reports its exit code, its error
# line and how far the process's peak memory rose above what torch and the CLI take
_MEASURE = """
import contextlib, io, json, resource, sys
from ultramem.cli.main import run
import ultramem.compiler.loading  # torch and the loader: the baseline
results = []
for archive, out in zip(sys.argv[1::2], sys.argv[2::2]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run(["export", archive, "--out", out])
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    lines = [ln for ln in err.getvalue().splitlines() if not ln.startswith("[ultramem]")]
    results.append({"code": code, "lines": lines, "rise_kb": rise})
print(json.dumps(results))
"""


def test_a_zip_bomb_is_refused_without_inflating_it(saved: Path, tmp_path: Path) -> None:
    bomb = _replace_member(saved, tmp_path / "bomb.pt2", WEIGHT, 256)
    # declares its real size, holds 128 MB: only the CRC at its declared end betrays it
    liar = _replace_member(saved, tmp_path / "liar.pt2", WEIGHT, 128, declared=64)
    assert bomb.stat().st_size < MB and liar.stat().st_size < MB
    args = [str(bomb), str(tmp_path / "out1"), str(liar), str(tmp_path / "out2")]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bombed, lied = json.loads(done.stdout.splitlines()[-1])
    assert bombed["code"] == 2 and len(bombed["lines"]) == 1, bombed
    assert (
        f"inflates to {256 * MB + _others(saved)} bytes from {bomb.stat().st_size}"
        in (bombed["lines"][0])
    )
    assert "--allow-unsafe-pickle" not in bombed["lines"][0]  # it would not help
    assert lied["code"] == 2 and len(lied["lines"]) == 1 and "CRC" in lied["lines"][0], lied
    for result in (bombed, lied):
        assert result["rise_kb"] < 64 * 1024, result  # neither was inflated into memory
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def _others(saved: Path) -> int:
    """What the archive's members other than the replaced weight declare."""
    with zipfile.ZipFile(saved) as archive:
        return sum(i.file_size for i in archive.infolist() if i.filename != WEIGHT)
