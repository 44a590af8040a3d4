"""``scripts/bench_lookup.py`` on its tiny config: it runs, checks selection, writes the rows.

No timing assertions: latencies on a shared CPU say nothing; the rows' presence does.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_lookup.py"


def load_script() -> ModuleType:
    # scripts/ is no package; register the module first so its dataclasses resolve
    spec = importlib.util.spec_from_file_location("bench_lookup", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_config_writes_every_row(tmp_path: Path) -> None:
    bench = load_script()
    out = tmp_path / "bench.json"
    bench.main(["--config", "tiny", "--tokens", "1,8", "--json", str(out), "--budget-s", "0.01"])
    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA and report["config"] == "tiny"
    rows = {(r["tokens"], r["backend"]): r for r in report["rows"]}
    assert set(rows) == {(t, b) for t in (1, 8) for b in bench.BACKENDS}
    for tokens in (1, 8):
        for backend in ("eager", "fused-ops"):
            row = rows[tokens, backend]
            assert row["status"] == "ok", row
            assert row["median_ms"] > 0 and row["achieved_tbs"] > 0
        selection = rows[tokens, "fused-ops"]["selection"]
        assert selection["passed"] and selection["rows_with_other_slots"] == 0
        assert selection["rows"] == tokens * report["layer"]["heads"]
        # torch.compile may lack a toolchain on some machines: then it says why
        compiled = rows[tokens, "torch.compile"]
        assert compiled["status"] == "ok" or compiled.get("reason")
    assert rows[1, "eager"]["floor_bytes"] < rows[8, "eager"]["floor_bytes"]


def test_floor_counts_value_rows_keys_and_wout() -> None:
    bench = load_script()
    cfg = bench.CONFIGS["paper"].layer
    value_rows = 64 * 2 * 32 * 256
    keys = 2 * 2 * 1024 * 128 * 2
    wout = 4 * 256 * 1024
    assert bench.floor_bytes(cfg, 64, 2) == 2 * (value_rows + keys + wout)
