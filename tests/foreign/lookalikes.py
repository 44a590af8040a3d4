"""Modules that look like a memory lookup but whose maths is NOT an UltraMem/PKM lookup.

Each has the anchors a pattern matcher looks for — product keys, candidate `topk`s on
row and column scores, a final `topk`, a weight table read at selected slots, a pooled
sum — and changes one part (or both) so no `retrieve` + `aggregate` pair reproduces it.
A compiler must leave them unfused (or refuse them when it checks its hypothesis).

- `DiagonalPairMemory` (selection): the final top-k ranks only the m DIAGONAL pairs
  (the a-th best row with the a-th best column), never the m × m grid;
- `MaxGridMemory` (selection): the grid is scored with `max(r, c) + 0.25 · min(r, c)`,
  which is neither additive nor bilinear in the two sides (plain `max(r, c)` would make
  exact ties along every row and column, so it is softened);
- `UnweightedMixMemory` (aggregation): PKM selection exactly, but the selected rows are
  mixed non-linearly ROW BY ROW (`tanh(V[slot] · W)`) and averaged, ignoring the scores;
- `MaxPooledMemory` (aggregation): PKM selection and score weights, but the weighted
  rows are max-pooled instead of summed;
- `ConcatTopkOfTopks` (both): a top-k over the CONCATENATION of two candidate top-ks of
  unrelated tensors (a key score and a per-token feature magnitude), reading one of two
  different tables depending on which half was chosen.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


class _ProductKeys(nn.Module):
    """Shared front end: a query per head and side, and the per-side key scores."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int) -> None:
        super().__init__()
        self.heads, self.n_keys, self.k_dim = heads, n_keys, k_dim
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, heads * 2 * k_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim))

    def side_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.query(self.norm(x)).view(b, t, self.heads, 2, self.k_dim)
        s = torch.einsum("bthsd,hsnd->bthsn", q, self.keys)
        return s[..., 0, :], s[..., 1, :]  # [b, t, h, n] each

    def retrain(self, g: torch.Generator) -> None:
        with torch.no_grad():
            self.norm.weight.copy_(gains(g, self.norm.weight.shape[0]))
            self.norm.bias.copy_(normal(g, *self.norm.bias.shape, std=0.05))
            self.query.weight.copy_(fan_in(g, *self.query.weight.shape))
            self.keys.copy_(normal(g, *self.keys.shape, std=1 / math.sqrt(self.k_dim)))


class DiagonalPairMemory(nn.Module):
    """Selection differs: top-k over the m diagonal pairs (row a with column a)."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int, m: int, k: int) -> None:
        super().__init__()
        self.pk = _ProductKeys(dim, heads, n_keys, k_dim)
        self.m, self.k, self.n_keys = m, k, n_keys
        self.values = nn.Embedding(n_keys * n_keys, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.pk.side_scores(x)
        r_top, r_idx = rows.topk(self.m, dim=-1)
        c_top, c_idx = cols.topk(self.m, dim=-1)
        pair_scores = r_top + c_top  # [b, t, h, m]: only the diagonal of the grid
        pair_slots = r_idx * self.n_keys + c_idx
        best, pos = pair_scores.topk(self.k, dim=-1)
        slots = pair_slots.gather(-1, pos)
        w = best.softmax(dim=-1)
        return x + (w.unsqueeze(-1) * self.values(slots)).sum(dim=(-3, -2))


class MaxGridMemory(nn.Module):
    """Selection differs: the m × m grid scored with max(r, c) + 0.25 · min(r, c)."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int, m: int, k: int) -> None:
        super().__init__()
        self.pk = _ProductKeys(dim, heads, n_keys, k_dim)
        self.m, self.k, self.n_keys = m, k, n_keys
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.pk.side_scores(x)
        r_top, r_idx = rows.topk(self.m, dim=-1)
        c_top, c_idx = cols.topk(self.m, dim=-1)
        r, c = r_top.unsqueeze(-1), c_top.unsqueeze(-2)
        grid = (torch.maximum(r, c) + 0.25 * torch.minimum(r, c)).flatten(-2)
        slots = (r_idx.unsqueeze(-1) * self.n_keys + c_idx.unsqueeze(-2)).flatten(-2)
        best, pos = grid.topk(self.k, dim=-1)
        chosen = slots.gather(-1, pos)
        w = torch.relu(best)
        return x + torch.einsum("bthk,bthkd->btd", w, self.values[chosen])


