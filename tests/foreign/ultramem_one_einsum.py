"""UltraMem written from the paper's equations: ONE einsum scores both sides of every head.

Source followed: "Ultra-Sparse Memory Network" (Huang et al., arXiv 2411.12364, §3 and
Eq. 7-16: TDQKR with a rank-r Tucker core, multi-core scoring, implicit value expansion) and
the authors' layout of https://github.com/ZihaoHuang-notabot/Ultra-Sparse-Memory-Network
(keys [heads, 2, n, Dk, r], cores summed for the rank-1 merge vectors, a global shuffle of
the virtual slots, `scatter_add_` pooling into E groups), re-derived as a compact module the
way a reader of the paper writes it:

- the query is [T, 2, Dk] (one half per side, RMSNorm'd), and ONE einsum
  `torch.einsum("tsd,hsndr->tshnr", q, keys)` gives both sides' rank-r scores at once;
- the rank-1 merge `einsum("thnr,hr->thn", ...)` with `u`, `v` buffers taken at build time
  from `torch.linalg.svd` of the summed cores;
- candidate rank-r scores picked with `gather` on an `expand`ed index, all M cores scored
  in one three-operand einsum `"thar,chrq,thbq->tchab"`, summed for selection, the per-core
  scores gathered back at the selected positions;
- virtual slot -> `shuffle` buffer -> physical row `j % R`, group `j // R`; value rows split
  into M chunks weighted by their core's score; `new_zeros(...).scatter_add_` into E groups;
  one output projection over the E groups side by side.

`sliced=True` is the same layer written with VIEWS of its parameters where the paper's
symbols are indexed: each side scores through a slice of the key parameter
(`einsum("...d,hndr->...hnr", q_row, self.keys[:, 0])`, `self.keys.select(1, 1)` for the
columns), the value table is stored transposed [Dv, R] and read as `self.values_t.t()`,
and the output projection is a bare [D, E·Dv] Parameter used through `F.linear`.

`paper_scale_layer()` (and `paper_scale_sliced_layer()`, written with views) builds this
layer at the paper's benchmark scale (not registered as a test case: too big for the CPU
suite); `paper_scale_inputs(batch, tokens)` makes its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._trained import (
    factory,
    fan_in,
    float_inputs,
    gains,
    near_identity,
    normal,
    permutation,
    seeded,
)


class TuckerProductKeyMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        n_keys: int,
        key_dim: int,
        value_dim: int,
        heads: int = 2,
        rank: int = 2,
        cores: int = 2,
        topm: int = 16,
        topk: int = 16,
        expand: int = 4,
        sliced: bool = False,
    ) -> None:
        super().__init__()
        assert (n_keys * n_keys) % expand == 0 and value_dim % cores == 0
        self.dim, self.n, self.dk, self.dv = dim, n_keys, key_dim, value_dim
        self.h, self.r, self.c, self.m, self.k, self.e = heads, rank, cores, topm, topk, expand
        self.rows = n_keys * n_keys // expand
        self.sliced = sliced

        self.q_proj = nn.Linear(dim, 2 * key_dim, bias=False)
        self.q_norm = nn.RMSNorm(key_dim, eps=1e-6)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim, rank))
        self.tucker_cores = nn.Parameter(torch.empty(cores, heads, rank, rank))
        self.register_buffer("u", torch.zeros(heads, rank))
        self.register_buffer("v", torch.zeros(heads, rank))
        self.register_buffer("shuffle", torch.arange(n_keys * n_keys))
        if sliced:
            self.values_t = nn.Parameter(torch.empty(value_dim, self.rows))
            self.w_out = nn.Parameter(torch.empty(dim, expand * value_dim))
        else:
            self.values = nn.Parameter(torch.empty(self.rows, value_dim))
            self.out_proj = nn.Linear(expand * value_dim, dim, bias=False)

    @torch.no_grad()
    def refresh_tucker(self) -> None:
        """u, v: leading singular vectors of the summed cores (Eq. 9), one pair per head."""
        summed = self.tucker_cores.sum(0)  # [h, r, r]
        U, _, Vh = torch.linalg.svd(summed)
        self.u.copy_(U[:, :, 0])
        self.v.copy_(Vh[:, 0, :])

    def side_scores(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.sliced:
            scores = torch.einsum("tsd,hsndr->tshnr", q, self.keys)  # [t, 2, h, n, r]
            return scores[:, 0], scores[:, 1]
        q_row, q_col = q[:, 0], q[:, 1]
        s_row = torch.einsum("...d,hndr->...hnr", q_row, self.keys[:, 0])
        s_col = torch.einsum("...d,hndr->...hnr", q_col, self.keys.select(1, 1))
        return s_row, s_col

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        x = x.reshape(-1, D)
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, 2, self.dk))  # [t, 2, dk]

        s_row, s_col = self.side_scores(q)  # [t, h, n, r] each
        a_row = torch.einsum("thnr,hr->thn", s_row, self.u)
        a_col = torch.einsum("thnr,hr->thn", s_col, self.v)
        _, i_row = a_row.topk(self.m, dim=-1)  # [t, h, m]
        _, i_col = a_col.topk(self.m, dim=-1)

        r_sel = s_row.gather(2, i_row.unsqueeze(-1).expand(-1, -1, -1, self.r))  # [t, h, m, r]
        c_sel = s_col.gather(2, i_col.unsqueeze(-1).expand(-1, -1, -1, self.r))
        grid = torch.einsum("thar,chrq,thbq->tchab", r_sel, self.tucker_cores, c_sel)
        grid = grid.flatten(-2)  # [t, c, h, m*m]

        _, pos = grid.sum(1).topk(self.k, dim=-1)  # [t, h, k]
        core_scores = grid.gather(-1, pos.unsqueeze(1).expand(-1, self.c, -1, -1))  # [t, c, h, k]
        slot = i_row.gather(-1, pos // self.m) * self.n + i_col.gather(-1, pos % self.m)

        j = self.shuffle[slot]  # virtual slot -> shuffled id
        row, group = j % self.rows, j // self.rows
        table = self.values_t.t() if self.sliced else self.values
        vals = F.embedding(row, table).view(t, self.h, self.k, self.c, self.dv // self.c)
        weighted = vals * core_scores.permute(0, 2, 3, 1).unsqueeze(-1)
        weighted = weighted.reshape(t, self.h * self.k, self.dv)

        pooled = x.new_zeros(t, self.e, self.dv)
        pooled.scatter_add_(1, group.reshape(t, -1, 1).expand(-1, -1, self.dv), weighted)
        pooled = pooled.reshape(t, self.e * self.dv)
        out = F.linear(pooled, self.w_out) if self.sliced else self.out_proj(pooled)
        return out.view(B, L, D)


def _trained_memory(mem: TuckerProductKeyMemory, g: torch.Generator) -> TuckerProductKeyMemory:
    with torch.no_grad():
        mem.q_proj.weight.copy_(fan_in(g, *mem.q_proj.weight.shape))
        mem.q_norm.weight.copy_(gains(g, mem.dk))
        mem.keys.copy_(normal(g, *mem.keys.shape, std=1 / math.sqrt(mem.dk)))
        mem.tucker_cores.copy_(near_identity(g, mem.c, mem.h, rank=mem.r, noise=0.5))
        mem.shuffle.copy_(permutation(g, mem.n * mem.n))
        values = normal(g, mem.rows, mem.dv, std=0.5)
        w_out = fan_in(g, mem.dim, mem.e * mem.dv)
        if mem.sliced:
            mem.values_t.copy_(values.t())
            mem.w_out.copy_(w_out)
        else:
            mem.values.copy_(values)
            mem.out_proj.weight.copy_(w_out)
    mem.refresh_tucker()
    return mem


class PreNormResidual(nn.Module):
    def __init__(self, dim: int, memory: TuckerProductKeyMemory) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.memory(self.norm(x))


def _block(dim: int, mem: TuckerProductKeyMemory, g: torch.Generator) -> nn.Module:
    block = PreNormResidual(dim, _trained_memory(mem, g))
    with torch.no_grad():
        block.norm.weight.copy_(gains(g, dim))
        block.norm.bias.copy_(normal(g, dim, std=0.05))
    return block.eval()


# D 64, 2 heads, 32 x 32 keys (1,024 virtual slots, E 4 -> 256 rows), Dk 32, r 2, 2 cores,
# m = k = 8, Dv 32 (2 chunks of 16)
one_einsum_inputs = float_inputs(64, seed=778)


@factory
def ultramem_one_einsum() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    mem = TuckerProductKeyMemory(64, 32, 32, 32, heads=2, rank=2, cores=2, topm=8, topk=8, expand=4)
    return _block(64, mem, seeded(771)), one_einsum_inputs(2, 16)


# D 48, 2 heads, 24 x 24 keys (576 virtual slots, E 4 -> 144 rows), Dk 24, r 2, 2 cores,
# m 10, k 6, Dv 24 (2 chunks of 12)
sliced_inputs = float_inputs(48, seed=772)


@factory
def ultramem_sliced_views() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    mem = TuckerProductKeyMemory(
        48, 24, 24, 24, heads=2, rank=2, cores=2, topm=10, topk=6, expand=4, sliced=True
    )
    return _block(48, mem, seeded(772)), sliced_inputs(2, 16)


# ---- paper scale (benchmarks only) -------------------------------------------------------
#: D 1024, 2 heads, 512 x 512 keys = 262,144 virtual slots (the paper: 1024² = 1M; 512 keeps
#: the value table at 16.8 M floats), E 4 -> 65,536 rows of Dv 256, Dk 128, r 2, 2 cores,
#: m = k = 32
PAPER_DIM = 1024
paper_scale_inputs = float_inputs(PAPER_DIM, seed=779)


@factory
def paper_scale_layer() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The one-einsum layer at paper scale, fp32, eval mode; example inputs (2, 16, 1024)."""
    mem = TuckerProductKeyMemory(
        PAPER_DIM, 512, 128, 256, heads=2, rank=2, cores=2, topm=32, topk=32, expand=4
    )
    return _block(PAPER_DIM, mem, seeded(779)), paper_scale_inputs(2, 16)


@factory
def paper_scale_sliced_layer() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The same paper-scale layer written with views of its parameters (``sliced=True``):
    each side scores through a slice of the key parameter, the value table is read through
    a transpose, the output projection is a bare parameter; example inputs (2, 16, 1024)."""
    mem = TuckerProductKeyMemory(
        PAPER_DIM, 512, 128, 256, heads=2, rank=2, cores=2, topm=32, topk=32, expand=4,
        sliced=True,
    )  # fmt: skip
    return _block(PAPER_DIM, mem, seeded(779)), paper_scale_inputs(2, 16)
