"""scripts/branch_rates.py's replay of the retrieve kernel's short-key verdicts, held to the
kernel's own calls of its rare path (``_full_top``) under Triton's interpreter."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# the module: the package's attribute of that name is its launcher function
retrieve_triton = importlib.import_module("ultramem.kernels.retrieve_triton")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "branch_rates.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("branch_rates", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


branch_rates = _load()


def _inputs(kind: str, tokens: int, seed: int) -> tuple[Any, ...]:
    """Scores whose short keys often fail to settle the set: ``ties``, bf16 on a coarse
    grid (exact ties) for half the tokens, continuous for the rest; ``ulps``, fp32 scores
    within 64 ulps of one value (which bucket of 16 ulps an element falls in decides)."""
    gen = torch.Generator().manual_seed(seed)
    heads, n, rank, n_cores = 2, 16, 2, 2
    dtype = torch.bfloat16 if kind == "ties" else torch.float32

    def scores() -> torch.Tensor:
        if kind == "ties":
            coarse = torch.randint(-2, 3, (tokens // 2, heads, n, rank), generator=gen) / 2
            fine = torch.randn(tokens - tokens // 2, heads, n, rank, generator=gen)
            return torch.cat([coarse, fine]).to(dtype)
        base = torch.rand(tokens, heads, 1, rank, generator=gen) + 1.0  # ulp 2^-23
        steps = torch.randint(0, 64, (tokens, heads, n, rank), generator=gen)
        return base + steps * 2.0**-23

    weight = (
        torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        if kind == "ulps"
        else torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    )
    cores = torch.randint(-1, 2, (n_cores, heads, rank, rank), generator=gen).to(dtype)
    return scores(), scores(), weight.to(dtype), weight.flip(0).to(dtype), cores, 4, 4


def _counting(calls: list[int]) -> Callable[..., Any]:
    original = retrieve_triton._full_top

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[-1] += 1
        return original(*args, **kwargs)

    return call


@pytest.mark.parametrize("kind", ["ties", "ulps"])
def test_replay_matches_the_kernels_fallbacks_token_by_token(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    row, col, row_w, col_w, cores, topm, topk = _inputs(kind, tokens=8, seed=3)
    calls: list[int] = []
    monkeypatch.setattr(retrieve_triton, "_full_top", _counting(calls))
    for t in range(row.shape[0]):
        calls.append(0)
        retrieve_triton.retrieve_triton(row[t : t + 1], col[t : t + 1], row_w, col_w, cores,
                                        topm, topk)  # fmt: skip
    verdicts = branch_rates.stage_verdicts(row, col, row_w, col_w, cores, topm, topk)
    replayed = sum((~v).sum(-1) for v in verdicts.values()).tolist()  # per token
    assert calls == replayed
    assert 0 < sum(calls) < 3 * 2 * row.shape[0]  # both outcomes were exercised


def test_replay_matches_the_kernel_where_blocks_are_padded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """n = 12, m = 3, k = 5: every stage selects in a padded power-of-two block (16, 4, 8),
    the grid's padding columns included; a NaN and -0.0 among coarse scores."""
    gen = torch.Generator().manual_seed(5)
    tokens, heads, n, rank = 6, 2, 12, 2

    def scores() -> torch.Tensor:
        s = torch.randint(-2, 3, (tokens, heads, n, rank), generator=gen) / 2
        s[0, 0, 3, 0], s[1, 1, 7, 1], s[2, 0, 0, 0] = float("nan"), -0.0, float("nan")
        return s

    row, col = scores(), scores()
    weight = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    cores = torch.randint(-1, 2, (2, heads, rank, rank), generator=gen).float()
    calls: list[int] = []
    monkeypatch.setattr(retrieve_triton, "_full_top", _counting(calls))
    for t in range(tokens):
        calls.append(0)
        retrieve_triton.retrieve_triton(row[t : t + 1], col[t : t + 1], weight, weight.flip(0),
                                        cores, 3, 5)  # fmt: skip
    verdicts = branch_rates.stage_verdicts(row, col, weight, weight.flip(0), cores, 3, 5)
    assert calls == sum((~v).sum(-1) for v in verdicts.values()).tolist()
    assert 0 < sum(calls) < 3 * heads * tokens


def test_the_replayed_helper_is_the_kernels_rare_one() -> None:
    assert retrieve_triton.RARE_HELPERS == (branch_rates.HELPER,)


def test_rates_of_the_tiny_bench_config() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "tiny", "--tokens", "16"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["helper"] == "_full_top"
    assert report["stages"] == 3 * 16 * 2  # three stages per (token, head), 2 heads
    assert report["fallbacks"] == sum(report["by_stage"].values())
    assert report["rate"] == report["fallbacks"] / report["stages"]