class _PKMSelect(nn.Module):
    """Exact PKM selection (additive grid), returning slot ids and softmax weights."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int, knn: int) -> None:
        super().__init__()
        self.pk = _ProductKeys(dim, heads, n_keys, k_dim)
        self.knn, self.n_keys = knn, n_keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = self.pk.side_scores(x)
        r_top, r_idx = rows.topk(self.knn, dim=-1)
        c_top, c_idx = cols.topk(self.knn, dim=-1)
        grid = (r_top.unsqueeze(-1) + c_top.unsqueeze(-2)).flatten(-2)
        slots = (r_idx.unsqueeze(-1) * self.n_keys + c_idx.unsqueeze(-2)).flatten(-2)
        best, pos = grid.topk(self.knn, dim=-1)
        return slots.gather(-1, pos), best.softmax(dim=-1)


class UnweightedMixMemory(nn.Module):
    """Aggregation differs: rows mixed non-linearly one by one and averaged, scores unused."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int, knn: int, dv: int) -> None:
        super().__init__()
        self.select = _PKMSelect(dim, heads, n_keys, k_dim, knn)
        self.values = nn.Embedding(n_keys * n_keys, dv)
        self.mix = nn.Linear(dv, dv)
        self.out = nn.Linear(dv, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, _weights = self.select(x)  # the scores are computed, then ignored
        rows = torch.tanh(self.mix(self.values(slots)))  # [b, t, h, k, dv]
        return x + self.out(rows.mean(dim=(-3, -2)))


class MaxPooledMemory(nn.Module):
    """Aggregation differs: score-weighted rows max-pooled over heads and slots."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int, knn: int) -> None:
        super().__init__()
        self.select = _PKMSelect(dim, heads, n_keys, k_dim, knn)
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, weights = self.select(x)
        b, t, h, k = slots.shape
        weighted = weights.unsqueeze(-1) * self.values[slots]  # [b, t, h, k, dim]
        return x + weighted.reshape(b, t, h * k, -1).amax(dim=-2)


class ConcatTopkOfTopks(nn.Module):
    """Both differ: final top-k over [key top-m ‖ feature top-m], two tables by position."""

    def __init__(self, dim: int, n_keys: int, m: int, k: int) -> None:
        super().__init__()
        self.m, self.k = m, k
        self.query = nn.Linear(dim, dim, bias=False)
        self.keys = nn.Parameter(torch.empty(n_keys, dim))
        self.feature_scale = nn.Parameter(torch.empty(dim))
        self.key_values = nn.Parameter(torch.empty(n_keys, dim))
        self.feature_values = nn.Parameter(torch.empty(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key_scores = self.query(x) @ self.keys.t() / math.sqrt(x.shape[-1])  # [b, t, n]
        feature_scores = (x * self.feature_scale).abs()  # [b, t, dim]: unrelated to the keys
        k_top, k_idx = key_scores.topk(self.m, dim=-1)
        f_top, f_idx = feature_scores.topk(self.m, dim=-1)
        both = torch.cat([k_top, f_top], dim=-1)  # [b, t, 2m], not a grid
        best, pos = both.topk(self.k, dim=-1)
        from_keys = pos < self.m
        key_rows = self.key_values[k_idx.gather(-1, pos.clamp(max=self.m - 1))]
        feat_rows = self.feature_values[f_idx.gather(-1, (pos - self.m).clamp(min=0))]
        rows = torch.where(from_keys.unsqueeze(-1), key_rows, feat_rows)
        w = best.softmax(dim=-1)
        return x + (w.unsqueeze(-1) * rows).sum(dim=-2)


def _retrain(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _ProductKeys):
                module.retrain(g)
        skip = {
            id(p) for m in model.modules() if isinstance(m, _ProductKeys) for p in m.parameters()
        }
        for name, p in model.named_parameters():
            if id(p) in skip:
                continue
            if name.endswith("bias"):
                p.copy_(normal(g, *p.shape, std=0.1))
            elif name in ("keys",):
                p.copy_(normal(g, *p.shape))
            elif name == "feature_scale":
                p.copy_(gains(g, p.shape[0], spread=0.5))
            elif "values" in name:
                p.copy_(normal(g, *p.shape, std=0.5))
            else:
                p.copy_(fan_in(g, *p.shape))


def _build(model: nn.Module, seed: int) -> nn.Module:
    _retrain(model, seeded(seed))
    return model.eval()


# all: D 64; product keys 2 heads × 32 × 32, k_dim 16, m 8, k 8 unless stated
diagonal_inputs = float_inputs(64, seed=901)


@factory
def lookalike_diagonal_topk() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Final top-4 over the 8 diagonal pairs only."""
    model = _build(DiagonalPairMemory(64, heads=2, n_keys=32, k_dim=16, m=8, k=4), 901)
    return model, diagonal_inputs(2, 16)


max_grid_inputs = float_inputs(64, seed=902)


@factory
def lookalike_max_grid() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Grid scored max(r, c) + 0.25 min(r, c), ReLU weights."""
    model = _build(MaxGridMemory(64, heads=2, n_keys=32, k_dim=16, m=8, k=8), 909)
    return model, max_grid_inputs(2, 16)


unweighted_inputs = float_inputs(64, seed=903)


@factory
def lookalike_unweighted_mix() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """PKM selection; rows through tanh(V W + b) one by one, averaged (Dv 32)."""
    model = _build(UnweightedMixMemory(64, heads=2, n_keys=32, k_dim=16, knn=8, dv=32), 912)
    return model, unweighted_inputs(2, 16)


max_pooled_inputs = float_inputs(64, seed=904)


@factory
def lookalike_max_pooled() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """PKM selection and softmax weights; weighted rows max-pooled."""
    model = _build(MaxPooledMemory(64, heads=2, n_keys=32, k_dim=16, knn=8), 904)
    return model, max_pooled_inputs(2, 16)


concat_inputs = float_inputs(64, seed=905)


@factory
def lookalike_concat_topk_of_topks() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Top-6 of [top-8 of 48 key scores ‖ top-8 of 64 feature magnitudes]."""
    model = _build(ConcatTopkOfTopks(64, n_keys=48, m=8, k=6), 905)
    return model, concat_inputs(2, 16)
