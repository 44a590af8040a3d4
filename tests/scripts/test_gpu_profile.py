"""``scripts/gpu_profile.py profile --cpu``: the profiler step of the GPU run, on CPU tensors.

The full CPU rehearsal of ``gpu_check.sh`` (``test_gpu_check.py``, marked slow: about two
minutes) runs this step among the others; this checks the step alone in seconds: the
fused lookup runs under torch.profiler with both fused ops seen, and the record says what
was measured and why no CUDA graph was captured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_profile_step_records_the_fused_ops_and_says_why_no_graph(tmp_path: Path) -> None:
    text, record = tmp_path / "profile.txt", tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_profile.py"), "profile", "--cpu",
         "--out", str(text), "--json", str(record)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    profile = text.read_text()
    assert "key_averages" in profile
    assert "ultramem::retrieve" in profile and "ultramem::aggregate" in profile
    measured = json.loads(record.read_text())
    assert [m["tokens"] for m in measured["measured"]] == [2]
    assert measured["cuda_graph"]["captured"] is None
    assert "no CUDA device" in measured["cuda_graph"]["reason"]
