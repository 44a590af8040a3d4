"""Bench reports: ``bench.json`` (schema ``ultramem-bench/1``), ``bench.md``, ``bench.png``.

``bench.json``::

    schema, created, model, device, machine{platform, processor, cpu_count, torch_threads, gpu?},
    versions{...}, batch, tokens[...], copy_bandwidth_gbs,
    backends[{name, available, reason, results[{tokens, batch, status: ok|wrong,
              p50_ms, p90_ms, p99_ms, mean_ms, reps, tokens_per_s, speedup_vs_eager,
              max_abs_error | parity (the failure, when wrong)}]}],
    lookups[{layer, tokens, batch, p50_ms, p90_ms, p99_ms, floor_bytes, floor_ms, achieved_gbs}]

Every backend has results or a reason; a backend that ran but was wrong has ``status:
wrong`` and no timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on CI or the GPU machine
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from ..artifacts import json_text


def markdown(report: dict[str, Any], old: dict[str, Any] | None = None) -> str:
    tokens = report["tokens"]
    head = "| backend | " + " | ".join(f"{t} tok p50 ms (× eager)" for t in tokens) + " |"
    where = report["machine"].get("gpu") or report["machine"]["processor"]
    lines = [
        f"Model `{report['model']}`, batch {report['batch']}, device {report['device']}"
        f" ({where}), {report['created']}.",
        "",
        head,
        "|" + "---|" * (len(tokens) + 1),
    ]
    old_p50 = _p50_index(old) if old else {}
    for b in report["backends"]:
        if not b["available"]:
            lines.append(f"| {b['name']} | " + " | ".join("skipped" for _ in tokens) + " |")
            continue
        by_t = {r["tokens"]: r for r in b["results"]}
        cells = []
        for t in tokens:
            r = by_t.get(t)
            if r is None:
                cells.append("—")
            elif r["status"] != "ok":
                cells.append("WRONG")
            else:
                cell = f"{r['p50_ms']:.3f} ({r.get('speedup_vs_eager', float('nan')):.2f}×)"
                if (b["name"], t) in old_p50:
                    cell += f" [{r['p50_ms'] / old_p50[(b['name'], t)]:.2f}× old]"
                cells.append(cell)
        lines.append(f"| {b['name']} | " + " | ".join(cells) + " |")
    skipped = [b for b in report["backends"] if not b["available"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{b['name']}: {b['reason']}" for b in skipped) + "."]
    wrong = [
        (b["name"], r) for b in report["backends"] for r in b["results"] if r["status"] != "ok"
    ]
    for name, r in wrong:
        lines.append(f"WRONG | {name} | tokens={r['tokens']} | {r['parity']}")
    if report["lookups"]:
        lines += [
            "",
            "Fused lookup alone (floor at the copy bandwidth measured in the same run, "
            f"{report['copy_bandwidth_gbs']:.1f} GB/s):",
            "",
            "| layer | tokens | p50 ms | floor ms | achieved GB/s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['layer']} | {x['tokens']} | {x['p50_ms']:.4f} | {x['floor_ms']:.5f} "
            f"| {x['achieved_gbs']:.2f} |"
            for x in report["lookups"]
        ]
    return "\n".join(lines) + "\n"


def _p50_index(report: dict[str, Any]) -> dict[tuple[str, int], float]:
    return {
        (b["name"], r["tokens"]): r["p50_ms"]
        for b in report.get("backends", [])
        for r in b.get("results", [])
        if r.get("status") == "ok"
    }


def _two_and_five(value: float, _: object) -> str:
    """Label the 2s and 5s between decades, leave the other minor ticks bare."""
    return f"{value:g}" if f"{value:e}"[0] in "25" else ""


def chart(report: dict[str, Any], path: Path) -> list[str]:
    """Latency (p50, with p90 whiskers) against tokens per backend, log-log. Returns the series."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series = []
    for b in report["backends"]:
        ok = [r for r in b["results"] if r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["tokens"] * r["batch"] for r in ok]
        ys = [r["p50_ms"] for r in ok]
        err = [[0] * len(ok), [r["p90_ms"] - r["p50_ms"] for r in ok]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=b["name"])
        series.append(b["name"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    # plain numbers (1, 16, 64; 0.2, 0.5, 1) read faster than 10^x labels
    token_counts = sorted(
        {r["tokens"] * r["batch"] for b in report["backends"] for r in b["results"]}
    )
    ax.set_xticks(token_counts, [str(t) for t in token_counts])
    ax.xaxis.set_minor_formatter(NullFormatter())
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("tokens per call (batch × sequence)")
    ax.set_ylabel("latency, p50 ms (bar: p90)")
    gpu = report["machine"].get("gpu")
    ax.set_title(f"{report['model']} on {gpu or report['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return series


def write_reports(
    report: dict[str, Any], out: Path, old: dict[str, Any] | None = None
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    report["chart_series"] = chart(report, out / ".bench.png.tmp")
    (out / ".bench.json.tmp").write_text(json_text(report))
    (out / ".bench.md.tmp").write_text(markdown(report, old))
    for p in paths:
        (out / f".{p.name}.tmp").replace(p)
    return paths
