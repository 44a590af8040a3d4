"""``--help``, ``--version`` and bad input answer without importing anything heavy.

What made ``ultramem export --help`` take 7 s was importing torch, ONNX, Triton and
matplotlib (and building the native kernels) before click parsed a flag. Whether a module
was imported is a fact, not a timing: each case runs the CLI in a fresh interpreter and
lists the heavy packages in ``sys.modules`` afterwards, which must be none.
``scripts/bench_startup.py`` times the same commands against ``python -c pass``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "triton",
    "transformers",
    "matplotlib",
    "numpy",
    "safetensors",
    "sympy",
    "tensorrt",
    "tensorrt_rtx",
)

PROBE = """
import json, sys
from ultramem.cli.main import run
code = run(json.loads(sys.argv[1]))
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _run(argv: list[str], cwd: Path) -> tuple[int, list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], result["heavy"], done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["export", "--help"],
        ["check", "--help"],
        ["bench", "--help"],
        ["inspect", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_nothing_heavy(argv: list[str], tmp_path: Path) -> None:
    code, heavy, _ = _run(argv, tmp_path)
    assert code == 0
    assert heavy == []


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    a_file = tmp / "a-file"
    a_file.write_text("x")
    full = tmp / "full"
    full.mkdir()
    (full / "theirs.txt").write_text("x")
    out = str(tmp / "out")
    return [
        (["export", "--format", "bogus", "--out", out], "unknown format"),
        (["export", "--format", "onnx,onnx", "--out", out], "give each format once"),
        (["export", "--opset", "99", "--out", out], "--opset 99"),
        (["export", "--sm", "7", "--out", out], "--sm 7"),
        (["export", "--precision", "fp16", "--out", out], "add tensorrt to --format"),
        (["export", "builtin:nope", "--out", out], "unknown builtin model"),
        (["export", "no/such.pt2", "--out", out], "no such .pt2 file"),
        (["export", "nonsense", "--out", out], "unknown MODEL"),
        (["export", "builtin:facts", "--weights", str(a_file), "--out", out], "--weights"),
        (["export", "--out", str(a_file)], "not a folder"),
        (["export", "--out", str(full)], "holds no ultramem manifest"),
        (["export", "--no-such-flag"], "No such option"),
        (["check", "--artifacts", str(tmp / "missing")], "no manifest.json"),
        (["inspect", "builtin:nope"], "unknown builtin model"),
        (["bench", "--out", out, "--budget", "0"], "--budget"),
        (["bench", "--out", out, "--backends", "nope"], "--backends"),
        (["bench", "--out", str(a_file)], "not a folder"),
        (["bench", "builtin:nope", "--out", out], "unknown builtin model"),
    ]


def test_bad_input_answers_before_any_heavy_import(tmp_path: Path) -> None:
    for argv, expected in _bad_inputs(tmp_path):
        code, heavy, stderr = _run(argv, tmp_path)
        assert code == 2, (argv, stderr)
        assert expected in stderr, (argv, stderr)
        assert len(stderr.strip().splitlines()) == 1, (argv, stderr)
        assert heavy == [], (argv, heavy)
    assert not (tmp_path / "out").exists()  # nothing written for any of them
