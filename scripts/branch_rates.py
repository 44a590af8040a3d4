"""How often ``_retrieve_kernel`` takes its rare path on the benchmark's own inputs.

    python scripts/branch_rates.py --config paper --tokens 1024

Each of the kernel's three selection stages (row candidates, column candidates, the grid)
selects on int32 *short* keys and falls back to full int64 keys (``_full_top``, named in
``kernels/retrieve_triton.py``'s ``RARE_HELPERS``) when an element left out shares the high
bits of the edge (``_short_top``). This replays that decision in PyTorch on the scores the
kernel computes, in its arithmetic: the rank-1 merge with each product rounded, the Tucker
grid as fma chains (each fma evaluated in float64, where an fp32 product is exact, then
rounded once to fp32; a double rounding could differ from the kernel's in the last bit, and
only at a near-tie of near-ties). ``tests/scripts/test_branch_rates.py`` holds the replay to
the kernel's own calls of ``_full_top`` under Triton's interpreter, on inputs full of ties.
(The interpreter itself is too slow here: about 1.5 s a stage at the paper's sizes.)

The inputs are drawn as the bench draws its own (``scripts/bench_lookup.py``'s
``FusedLookup`` on the config's layer, ``torch.randn`` inputs of its width, its dtype), on
the CPU, with every generator seeded, so a run gives the same rate every time. Prints JSON:
``{"helper", "config", "tokens", "dtype", "stages", "fallbacks", "rate", "by_stage": {"row",
"col", "grid"}}``; ``scripts/kernel_report.py`` counts ``_full_top``'s instructions at
``rate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT32_MIN = -(2**31)
HELPER = "_full_top"  # the rare path replayed here (retrieve_triton.RARE_HELPERS)


def score_keys(x: Tensor) -> Tensor:
    """``_score_key``: int32 keys ordered as the fp32 scores, NaN above +inf, -0.0 as 0.0."""
    x = torch.where(x == 0, torch.zeros_like(x), x)
    bits = x.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.where(x.isnan(), torch.full_like(key, 0x7FFFFFFF), key)


def short_keys_settle(key: Tensor, count: int, block: int, top: int) -> Tensor:
    """``_short_top``'s verdict per row of ``key`` [..., valid]: the top ``count`` of the
    short keys (the low bits of a ``block``-wide index space replaced by the inverted
    index; padding up to ``block`` at INT32_MIN) are the exact set."""
    low = block - 1
    valid = key.shape[-1]
    pad = torch.full((*key.shape[:-1], block - valid), INT32_MIN, dtype=torch.int32)
    padded = torch.cat([key, pad], dim=-1)
    index = torch.arange(block, dtype=torch.int32)
    short = (padded & ~low) | (low - index)
    edge = short.topk(top, dim=-1).values[..., count - 1 : count]
    high = key & ~low
    tied = (high >= (edge & ~low)).sum(-1)
    return tied == count


def _fma(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return (x.double() * y.double() + z.double()).float()


def _tucker(row: Tensor, col: Tensor, core: Tensor) -> Tensor:
    """``_tucker``: Σ_q (Σ_p row_p · C[p, q]) · col_q, each sum an fma chain from the first
    product. row [..., A, r], col [..., B, r], core [..., r, r] -> [..., A, B]."""
    rank = row.shape[-1]

    def projected(q: int) -> Tensor:  # [..., A, 1]
        proj = row[..., 0] * core[..., 0, q, None]
        for p in range(1, rank):
            proj = _fma(row[..., p], core[..., p, q, None], proj)
        return proj[..., :, None]

    out = projected(0) * col[..., None, :, 0]
    for q in range(1, rank):
        out = _fma(projected(q), col[..., None, :, q], out)
    return out


def stage_verdicts(
    row_scores: Tensor,
    col_scores: Tensor,
    row_weight: Tensor,
    col_weight: Tensor,
    cores: Tensor,
    topm: int,
    topk: int,
) -> dict[str, Tensor]:
    """Per (token, head) and stage, whether the short keys settle the set (no fallback)."""
    from ultramem.kernels.retrieve import stable_topk
    from ultramem.kernels.retrieve_triton import retrieve_launch_config

    _, heads, n, rank = row_scores.shape
    # the kernel's own blocks, as its launcher picks them
    blocks = retrieve_launch_config(heads, n, rank, cores.shape[0], topm, topk, "none")
    block_n, block_m, block_k = (blocks.constexprs[b] for b in ("BLOCK_N", "BLOCK_M", "BLOCK_K"))
    verdicts, candidates = {}, {}
    for side, scores, weight in (("row", row_scores, row_weight), ("col", col_scores, col_weight)):
        s, w = scores.float(), weight.float()
        merged = s[..., 0] * w[None, :, None, 0]
        for p in range(1, s.shape[-1]):
            merged = merged + s[..., p] * w[None, :, None, p]
        verdicts[side] = short_keys_settle(score_keys(merged), topm, block_n, block_m)
        _, order = stable_topk(merged, topm)
        candidates[side] = s.gather(2, order[..., None].expand(-1, -1, -1, s.shape[-1]))
    total = None
    for c in range(cores.shape[0]):
        grid = _tucker(candidates["row"], candidates["col"], cores[c].float()[None])
        total = grid if total is None else total + grid
    assert total is not None
    # the kernel's grid is block_m wide: position a * block_m + b, padding where b >= m
    wide = torch.full((*total.shape[:-1], block_m), float("nan"))
    wide[..., :topm] = total
    keys = score_keys(wide)
    keys[..., topm:] = INT32_MIN
    flat = keys.reshape(*keys.shape[:-2], topm * block_m)
    verdicts["grid"] = short_keys_settle(flat, topk, block_m * block_m, block_k)
    return verdicts


def measure(config: str, tokens: int, dtype: torch.dtype | None) -> dict[str, Any]:
    import bench_lookup

    from ultramem.models.ultramem import UltraMemLayer

    bench = bench_lookup.CONFIGS[config]
    dtype = dtype or bench.dtype
    cfg = bench.layer
    torch.manual_seed(0)  # the layer's nn.Linear weights draw from the global generator
    layer = UltraMemLayer(cfg, seed=0).eval().to(dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, cfg.d_model, generator=gen).to(dtype)
    fused = bench_lookup.FusedLookup(layer)
    first = _FirstRetrieve()
    with torch.no_grad(), first, contextlib.suppress(_Stop):
        fused.slots_and_pooled(x)
    if first.args is None:
        raise ValueError("the bench's fused path never called ultramem::retrieve")
    row_scores, col_scores, row_weight, col_weight, cores, topm, topk = first.args[:7]
    verdicts = stage_verdicts(row_scores, col_scores, row_weight, col_weight, cores, topm, topk)
    by_stage = {name: int((~v).sum()) for name, v in verdicts.items()}
    stages = sum(v.numel() for v in verdicts.values())
    fallbacks = sum(by_stage.values())
    return {
        "helper": HELPER,
        "config": config,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "stages": stages,
        "fallbacks": fallbacks,
        "rate": fallbacks / stages,
        "by_stage": by_stage,
    }


class _Stop(Exception):
    pass


class _FirstRetrieve(TorchDispatchMode):
    """Keeps the arguments of the first ``ultramem::retrieve`` call and stops the path."""

    def __init__(self) -> None:
        super().__init__()
        self.args: tuple[Any, ...] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.ultramem.retrieve.default:
            self.args = tuple(args) + tuple((kwargs or {}).values())
            raise _Stop
        return func(*args, **(kwargs or {}))


def main(argv: Sequence[str] | None = None) -> int:
    import bench_lookup

    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive token count")
        return int(text)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", choices=sorted(bench_lookup.CONFIGS))
    parser.add_argument("--tokens", type=positive, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the config's")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.config, args.tokens, DTYPES.get(args.dtype or ""))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
