"""The reference UltraMem layer in plain PyTorch: the semantic source of truth.

Written the way the authors' training code computes it (docs/ultramem.md, V1): a query split
into row and column halves, Tucker-decomposed query-key retrieval (TDQKR) with the rank-1
SVD merge choosing m row and m column candidates, grid scores over the m × m candidates
with the full Tucker core, top-k over the grid, multi-core scoring (each core weights one
chunk of the value row) and implicit value expansion (a fixed shuffle maps virtual slots
to a physical row and an expansion group, pooled by scatter-add, then one projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UltraMemConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    return nn.Identity()


def leading_singular_vectors(cores: Tensor) -> tuple[Tensor, Tensor]:
    """``u, v`` [H, r]: leading left/right singular vectors of the summed cores [M, H, r, r]."""
    left, _, right_t = torch.linalg.svd(cores.sum(0))
    return left[..., 0], right_t[..., 0, :]


class UltraMemLayer(nn.Module):
    """One memory layer: ``x [B, L, D] -> out [B, L, D]``."""

    def __init__(self, cfg: UltraMemConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        d, dk, h, r = cfg.d_model, cfg.key_dim, cfg.heads, cfg.tucker_rank
        self.query_conv = (
            nn.Conv1d(d, d, cfg.query_conv, groups=d, padding=cfg.query_conv - 1)
            if cfg.query_conv
            else None
        )
        self.query = nn.Linear(d, 2 * dk, bias=False)
        self.query_norm = _make_norm(cfg.query_norm, dk)
        self.keys = nn.Parameter(torch.randn(h, 2, cfg.n_keys, dk, r, generator=gen) / dk**0.5)
        core = torch.zeros(cfg.cores, h, r, r)
        core[..., 0, 0] = 1.0  # start near rank 1, as the paper's auxiliary loss keeps it
        core += 0.1 * torch.randn(cfg.cores, h, r, r, generator=gen)
        self.cores = nn.Parameter(core)
        self.values = nn.Parameter(
            torch.randn(cfg.value_rows, cfg.value_dim, generator=gen) / cfg.value_dim**0.5
        )
        self.out_proj = (
            nn.Linear(cfg.expansion * cfg.value_dim, d, bias=False) if cfg.output_proj else None
        )
        slots = cfg.n_keys**2
        shuffle = (
            torch.randperm(slots, generator=gen)
            if cfg.slot_mapping == "shuffle"
            else torch.arange(slots)
        )
        self.register_buffer("shuffle", shuffle)
        u, v = leading_singular_vectors(self.cores.detach())
        self.register_buffer("row_weight", u.clone())
        self.register_buffer("col_weight", v.clone())

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute the rank-1 buffers from the cores (the authors do this during training)."""
        u, v = leading_singular_vectors(self.cores)
        self.row_weight.copy_(u)
        self.col_weight.copy_(v)

    def rank1(self) -> tuple[Tensor, Tensor]:
        if self.cfg.rank1_from_svd_in_forward:
            return leading_singular_vectors(self.cores)
        return self.row_weight, self.col_weight

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        batch, seq, _ = x.shape
        if self.query_conv is not None:
            # causal: pad both sides, keep the first `seq` outputs
            x_q = self.query_conv(x.transpose(1, 2))[..., :seq].transpose(1, 2)
        else:
            x_q = x
        q = self.query(x_q).view(batch * seq, 2, cfg.key_dim)
        q = self.query_norm(q)
        keys = F.normalize(self.keys, dim=3) if cfg.key_norm else self.keys

        # TDQKR: per head and side, scores of every key under each Tucker rank
        s_row = torch.einsum("td,hndr->thnr", q[:, 0], keys[:, 0])
        s_col = torch.einsum("td,hndr->thnr", q[:, 1], keys[:, 1])
        u, v = self.rank1()
        a_row = torch.einsum("thnr,hr->thn", s_row, u)
        a_col = torch.einsum("thnr,hr->thn", s_col, v)
        _, i_row = a_row.topk(cfg.topm, dim=-1)
        _, i_col = a_col.topk(cfg.topm, dim=-1)

        r = cfg.tucker_rank
        c_row = s_row.gather(2, i_row.unsqueeze(-1).expand(-1, -1, -1, r))
        c_col = s_col.gather(2, i_col.unsqueeze(-1).expand(-1, -1, -1, r))
        grid = torch.einsum("thar,chrs,thbs->tchab", c_row, self.cores, c_col)
        grid = grid.reshape(batch * seq, cfg.cores, cfg.heads, cfg.topm * cfg.topm)
        _, pos = grid.sum(1).topk(cfg.topk, dim=-1)  # [T, H, k]
        slot = i_row.gather(2, pos // cfg.topm) * cfg.n_keys + i_col.gather(2, pos % cfg.topm)
        scores = grid.gather(3, pos.unsqueeze(1).expand(-1, cfg.cores, -1, -1))
        scores = scores.permute(0, 2, 3, 1)  # [T, H, k, M]
        if cfg.score_activation == "relu":
            scores = scores.relu()
        elif cfg.score_activation == "softmax":
            scores = scores.softmax(dim=2)

        # implicit value expansion: virtual slot -> physical row and expansion group
        virtual = self.shuffle[slot]
        row = virtual % cfg.value_rows
        group = virtual // cfg.value_rows
        tokens = batch * seq
        vals = self.values[row].view(tokens, cfg.heads, cfg.topk, cfg.cores, -1)
        weighted = (vals * scores.unsqueeze(-1)).reshape(tokens, cfg.heads * cfg.topk, -1)
        pooled = weighted.new_zeros(tokens, cfg.expansion, cfg.value_dim)
        index = group.reshape(tokens, -1, 1).expand(-1, -1, cfg.value_dim)
        pooled = pooled.scatter_add(1, index, weighted)
        out = pooled.reshape(batch, seq, cfg.expansion * cfg.value_dim)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out
