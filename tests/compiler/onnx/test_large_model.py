"""A model with more than 2 GB of weights exports with external data under 2.5× peak memory.

Marked ``slow`` (about a minute and 5 GB of memory): run with ``pytest -m slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "large_model_export.py"


@pytest.mark.slow
def test_over_2gb_exports_with_external_data_and_bounded_memory(tmp_path: Path) -> None:
    out = tmp_path / "large"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--value-gb", "2.2"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert summary["weight_bytes"] > 2**31 and summary["parity_passed"]
    assert summary["peak_over_weights"] < 2.5
    formats = {a["path"]: a["format"] for a in summary["artifacts"]}
    assert formats == {"model.onnx": "onnx", "model.onnx.data": "onnx-external-data"}
    assert (out / "model.onnx.data").stat().st_size > 2**31
    assert (out / "model.onnx").stat().st_size < 10 * 2**20
