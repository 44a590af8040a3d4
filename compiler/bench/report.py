"""Bench reports: ``bench.json`` (schema ``ultramem-bench/1``), ``bench.md``, ``bench.png``.

``bench.json``::

    schema, created, model, device, machine{platform, processor, cpu_count, torch_threads, gpu?},
    versions{...}, batch, tokens[...], threads,
    timing{method: interleaved, budget_s, warmup, calls_per_round, block_s, warm_per_round,
           warm_s, min_rounds, min_reps, max_rounds},
    noise{rule, threshold, noisy[{backend, tokens, spread}]},
    load{rule, threshold_cores, sizes[{tokens, other_cores, window_s, busy}]},
    copy_bandwidth_gbs,
    backends[{name, available, reason, settings{torch_threads | intra_op_num_threads,
              inter_op_num_threads, allow_spinning}, results[{tokens, batch, status: ok|wrong,
              p10_ms, p50_ms, p90_ms, p99_ms, mean_ms, reps, rounds, spread, noisy,
              tokens_per_s, speedup_vs_eager, within_noise_of_eager,
              max_abs_error | parity (the failure, when wrong)}]}],
    lookups[{layer, tokens, batch, p10_ms, p50_ms, p90_ms, p99_ms, floor_bytes, floor_ms,
             achieved_gbs}]

Every backend has results or a reason; a backend that ran but was wrong has ``status:
wrong`` and no timing. ``spread`` is (p90 - p10) / p50; ``noisy`` says it is above
``noise.threshold``, and ``bench.md`` then carries a warning: those figures are not fit to
compare. ``within_noise_of_eager``: the row and eager's overlap so much (``timing.within_noise``)
that its speedup is not distinguishable from 1. ``load``: the cores other processes kept
busy while each size was timed (``timing.OtherProcesses``); a size at or above the
threshold (``busy``) is a warning in ``bench.md`` too.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

import matplotlib

matplotlib.use("Agg")  # no display on CI or the GPU machine
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from ...files import atomic_write
from ..artifacts import json_text


def markdown(report: dict[str, Any], old: dict[str, Any] | None = None) -> str:
    tokens = report["tokens"]
    head = "| backend | " + " | ".join(f"{t} tok p50 ms [p10–p90] (× eager)" for t in tokens) + " |"
    where = report["machine"].get("gpu") or report["machine"]["processor"]
    threads = report.get("threads", report["machine"].get("torch_threads"))
    lines = [
        f"Model `{report['model']}`, batch {report['batch']}, device {report['device']}"
        f" ({where}), threads: {threads}, {report['created']}.",
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
                cells.append(_cell(b["name"], r, old_p50))
        lines.append(f"| {b['name']} | " + " | ".join(cells) + " |")
    lines += _timing_notes(report)
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
            "| layer | tokens | p50 ms [p10–p90] | floor ms | achieved GB/s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            # in code: a layer named <root> would read as an HTML tag
            f"| `{x['layer']}` | {x['tokens']} | {x['p50_ms']:.4f} "
            f"[{x['p10_ms']:.4f}–{x['p90_ms']:.4f}] | {x['floor_ms']:.5f} "
            f"| {x['achieved_gbs']:.2f} |"
            for x in report["lookups"]
        ]
    return "\n".join(lines) + "\n"


def _cell(name: str, r: dict[str, Any], old_p50: dict[tuple[str, int], float]) -> str:
    """``p50 [p10–p90] (speedup×)``; ``≈`` on a speedup within noise of eager, ``!`` on a
    figure too noisy to compare."""
    digits = 3 if r["p50_ms"] >= 0.1 else 4
    cell = f"{r['p50_ms']:.{digits}f} [{r['p10_ms']:.{digits}f}–{r['p90_ms']:.{digits}f}]"
    approx = "≈" if r.get("within_noise_of_eager") else ""
    cell += f" ({approx}{r.get('speedup_vs_eager', float('nan')):.2f}×)"
    if r.get("noisy"):
        cell += " !"
    if (name, r["tokens"]) in old_p50:
        cell += f" [{r['p50_ms'] / old_p50[(name, r['tokens'])]:.2f}× old]"
    return cell


def _timing_notes(report: dict[str, Any]) -> list[str]:
    timing = report.get("timing")
    if not timing:
        return []
    lines = [
        "",
        f"Timed interleaved: after {timing['warmup']} warm-up calls each, rounds in rotating "
        f"order, each backend a round {timing['warm_per_round']}+ untimed calls "
        f"(≥ {1e3 * timing['warm_s']:g} ms) then {timing['calls_per_round']}+ timed "
        f"(≥ {1e3 * timing['block_s']:g} ms), {timing['budget_s']:g} s per backend and size. "
        "`≈`: within noise of eager (p10–p90 ranges overlap and the medians differ by less "
        "than the wider range).",
    ]
    busy = [x for x in report.get("load", {}).get("sizes", []) if x["busy"]]
    if busy:
        where = ", ".join(f"{x['other_cores']:.2f} at {x['tokens']} tok" for x in busy)
        lines += [
            "",
            f"**WARNING: busy machine**: other processes used cores while timing ({where}, of "
            f"{report['machine']['cpu_count']}; threshold {report['load']['threshold_cores']:g})."
            " Interleaving spreads their load over every backend, but multi-threaded ones "
            "suffer most (a descheduled thread stalls every parallel region). Rerun when the "
            "machine is quiet, or with fewer --threads.",
        ]
    noisy = report.get("noise", {}).get("noisy", [])
    if noisy:
        threshold = report["noise"]["threshold"]
        where = ", ".join(f"{n['backend']} at {n['tokens']} tok ({n['spread']:.2f})" for n in noisy)
        lines += [
            "",
            f"**WARNING: too noisy to compare** (`!`, (p90 − p10) / p50 above {threshold:g}): "
            f"{where}. Rerun on a quieter machine or with a larger --budget.",
        ]
    return lines


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


def chart(report: dict[str, Any], path: BinaryIO) -> list[str]:
    """Latency (p50, with p10–p90 whiskers) against tokens per backend, log-log, as PNG
    into ``path``. Returns the series."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series = []
    for b in report["backends"]:
        ok = [r for r in b["results"] if r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["tokens"] * r["batch"] for r in ok]
        ys = [r["p50_ms"] for r in ok]
        err = [
            [r["p50_ms"] - r["p10_ms"] for r in ok],
            [r["p90_ms"] - r["p50_ms"] for r in ok],
        ]
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
    ax.set_ylabel("latency, p50 ms (bar: p10–p90)")
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
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``out``, each made whole in memory
    first and then written under a fresh name and renamed: never through a file or a link
    already there."""
    png = io.BytesIO()
    report["chart_series"] = chart(report, png)
    contents = {
        "bench.json": json_text(report),
        "bench.md": markdown(report, old),
        "bench.png": png.getvalue(),
    }
    out.mkdir(parents=True, exist_ok=True)
    return [atomic_write(out / name, data) for name, data in contents.items()]
