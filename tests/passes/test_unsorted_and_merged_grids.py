"""Two ways of writing a product-key selection that are not the fused op's by default.

- ``topk(..., sorted=False)`` everywhere (Csordas's PKM): an unsorted top-k promises its
  entries in no order, so the sorted order the fused op returns is one it may return; it
  fuses, and the outputs (order-free sums) agree with the model.
- one final top-k over the candidate grids of two heads concatenated (a top-k across
  heads): ``ultramem::retrieve`` selects per head, so the lookup is left as written, with
  that reason in the pass's refusals and the compile progress.

The reference is the module itself in plain PyTorch.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ultramem.compiler.pipeline import compile_model
from ultramem.compiler.rewrite import op_counts
from ultramem.models.builtin import LoadedModel

N, M, K, D_KEY, DIM = 16, 4, 4, 8, 24


class ProductKeys(nn.Module):
    """Product-key memory with ``heads`` heads; ``merged``: one top-k over all heads' grids."""

    def __init__(self, heads: int, merged: bool = False, unsorted: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(heads + 2 * merged)
        self.heads, self.merged, self.sorted = heads, merged, not unsorted
        self.query = nn.Linear(DIM, heads * 2 * D_KEY)
        self.keys = nn.Parameter(torch.randn(heads, 2, N, D_KEY, generator=gen))
        self.values = nn.Parameter(torch.randn(N * N, DIM, generator=gen))
        with torch.no_grad():
            self.query.weight.copy_(torch.randn(heads * 2 * D_KEY, DIM, generator=gen) / 3)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        q = self.query(x).reshape(-1, self.heads, 2, D_KEY)
        grids, ids = [], []
        for h in range(self.heads):
            s1 = q[:, h, 0] @ self.keys[h, 0].t()
            s2 = q[:, h, 1] @ self.keys[h, 1].t()
            v1, i1 = s1.topk(M, dim=-1, sorted=self.sorted)
            v2, i2 = s2.topk(M, dim=-1, sorted=self.sorted)
            grids.append((v1[:, :, None] + v2[:, None, :]).reshape(-1, M * M))
            ids.append((i1[:, :, None] * N + i2[:, None, :]).reshape(-1, M * M))
        if self.merged:
            scores, at = torch.cat(grids, -1).topk(K, dim=-1, sorted=self.sorted)
            chosen = [torch.cat(ids, -1).gather(-1, at)]
            weights = [scores.softmax(-1)]
        else:
            chosen, weights = [], []
            for grid, slot in zip(grids, ids, strict=True):
                scores, at = grid.topk(K, dim=-1, sorted=self.sorted)
                chosen.append(slot.gather(-1, at))
                weights.append(scores.softmax(-1))
        out = sum(
            (self.values[c] * w[..., None]).sum(-2) for c, w in zip(chosen, weights, strict=True)
        )
        return out.reshape(*lead, DIM)


def _inputs(batch: int, tokens: int, seed: int = 0) -> tuple[Tensor]:
    return (torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed)),)


def _compile(model: nn.Module, progress: list[str] | None = None):
    lines = progress if progress is not None else []
    return compile_model(LoadedModel(model.eval(), _inputs(2, 5), "pkm", {}), lines.append)


@pytest.mark.parametrize("heads", [1, 2])
def test_an_unsorted_selection_fuses_and_agrees(heads: int) -> None:
    model = ProductKeys(heads, unsorted=True)
    compiled = _compile(model)
    table = compiled.layer_table
    assert len(table) == heads and all(e["fused"] == ["selection", "aggregation"] for e in table)
    assert op_counts(compiled.rewrite.program)["ultramem.retrieve"] == heads
    assert compiled.rewrite.parity.passed and not compiled.rewrite.rolled_back
    fused = compiled.rewrite.program.module()
    for batch, tokens in ((1, 1), (3, 4)):
        (x,) = _inputs(batch, tokens, batch * tokens)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_top_k_across_heads_is_left_with_its_reason() -> None:
    model = ProductKeys(2, merged=True)
    progress: list[str] = []
    compiled = _compile(model, progress)
    ops = op_counts(compiled.rewrite.program)
    assert "ultramem.retrieve" not in ops and "ultramem.aggregate" not in ops, ops
    refusals = [r.reason for r in compiled.rewrite.fusion.refused]
    assert any("ranks the candidate grids of 2 selections together" in r for r in refusals)
    assert any(line.startswith("not a lookup the ops express: ") for line in progress), progress
    assert compiled.rewrite.parity.passed
    (x,) = _inputs(2, 3, 7)
    with torch.no_grad():
        torch.testing.assert_close(compiled.rewrite.program.module()(x), model(x))
