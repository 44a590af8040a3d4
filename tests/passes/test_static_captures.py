"""Lookups in captures with static shapes, where sizes coincide and layouts are permuted.

A model whose code pins batch and tokens is captured with static shapes, so its graph
holds plain integers: a batch of 2 beside 2 heads (and a sequence of 16 beside 16 keys)
leaves the selection several readings. The one that also pools apart the heads must win,
or the aggregation stays unfused. And a fused selection returned in a permuted layout is
made contiguous again where the model's own tensor was, for the model's ``view``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.compiler.pipeline import compile_model
from ultramem.models.builtin import LoadedModel
from ultramem.tests.passes.foreign_models import PKMStyle


class ServingShapePKM(nn.Module):
    """A product-key memory behind a reshape to the one serving shape (batch 2, 16 tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = PKMStyle(embedding_bag=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.memory(x.view(2, 16, 32))


class HeadsFirstPKM(nn.Module):
    """Scores laid out heads first ([H, T, n]); the selected ids are viewed flat per head."""

    def __init__(self, dim: int = 32, heads: int = 2, n: int = 16, knn: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(21)
        self.heads, self.n, self.knn = heads, n, knn
        self.query = nn.Parameter(torch.randn(heads, dim, 2, 8, generator=gen) / dim**0.5)
        self.keys = nn.Parameter(torch.randn(heads, 2, n, 8, generator=gen))
        self.values = nn.Parameter(torch.randn(n * n, dim, generator=gen) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = torch.einsum("td,hdsk->hstk", x.reshape(b * t, d), self.query)
        s1 = torch.einsum("htk,hnk->htn", q[:, 0], self.keys[:, 0])
        s2 = torch.einsum("htk,hnk->htn", q[:, 1], self.keys[:, 1])
        v1, i1 = s1.topk(self.knn, dim=-1)
        v2, i2 = s2.topk(self.knn, dim=-1)
        grid = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
        ids = (i1.unsqueeze(-1) * self.n + i2.unsqueeze(-2)).flatten(-2)
        best, pick = grid.topk(self.knn, dim=-1)
        slots = ids.gather(-1, pick)  # [H, T, k], contiguous
        weights = F.softmax(best, dim=-1)
        flat = slots.view(self.heads, -1)  # the model's view needs it contiguous
        rows = self.values[flat].view(self.heads, b * t, self.knn, d)
        out = (rows * weights.unsqueeze(-1)).sum(dim=(0, 2))
        return out.view(b, t, d)


def _compiled(model: nn.Module, example: Tensor) -> tuple[nn.Module, list[dict]]:
    compiled = compile_model(LoadedModel(model.eval(), (example,), "static", {}))
    return compiled.rewrite.program.module(), compiled.layer_table


def test_two_heads_beside_a_batch_of_two_fuse_selection_and_aggregation() -> None:
    model = ServingShapePKM()
    example = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    fused, table = _compiled(model, example)
    assert table[0]["fused"] == ["selection", "aggregation"], table
    assert table[0]["selection"]["heads"] == 2, table
    with torch.no_grad():
        torch.testing.assert_close(fused(example), model(example), atol=1e-5, rtol=1e-5)


def test_a_heads_first_selection_is_contiguous_for_the_models_view() -> None:
    model = HeadsFirstPKM()
    example = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    fused, table = _compiled(model, example)
    assert "selection" in table[0]["fused"], table
    for shape in ((2, 5, 32), (1, 1, 32), (3, 7, 32)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
