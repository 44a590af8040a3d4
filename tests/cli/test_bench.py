"""``ultramem bench`` on CPU, a tiny sweep: three reports, schema, chart, the thread count
every backend ran with, interleaved rounds. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import torch
from click.testing import CliRunner

from ultramem.cli.main import cli
from ultramem.compiler.bench.run import BENCH_SCHEMA

RESULT_KEYS = {
    "tokens",
    "batch",
    "status",
    "p10_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "reps",
    "rounds",
    "spread",
    "noisy",
    "tokens_per_s",
}


def test_bench_writes_json_markdown_and_chart(tmp_path: Path, user_models: str) -> None:
    artifacts = tmp_path / "artifacts"
    result = CliRunner().invoke(
        cli, ["export", f"{user_models}:two_layers", "--out", str(artifacts)]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "bench"
    args = [
        "bench",
        f"{user_models}:two_layers",
        "--artifacts",
        str(artifacts),
        "--tokens",
        "1,5",
        "--backends",
        "eager,fused-ops,onnxruntime-cpu,tensorrt,plugin-kernels",
        "--budget",
        "0.02",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    threads_before = torch.get_num_threads()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    # set for the run, given back after it (the bench runs in this process here)
    assert torch.get_num_threads() == threads_before
    report = json.loads((out / "bench.json").read_text())
    assert report["threads"] == 1 and report["machine"]["torch_threads"] == 1
    assert report["timing"]["method"] == "interleaved"
    assert "threads: 1 for every backend" in result.output
    assert report["schema"] == BENCH_SCHEMA and report["tokens"] == [1, 5]
    assert report["copy_bandwidth_gbs"] > 0 and report["versions"]["torch"]
    by_name = {b["name"]: b for b in report["backends"]}
    assert set(by_name) == {"eager", "fused-ops", "onnxruntime-cpu", "tensorrt", "plugin-kernels"}
    for b in report["backends"]:
        # every backend has figures or a reason, never neither
        assert (b["available"] and b["results"]) or (not b["available"] and b["reason"]), b
    # what each backend ran with, read back from it
    assert by_name["onnxruntime-cpu"]["settings"] == {
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
        "allow_spinning": "0",
    }
    assert by_name["eager"]["settings"] == by_name["fused-ops"]["settings"] == {"torch_threads": 1}
    for name in ("eager", "fused-ops", "onnxruntime-cpu"):
        rows = by_name[name]["results"]
        assert [r["tokens"] for r in rows] == [1, 5]
        for r in rows:
            assert r["status"] == "ok" and set(r) >= RESULT_KEYS
            assert r["p10_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["max_abs_error"] <= 1e-4
            assert r["spread"] == (r["p90_ms"] - r["p10_ms"]) / r["p50_ms"]
            assert r["noisy"] == (r["spread"] > report["noise"]["threshold"])
        # interleaved: at one size every backend had the same rounds, 3+ calls in each
        for i in range(2):
            assert rows[i]["rounds"] == by_name["eager"]["results"][i]["rounds"] >= 2
            assert rows[i]["reps"] >= 3 * rows[i]["rounds"]
            assert (
                abs(
                    r["speedup_vs_eager"]
                    - by_name["eager"]["results"][rows.index(r)]["p50_ms"] / r["p50_ms"]
                )
                < 1e-9
            )
    assert [x["layer"] for x in report["lookups"]] == ["memories.0", "memories.1"] * 2
    assert all(x["floor_bytes"] > 0 and x["floor_ms"] > 0 for x in report["lookups"])
    # the chart is a real PNG with one series per backend that has figures
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(out / "bench.png").shape
    assert width > 400 and height > 300
    assert report["chart_series"] == ["eager", "fused-ops", "onnxruntime-cpu"]
    table = (out / "bench.md").read_text()
    assert "| onnxruntime-cpu |" in table and "tensorrt: no model.engine" in table
    assert "p10–p90" in table and "threads: 1" in table and "Timed interleaved" in table
    # each warning is there exactly when its rule fired
    assert ("too noisy to compare" in table) == bool(report["noise"]["noisy"])
    sizes = report["load"]["sizes"]
    assert [x["tokens"] for x in sizes] == [1, 5] and all(x["window_s"] > 0 for x in sizes)
    assert ("busy machine" in table) == any(x["busy"] for x in sizes)
    # --compare shows the ratio against an earlier run
    result = CliRunner().invoke(
        cli, [*args[:-1], str(tmp_path / "again"), "--compare", str(out / "bench.json")]
    )
    assert result.exit_code == 0, result.output
    assert "× old]" in (tmp_path / "again" / "bench.md").read_text()


def test_bench_rejects_unknown_backend_and_bad_tokens(tmp_path: Path, user_models: str) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            f"{user_models}:two_layers",
            "--backends",
            "eager,warp-drive",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "warp-drive" in result.output
    result = CliRunner().invoke(cli, ["bench", "--tokens", "1,x", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
