"""``exhaustive_grids_to_candidates``: a top-k over the whole n × n outer sum of two score
vectors (no candidate top-k; Memory+ fine-tuning code scores every slot) becomes a
product-key lookup with m = n, which the fusion then binds.

The reference is the model itself, in plain PyTorch: the rewritten graph must select the
same slots with the same scores, and the compiled program must fuse both parts and agree
with the model, selections compared; a grid whose sides broadcast along a leading dim is
no lookup the rewrite expresses and is left alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from ultramem.compiler.pipeline import compile_model
from ultramem.compiler.rewrite import op_counts
from ultramem.models.builtin import LoadedModel
from ultramem.passes.base import PassContext
from ultramem.passes.exhaustive_grids_to_candidates import exhaustive_grids_to_candidates
from ultramem.passes.lookups import find_lookups

N, D_KEY, DIM, K = 12, 8, 16, 5


class EveryPairScored(nn.Module):
    """Scores all N² slots as ``rows[:, :, None] + cols[:, None, :]`` and keeps the best K."""

    def __init__(self, columns_first: bool = False, shared_columns: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.query = nn.Linear(DIM, 2 * D_KEY)
        self.keys = nn.Parameter(torch.randn(2, N, D_KEY, generator=gen))
        self.values = nn.EmbeddingBag(N * N, DIM, mode="sum")
        self.columns_first = columns_first
        self.shared_columns = shared_columns
        with torch.no_grad():
            self.query.weight.copy_(torch.randn(2 * D_KEY, DIM, generator=gen) / 4)
            self.values.weight.copy_(torch.randn(N * N, DIM, generator=gen))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        q = self.query(x).reshape(batch * tokens, 2, D_KEY)
        rows = q[:, 0] @ self.keys[0].t()  # [bt, N]
        cols = q[:, 1] @ self.keys[1].t()
        if self.shared_columns:  # one column score vector for every token: broadcast
            cols = cols.mean(0, keepdim=True)
        if self.columns_first:
            grid = cols[:, None, :] + rows[:, :, None]
        else:
            grid = rows[:, :, None] + cols[:, None, :]
        scores, slots = grid.reshape(-1, N * N).topk(K, dim=-1)
        weights = scores.softmax(-1)
        out = self.values(slots, per_sample_weights=weights)
        return out.reshape(batch, tokens, DIM)


def _inputs(batch: int, tokens: int, seed: int = 0) -> tuple[Tensor]:
    return (torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed)),)


def _captured(model: nn.Module) -> torch.export.ExportedProgram:
    dims = ({0: Dim("batch", min=1), 1: Dim("tokens", min=2)},)
    return torch.export.export(model.eval(), _inputs(2, 5), dynamic_shapes=dims)


def _selection(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The weights and slots the model itself hands its embedding bag."""
    scores: list[tuple[Tensor, Tensor]] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        scores.append((kwargs["per_sample_weights"], args[0]))

    handle = model.values.register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return scores[0]


@pytest.mark.parametrize("columns_first", [False, True])
def test_the_rewritten_grid_selects_the_models_slots(columns_first: bool) -> None:
    model = EveryPairScored(columns_first=columns_first).eval()
    gm = _captured(model).module()
    lookups = find_lookups(gm.graph)
    assert len(lookups) == 1 and lookups[0].exhaustive and lookups[0].grid.n == N
    result = exhaustive_grids_to_candidates(gm, PassContext(_inputs(2, 5)))
    assert result.changed, result
    # now an ordinary product-key lookup: two candidate top-ks of N each behind the final
    (lookup,) = find_lookups(gm.graph)
    assert not lookup.exhaustive and len(lookup.candidates) == 2
    assert lookup.name == lookups[0].name  # parity and rollbacks name the lookup by it
    for batch, tokens, seed in ((1, 2, 1), (3, 7, 2)):
        (x,) = _inputs(batch, tokens, seed)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
        weights, slots = _selection(model, x)
        flat = x.reshape(-1, DIM)
        q = model.query(flat).reshape(-1, 2, D_KEY).detach()
        grid = (q[:, 0] @ model.keys[0].t().detach())[:, :, None] + (
            q[:, 1] @ model.keys[1].t().detach()
        )[:, None, :]
        # the slots the model selected hold the K best scores of the whole grid
        best = grid.reshape(-1, N * N).topk(K, dim=-1).values
        torch.testing.assert_close(grid.reshape(-1, N * N).gather(-1, slots), best)
        assert weights.shape == slots.shape


def test_a_model_scoring_every_pair_fuses_and_keeps_its_selections() -> None:
    model = EveryPairScored().eval()
    example = _inputs(2, 5)
    compiled = compile_model(LoadedModel(model, example, "every-pair", {}))
    table = compiled.layer_table
    assert table and all(e["fused"] == ["selection", "aggregation"] for e in table), table
    assert not compiled.rewrite.rolled_back, compiled.rewrite.rolled_back
    ops = op_counts(compiled.rewrite.program)
    assert ops["ultramem.retrieve"] == 1 and ops["ultramem.aggregate"] == 1, ops
    # the parity run compared the fused program's selections with the model's own
    parity = compiled.rewrite.parity
    selections = [c for stage in parity.stages for c in stage.selections]
    assert parity.passed and selections, parity
    assert sum(c.rows for c in selections) > 0 and not any(c.differing for c in selections)
    fused = compiled.rewrite.program.module()
    for batch, tokens in ((1, 1), (4, 3)):
        (x,) = _inputs(batch, tokens, batch + tokens)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_side_broadcast_along_the_tokens_is_left_alone() -> None:
    gm = _captured(EveryPairScored(shared_columns=True)).module()
    assert find_lookups(gm.graph) == []
    result = exhaustive_grids_to_candidates(gm, PassContext(_inputs(2, 5)))
    assert not result.changed and not result.matched
