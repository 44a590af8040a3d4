"""Benchmark the lookup of one UltraMem layer: reference eager, torch.compile, fused ops.

    python scripts/bench_lookup.py --config paper --json bench.json     # GPU, bf16
    python scripts/bench_lookup.py --config paper --dtype fp16 --bandwidth-tbs measure
    python scripts/bench_lookup.py --config tiny --tokens 1,8           # CPU smoke run

For each token count, on the same inputs: the reference layer (``UltraMemLayer``) eager,
the same under ``torch.compile``, and the fused path (the scoring matmuls, then
``torch.ops.ultramem.retrieve`` + ``aggregate``, then the output projection; on CUDA the ops
run the Triton kernels). Before timing, the fused path's selection is checked against the
reference layer's (the slots the layer feeds to its shuffle, recorded on the way) and its
output against the layer's. The memory-traffic floor is docs/ultramem.md's "What a lookup
costs": k value rows per token and head, both key tables and Wout, at ``--bandwidth-tbs``
(3.35 TB/s, an H100 SXM's HBM3; ``--bandwidth-tbs measure`` takes the device's own copy
bandwidth, measured in the same run); achieved bandwidth is that floor over the median
latency. ``--dtype`` overrides the config's (bf16 for paper).

The selection check runs in fp32 even for a bf16 benchmark: in bf16 the reference layer
rounds its rank-1 merge and grid scores to bf16 before its top-ks, so its own selection is
decided by rounding ties, while the fused ops score in fp32 by contract.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import ultramem.kernels  # noqa: F401  (registers torch.ops.ultramem)
from ultramem.compiler.artifacts import versions
from ultramem.compiler.bench.timing import copy_bandwidth_gbs, measure
from ultramem.models.config import UltraMemConfig
from ultramem.models.ultramem import UltraMemLayer

SCHEMA = "ultramem-bench-lookup/1"
BACKENDS = ("eager", "torch.compile", "fused-ops")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the measured floor's copy: far past a GPU's L2 (60 MB on an H200); smaller on a CPU, where
# the dry runs use it and a 512 MB round trip would only cost time
COPY_MBYTES = {"cuda": 256, "cpu": 64}


@dataclass(frozen=True)
class BenchConfig:
    layer: UltraMemConfig
    dtype: torch.dtype
    device: str
    budget_s: float  # timing budget per (backend, token count)


CONFIGS = {
    # docs/ultramem.md, "Sizes to test and benchmark with": the paper-scale layer
    "paper": BenchConfig(
        UltraMemConfig(
            d_model=1024,
            n_keys=1024,
            key_dim=128,
            heads=2,
            tucker_rank=2,
            cores=2,
            topm=32,
            topk=32,
            value_dim=256,
            expansion=4,
        ),
        torch.bfloat16,
        "cuda",
        1.0,
    ),
    "tiny": BenchConfig(
        UltraMemConfig(
            d_model=64,
            n_keys=32,
            key_dim=32,
            heads=2,
            cores=2,
            topm=8,
            topk=8,
            value_dim=64,
            expansion=4,
        ),
        torch.float32,
        "cpu",
        0.05,
    ),
}


class FusedLookup:
    """The layer as the fused ops run it; weight-only maths (key norm, rank-1) folded once."""

    def __init__(self, layer: UltraMemLayer) -> None:
        cfg = layer.cfg
        self.layer, self.cfg = layer, cfg
        with torch.no_grad():
            keys = F.normalize(layer.keys, dim=3) if cfg.key_norm else layer.keys
            # [2, Dk, H·n·r]: both sides' scores in one batched GEMM, laid out [T, H, n, r]
            self.keys = keys.permute(1, 3, 0, 2, 4).reshape(2, cfg.key_dim, -1).contiguous()
            u, v = layer.rank1()
            self.u, self.v = u.detach().clone(), v.detach().clone()
            # the layer's implicit value expansion as the aggregate's maps: row j mod R,
            # group j div R of the shuffled slot j
            virtual = layer.shuffle.view(1, -1)
            self.row_map, self.group_map = virtual % cfg.value_rows, virtual // cfg.value_rows

    def slots_and_pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cfg, layer = self.cfg, self.layer
        batch, seq, _ = x.shape
        x_q = x
        if layer.query_conv is not None:
            x_q = layer.query_conv(x.transpose(1, 2))[..., :seq].transpose(1, 2)
        q = layer.query_norm(layer.query(x_q).view(batch * seq, 2, cfg.key_dim))
        s = torch.bmm(q.transpose(0, 1), self.keys)  # [2, T, H·n·r]
        shape = (batch * seq, cfg.heads, cfg.n_keys, cfg.tucker_rank)
        scores, slots = torch.ops.ultramem.retrieve(
            s[0].view(shape),
            s[1].view(shape),
            self.u,
            self.v,
            layer.cores,
            cfg.topm,
            cfg.topk,
            cfg.score_activation,
        )
        pooled = torch.ops.ultramem.aggregate(
            layer.values, scores, slots, self.row_map, self.group_map, cfg.expansion
        )
        return slots, pooled

    def __call__(self, x: Tensor) -> Tensor:
        _, pooled = self.slots_and_pooled(x)
        out = pooled.view(*x.shape[:2], -1)
        return self.layer.out_proj(out) if self.layer.out_proj is not None else out


class _SlotRecorder(TorchDispatchMode):
    """Records the slot ids the reference layer indexes its shuffle buffer with."""

    def __init__(self, shuffle: Tensor) -> None:
        super().__init__()
        self.shuffle, self.slots = shuffle, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.index.Tensor and args[0].data_ptr() == self.shuffle.data_ptr():
            self.slots = args[1][0]
        return func(*args, **(kwargs or {}))


def check_selection(layer32: UltraMemLayer, x: Tensor, max_mismatch: float) -> dict[str, Any]:
    """Fused selection vs the reference layer's, both in fp32 on the bench's inputs.

    Passes when at most ``max_mismatch`` of the (token, head) rows select another slot set
    and every other token's output matches: the layer's einsums may contract with FMA where
    the op rounds each product, which can flip a near-tie within one ulp (a few rows in
    thousands); a systematic error changes most rows."""
    x32 = x.float()
    recorder = _SlotRecorder(layer32.shuffle)
    with torch.no_grad():
        with recorder:
            want = layer32(x32)
        fused = FusedLookup(layer32)
        slots, _ = fused.slots_and_pooled(x32)
        got = fused(x32)
    ref = recorder.slots
    if ref is None:
        return {"passed": False, "reason": "the reference layer never indexed its shuffle"}
    differ = (slots.sort(-1).values != ref.sort(-1).values).any(-1)  # [T, H]
    same_tokens = ~differ.any(-1)
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    outputs_match = torch.allclose(got[same_tokens], want[same_tokens], atol=1e-4, rtol=1e-4)
    return {
        "passed": bool(outputs_match) and int(differ.sum()) <= max_mismatch * differ.numel(),
        "rows": int(differ.numel()),
        "rows_with_other_slots": int(differ.sum()),
        "same_order": bool(torch.equal(slots, ref)),
        "output_max_abs_diff": float(
            torch.where(same_tokens[:, None], got - want, 0.0).abs().max()
        ),
    }


def floor_bytes(cfg: UltraMemConfig, tokens: int, element_size: int) -> int:
    """docs/ultramem.md, "What a lookup costs": k value rows per token and head, both key
    tables (each 2·n·Dk·r per head) and Wout, each read once."""
    rows = tokens * cfg.heads * cfg.topk * cfg.value_dim
    keys = cfg.heads * 2 * cfg.n_keys * cfg.key_dim * cfg.tucker_rank
    wout = cfg.expansion * cfg.value_dim * cfg.d_model if cfg.output_proj else 0
    return (rows + keys + wout) * element_size


def make_runners(
    layer: UltraMemLayer, backends: tuple[str, ...] = BACKENDS
) -> dict[str, Callable[[Tensor], Tensor] | str]:
    """Backend name -> callable, or the reason it cannot run here (those in ``backends``)."""
    runners: dict[str, Callable[[Tensor], Tensor] | str] = {"eager": layer}
    try:
        runners["torch.compile"] = torch.compile(layer, dynamic=True)
    except Exception as exc:  # a missing compiler toolchain must not hide the other rows
        runners["torch.compile"] = f"torch.compile unavailable: {exc}"
    runners["fused-ops"] = FusedLookup(layer)
    return {name: runner for name, runner in runners.items() if name in backends}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = CONFIGS[args.config]
    device = args.device or bench.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--config {args.config} runs on CUDA; pass --device cpu to force it")
    budget = args.budget_s if args.budget_s is not None else bench.budget_s
    if args.dtype is not None:
        bench = dataclasses.replace(bench, dtype=DTYPES[args.dtype])
    if args.bandwidth_tbs == "measure":
        mbytes = COPY_MBYTES.get(torch.device(device).type, 64)
        bandwidth_tbs = copy_bandwidth_gbs(device, mbytes) / 1e3
        bandwidth_source = f"measured: copy of {mbytes} MiB on {device}, read + write"
    else:
        bandwidth_tbs, bandwidth_source = float(args.bandwidth_tbs), "given (--bandwidth-tbs)"
    cfg = bench.layer
    layer = UltraMemLayer(cfg, seed=0).eval().to(device=device, dtype=bench.dtype)
    layer32 = copy.deepcopy(layer).float()  # for the selection check (module docstring)
    runners = make_runners(layer, args.backends)
    gen = torch.Generator().manual_seed(0)
    element = torch.empty((), dtype=bench.dtype).element_size()
    rows: list[dict[str, Any]] = []
    report = {
        "schema": SCHEMA,
        "config": args.config,
        "layer": asdict(cfg),
        "dtype": str(bench.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "timer": "cuda events" if device == "cuda" else "perf_counter_ns",
        "bandwidth_tbs": bandwidth_tbs,
        "bandwidth_source": bandwidth_source,
        "complete": False,
        "rows": rows,
        "versions": versions(),
    }
    for tokens in args.tokens:
        x = torch.randn(1, tokens, cfg.d_model, generator=gen).to(device=device, dtype=bench.dtype)
        selection = check_selection(layer32, x, args.max_mismatch)
        floor = floor_bytes(cfg, tokens, element)
        floor_ms = floor / (bandwidth_tbs * 1e12) * 1e3
        eager_ms = None
        for name, runner in runners.items():
            row: dict[str, Any] = {"tokens": tokens, "backend": name, "floor_bytes": floor}
            row["floor_ms"] = floor_ms
            if isinstance(runner, str):
                rows.append({**row, "status": "unavailable", "reason": runner})
                continue
            if name == "fused-ops" and not selection["passed"]:
                rows.append({**row, "status": "wrong", "selection": selection})
                continue
            try:
                with torch.no_grad():
                    timing = measure(lambda r=runner, x=x: r(x), device, budget)
            except Exception as exc:  # report, keep timing the other backends
                rows.append({**row, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            if name == "eager":
                eager_ms = timing.p50
            row.update(
                status="ok",
                median_ms=timing.p50,
                p90_ms=timing.p90,
                reps=len(timing.samples_ms),
                speedup_vs_eager=eager_ms / timing.p50 if eager_ms else None,
                achieved_tbs=floor / (timing.p50 * 1e-3) / 1e12,
                fraction_of_floor=floor_ms / timing.p50,
            )
            if name == "fused-ops":
                row["selection"] = selection
            rows.append(row)
        # each token count's rows as they come, in the log and the JSON: a run stopped by a
        # time limit (a lent GPU's) keeps what it measured
        for row in rows[-len(runners) :]:
            median = f"{1e3 * row['median_ms']:.1f} µs" if "median_ms" in row else row["status"]
            print(f"tokens={tokens} {row['backend']}: {median}", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2))
    report["complete"] = True
    return report


def format_table(report: dict[str, Any]) -> str:
    head = ("tokens", "backend", "median µs", "speedup", "floor µs", "TB/s", "of floor", "note")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in report["rows"]:
        floor_us = f"{1e3 * r['floor_ms']:.2f}"
        if r["status"] != "ok":
            note = r.get("reason") or f"{r['status']}: {r.get('selection')}"
            cells = (r["tokens"], r["backend"], "-", "-", floor_us, "-", "-", note)
        else:
            speedup = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
            sel = r.get("selection")
            note = (
                f"selection ok: {sel['rows_with_other_slots']}/{sel['rows']} rows differ"
                if sel
                else ""
            )
            cells = (
                r["tokens"],
                r["backend"],
                f"{1e3 * r['median_ms']:.1f}",
                speedup,
                floor_us,
                f"{r['achieved_tbs']:.4f}",
                f"{100 * r['fraction_of_floor']:.2f}%",
                note,
            )
        lines.append(" | ".join(str(c) for c in cells))
    return "\n".join(lines)


def _bandwidth(text: str) -> float | str:
    if text == "measure":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TB/s or 'measure', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive bandwidth, got {text!r}")
    return value


def _backends(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown or no backends {text!r}; choose from {','.join(BACKENDS)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument(
        "--tokens",
        type=lambda s: [int(t) for t in s.split(",") if t],
        default=[1, 64, 4096],
        help="comma-separated token counts (default 1,64,4096)",
    )
    parser.add_argument(
        "--bandwidth-tbs",
        type=_bandwidth,
        default=3.35,
        help="memory bandwidth of the floor, TB/s (default 3.35: H100 SXM HBM3), or 'measure' "
        "for this device's copy bandwidth, measured in the same run",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="override the config's dtype (paper: bf16)"
    )
    parser.add_argument(
        "--backends",
        type=_backends,
        default=BACKENDS,
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all; a CPU smoke run "
        "may leave out torch.compile, whose compile costs most of its time)",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--device", help="override the config's device (cuda for paper)")
    parser.add_argument("--budget-s", type=float, help="timing budget per measurement")
    parser.add_argument(
        "--max-mismatch",
        type=float,
        default=1e-3,
        help="fraction of (token, head) rows allowed another slot set (near-ties; default 1e-3)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    print(
        f"{report['config']} layer, {report['dtype']} on {report['device']}, "
        f"floor at {report['bandwidth_tbs']:.4g} TB/s ({report['bandwidth_source']})"
    )
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
