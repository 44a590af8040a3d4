"""Small lookups the binder refuses at a known rule, and one it fuses, as
``package.module:factory`` models for ``ultramem inspect`` (each returns the model and an
example input).

- ``max_grid``: a real selection (two candidate top-ks, a grid top-k) whose grid is the
  *max* of a row's and a column's score: neither a Tucker nor an additive grid, so every
  hypothesis reaches the proof and fails there (``output_proof``).
- ``returns_positions``: the model returns the final top-k's grid positions themselves,
  which no view of the op's outputs gives (``selection_outputs``, the first rule).
- ``topk_then_mean``: an additive selection whose rows are averaged with no weights: the
  selection fuses, the aggregation reaches its proof and fails (``aggregation_proof``).
- ``fused_layer``: the reference layer, small: both parts fuse.
"""

from __future__ import annotations

import torch
from torch import nn

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


class _TwoSided(nn.Module):
    """A query split into row and column halves, scored against 16 keys per side."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = nn.Linear(16, 32)
        self.keys = nn.Parameter(torch.randn(2, 16, 16, generator=g))
        self.values = nn.Parameter(torch.randn(256, 16, generator=g))

    def candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.q(x).unflatten(-1, (2, 16))
        s_row = torch.einsum("bld,nd->bln", q[..., 0, :], self.keys[0])
        s_col = torch.einsum("bld,nd->bln", q[..., 1, :], self.keys[1])
        r, i_row = s_row.topk(4, dim=-1)
        c, i_col = s_col.topk(4, dim=-1)
        return r, i_row, c, i_col

    def slots(self, i_row: torch.Tensor, i_col: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return i_row.gather(-1, pos // 4) * 16 + i_col.gather(-1, pos % 4)


class MaxGrid(_TwoSided):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, i_row, c, i_col = self.candidates(x)
        grid = torch.maximum(r.unsqueeze(-1), c.unsqueeze(-2))
        scores, pos = grid.flatten(-2).topk(4, dim=-1)
        slot = self.slots(i_row, i_col, pos)
        return (self.values[slot] * scores.softmax(-1).unsqueeze(-1)).sum(-2)


class ReturnsPositions(_TwoSided):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, i_row, c, i_col = self.candidates(x)
        scores, pos = (r.unsqueeze(-1) + c.unsqueeze(-2)).flatten(-2).topk(4, dim=-1)
        slot = self.slots(i_row, i_col, pos)
        return (self.values[slot] * scores.softmax(-1).unsqueeze(-1)).sum(-2), pos


class TopkThenMean(_TwoSided):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, i_row, c, i_col = self.candidates(x)
        _, pos = (r.unsqueeze(-1) + c.unsqueeze(-2)).flatten(-2).topk(4, dim=-1)
        return self.values[self.slots(i_row, i_col, pos)].mean(-2)


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)),)


def max_grid() -> Example:
    return MaxGrid().eval(), _example()


def returns_positions() -> Example:
    return ReturnsPositions().eval(), _example()


def topk_then_mean() -> Example:
    return TopkThenMean().eval(), _example()


def fused_layer() -> Example:
    from ultramem.models.config import UltraMemConfig
    from ultramem.models.ultramem import UltraMemLayer

    torch.manual_seed(0)
    cfg = UltraMemConfig(d_model=32, n_keys=8, key_dim=16, value_dim=32, topm=4, topk=4)
    return UltraMemLayer(cfg).eval(), (torch.randn(2, 8, 32),)
