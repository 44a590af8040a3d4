"""Memory layers written the way other authors write them, independently of ``ultramem.models``.

Each is a plain ``nn.Module`` ``x [B, L, D] -> [B, L, D]`` with random weights from a fixed
seed, and each carries its author's habits (docs/ultramem.md, "Where implementations differ"),
so that ``fuse_memory_lookup`` is tested on what real graphs look like rather than on the
reference layer it was written next to:

- ``AuthorsV1Loops``: the authors' V1 maths written with Python loops over heads and
  ranks into a preallocated tensor (``matmul(out=...)`` and slice assignment), ``torch.svd``
  of the summed cores in ``forward``, a hand-written RMSNorm, global shuffle + mod/div IVE,
  E=4, chunked multi-core scoring, scatter-add pooling, no activation, output projection.
- ``PyPIStyle``: einsum everywhere, separate row/column keys, each core selecting its own
  top-k (heads' outputs concatenated), ReLU, ``F.embedding``, ``idx // E``/``idx % E``,
  ``scatter_`` pooling (last writer wins), E=2, a key norm computed and never used.
- ``BmmStyle``: a query per head, causal depthwise conv, LayerNorm, ``torch.bmm`` scoring,
  softmax over the k selected, one value table per core (chunked MCS), E=1.
- ``PKMStyle``: Lample et al.'s product keys: additive row + column scores over the top-k
  values, softmax, one table shared by all heads, ``embedding_bag`` or gather + sum.
- ``TinyMemoryLM``: three of the above inside a small causal transformer.

Negative cases: ``LookalikeLayer`` (a clean lookup, plus variants whose semantics differ
from the fused ops), ``PlainBlock`` and ``TopkRouterBlock`` (no memory layer at all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AuthorsV1Loops(nn.Module):
    """Authors' V1: H=2 key heads, M=2 cores, r=2, n=16, m=8, k=6, E=4, R=64, Dv=32."""

    def __init__(self, dim: int = 48, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.m_cores, self.r, self.n, self.dk = 2, 2, 2, 16, 16
        self.topm, self.topk, self.e, self.dv = 8, 6, 4, 32
        self.rows = self.n * self.n // self.e
        self.wq = nn.Linear(dim, 2 * self.dk, bias=False)
        self.q_gain = nn.Parameter(1 + 0.1 * torch.randn(2, self.dk))
        self.keys = nn.ParameterList(
            nn.Parameter(torch.randn(2, self.r, self.n, self.dk) / self.dk**0.5)
            for _ in range(self.h)
        )
        self.cores = nn.Parameter(torch.randn(self.h, self.m_cores, self.r, self.r))
        self.register_buffer("shuffle", torch.randperm(self.n * self.n))
        self.values = nn.Parameter(torch.randn(self.rows, self.dv))
        self.wout = nn.Linear(self.e * self.dv, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        H, M, r, n, m, k = self.h, self.m_cores, self.r, self.n, self.topm, self.topk
        q = self.wq(x).view(B, L, 2, self.dk)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.q_gain
        # S[side, b, l, h, i, p]: written slice by slice, the way the authors' loops do
        S = x.new_zeros(2, B, L, H, n, r)
        for h in range(H):
            for p in range(r):
                torch.matmul(q[:, :, 0], self.keys[h][0, p].t(), out=S[0, :, :, h, :, p])
                S[1, :, :, h, :, p] = torch.matmul(q[:, :, 1], self.keys[h][1, p].t())
        us, vs = [], []
        for h in range(H):
            U, _, V = torch.svd(self.cores[h].sum(0))  # torch.svd returns V, not V^T
            us.append(U[:, 0])
            vs.append(V[:, 0])
        u, v = torch.stack(us), torch.stack(vs)  # [H, r]
        a_row = torch.matmul(S[0], u.unsqueeze(-1)).squeeze(-1)  # [B, L, H, n]
        a_col = torch.matmul(S[1], v.unsqueeze(-1)).squeeze(-1)
        i_row = a_row.topk(m, dim=-1).indices
        i_col = a_col.topk(m, dim=-1).indices
        c_row = torch.gather(S[0], 3, i_row.unsqueeze(-1).expand(-1, -1, -1, -1, r))
        c_col = torch.gather(S[1], 3, i_col.unsqueeze(-1).expand(-1, -1, -1, -1, r))
        grid = c_row.unsqueeze(3) @ self.cores @ c_col.unsqueeze(3).transpose(-1, -2)
        grid = grid.flatten(-2)  # [B, L, H, M, m*m]
        pos = grid.sum(3).topk(k, dim=-1).indices  # [B, L, H, k]
        slot = i_row.gather(-1, pos // m) * n + i_col.gather(-1, pos % m)
        s = grid.gather(-1, pos.unsqueeze(3).expand(-1, -1, -1, M, -1))  # [B, L, H, M, k]
        virtual = self.shuffle[slot]
        row, group = virtual % self.rows, virtual // self.rows
        vals = self.values[row].view(B, L, H, k, M, self.dv // M)
        weighted = (vals * s.transpose(-1, -2).unsqueeze(-1)).view(B, L, H * k, self.dv)
        index = group.view(B, L, H * k, 1).expand(-1, -1, -1, self.dv)
        pooled = x.new_zeros(B, L, self.e, self.dv).scatter_add(2, index, weighted)
        return self.wout(pooled.view(B, L, self.e * self.dv))


class PyPIStyle(nn.Module):
    """PyPI ``ultra-mem``: 2 cores as heads, r=2, n=16, topk=6, E=2, R=128, Dv=16."""

    def __init__(self, dim: int = 32, seed: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.rank, self.num_keys, self.topk, self.e, dk, dv = 2, 2, 16, 6, 2, 16, 16
        self.prenorm = nn.RMSNorm(dim)
        self.to_queries = nn.Linear(dim, dk, bias=False)
        self.query_ln = nn.LayerNorm(dk, bias=False)
        self.key_ln = nn.LayerNorm(dk, bias=False)
        self.row_keys = nn.Parameter(torch.randn(self.rank, self.num_keys, dk) * 0.3)
        self.col_keys = nn.Parameter(torch.randn(self.rank, self.num_keys, dk) * 0.3)
        self.core = nn.Parameter(torch.randn(self.heads, self.rank, self.rank))
        self.memories = nn.Parameter(torch.randn(self.num_keys**2 // self.e, dv))
        self.value_expansion_proj = nn.Parameter(torch.randn(self.e, dv, dv) * 0.3)
        self.combine_values_to_out = nn.Linear(self.heads * dv, dim, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.prenorm(tokens)
        u, _, t = torch.svd(self.core)
        u_vec, t_vec = u[..., 0], t[..., 0]
        queries = self.query_ln(self.to_queries(tokens))
        row_keys = self.key_ln(self.row_keys)  # noqa: F841  (normalised, then never used)
        row_scores = torch.einsum("bnd,rmd->bnmr", queries, self.row_keys)
        col_scores = torch.einsum("bnd,rmd->bnmr", queries, self.col_keys)
        merged_row = torch.einsum("bnmr,hr->hbnm", row_scores, u_vec)
        merged_col = torch.einsum("bnmr,hr->hbnm", col_scores, t_vec)
        top_row = merged_row.topk(self.topk, dim=-1).indices  # [h, b, n, i]
        top_col = merged_col.topk(self.topk, dim=-1).indices
        indices = (top_row.unsqueeze(-1) * self.num_keys + top_col.unsqueeze(-2)).flatten(-2)
        h = self.heads
        rows = row_scores.unsqueeze(0).expand(h, -1, -1, -1, -1)
        cols = col_scores.unsqueeze(0).expand(h, -1, -1, -1, -1)
        f_row = rows.gather(-2, top_row.unsqueeze(-1).expand(-1, -1, -1, -1, self.rank))
        f_col = cols.gather(-2, top_col.unsqueeze(-1).expand(-1, -1, -1, -1, self.rank))
        scores = torch.einsum("hbnir,hbnjs,hrs->hbnij", f_row, f_col, self.core).flatten(-2)
        final_scores, top_pos = scores.topk(self.topk, dim=-1)
        final_indices = indices.gather(-1, top_pos)
        final_scores = F.relu(final_scores)
        memories = F.embedding(final_indices // self.e, self.memories)  # [h, b, n, k, d]
        expert = (final_indices % self.e).unsqueeze(-1).expand_as(memories)
        shape = list(expert.shape)
        shape[-2] = self.e
        scaled = memories * final_scores.unsqueeze(-1)
        pooled = tokens.new_zeros(shape).scatter_(-2, expert, scaled)
        aggregated = torch.einsum("hbnid,ide->hbne", pooled, self.value_expansion_proj)
        concatted = aggregated.permute(1, 2, 0, 3).flatten(-2)
        return self.combine_values_to_out(concatted)


class BmmStyle(nn.Module):
    """bmm-heavy: H=2 heads (own queries), M=2 cores, r=2, n=16, m=k=6, E=1, Dv=2×16."""

    def __init__(self, dim: int = 32, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.m_cores, self.r, self.n, self.dk, self.m, self.k = 2, 2, 2, 16, 16, 6, 6
        self.conv = nn.Conv1d(dim, dim, 3, groups=dim)
        self.wq = nn.Linear(dim, self.h * 2 * self.dk)
        self.q_norm = nn.LayerNorm(self.dk)
        self.keys = nn.Parameter(torch.randn(self.h * 2, self.dk, self.n * self.r) / 4)
        cores = torch.randn(self.m_cores, self.h, self.r, self.r)
        self.cores = nn.Parameter(cores)
        left, _, right_t = torch.linalg.svd(cores.sum(0))
        self.register_buffer("u", left[..., 0].clone())  # [H, r], kept as buffers
        self.register_buffer("v", right_t[..., 0, :].clone())
        self.tables = nn.ParameterList(
            nn.Parameter(torch.randn(self.n * self.n, 16)) for _ in range(self.m_cores)
        )
        self.wout = nn.Linear(16 * self.m_cores, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        H, M, r, n, m, k = self.h, self.m_cores, self.r, self.n, self.m, self.k
        xc = self.conv(F.pad(x.transpose(1, 2), (2, 0))).transpose(1, 2)  # causal depthwise
        q = self.q_norm(self.wq(xc).view(B * L, H * 2, self.dk))
        s = torch.bmm(q.permute(1, 0, 2), self.keys)  # [H*2, T, n*r]
        s = s.view(H, 2, B * L, n, r)
        s_row, s_col = s[:, 0], s[:, 1]  # [H, T, n, r]
        a_row = torch.bmm(s_row.reshape(H, -1, r), self.u.unsqueeze(-1)).view(H, B * L, n)
        a_col = torch.bmm(s_col.reshape(H, -1, r), self.v.unsqueeze(-1)).view(H, B * L, n)
        i_row, i_col = a_row.topk(m, dim=-1)[1], a_col.topk(m, dim=-1)[1]  # [H, T, m]
        c_row = s_row.gather(2, i_row.unsqueeze(-1).expand(-1, -1, -1, r))
        c_col = s_col.gather(2, i_col.unsqueeze(-1).expand(-1, -1, -1, r))
        grids = []
        for c in range(M):
            proj = torch.bmm(c_row.reshape(H, -1, r), self.cores[c]).view(-1, m, r)
            grids.append(torch.bmm(proj, c_col.reshape(-1, m, r).permute(0, 2, 1)))
        grid = torch.stack(grids).view(M, H, B * L, m * m)
        pos = grid.sum(0).topk(k, dim=-1)[1]  # [H, T, k]
        slot = i_row.gather(2, pos // m) * n + i_col.gather(2, pos % m)
        w = grid.gather(3, pos.unsqueeze(0).expand(M, -1, -1, -1)).softmax(dim=-1)
        outs = []
        for c in range(M):
            rows = self.tables[c].index_select(0, slot.reshape(-1)).view(H, B * L, k, -1)
            outs.append((w[c].unsqueeze(-1) * rows).sum(dim=2).sum(dim=0))  # [T, 16]
        return self.wout(torch.cat(outs, dim=-1)).view(B, L, D)


class PKMStyle(nn.Module):
    """Product keys: H=2 heads, n=16, Dk=2×16, knn=6, additive scores, softmax, R=256, Dv=D."""

    def __init__(self, dim: int = 32, embedding_bag: bool = True, seed: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.n_keys, self.k_dim, self.knn = 2, 16, 32, 6
        self.embedding_bag = embedding_bag
        self.query_proj = nn.Sequential(
            nn.Linear(dim, self.heads * self.k_dim), nn.BatchNorm1d(self.heads * self.k_dim)
        )
        self.query_proj[1].running_mean.normal_()
        self.query_proj[1].running_var.uniform_(0.5, 2.0)
        self.keys = nn.Parameter(torch.randn(self.heads, 2, self.n_keys, self.k_dim // 2))
        self.values = nn.Parameter(torch.randn(self.n_keys**2, dim) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        prefix, dim = x.shape[:-1], x.shape[-1]
        h, n, knn, half = self.heads, self.n_keys, self.knn, self.k_dim // 2
        query = self.query_proj(x.reshape(-1, dim)).view(-1, h, self.k_dim)
        q1, q2 = query[..., :half], query[..., half:]
        scores1 = torch.einsum("thd,hnd->thn", q1, self.keys[:, 0])
        scores2 = torch.einsum("thd,hnd->thn", q2, self.keys[:, 1])
        scores1, indices1 = scores1.topk(knn, dim=-1)  # [T, h, knn]
        scores2, indices2 = scores2.topk(knn, dim=-1)
        all_scores = (scores1.unsqueeze(-1) + scores2.unsqueeze(-2)).view(-1, h, knn * knn)
        all_indices = (indices1.unsqueeze(-1) * n + indices2.unsqueeze(-2)).view(-1, h, knn * knn)
        scores, best = all_scores.topk(knn, dim=-1)
        indices = all_indices.gather(-1, best)
        scores = F.softmax(scores.float(), dim=-1).type_as(scores)
        indices, scores = indices.view(-1, h * knn), scores.view(-1, h * knn)
        if self.embedding_bag:
            out = F.embedding_bag(indices, self.values, mode="sum", per_sample_weights=scores)
        else:
            out = (self.values[indices] * scores.unsqueeze(-1)).sum(1)
        return out.view(*prefix, dim)


class _Block(nn.Module):
    """Pre-norm causal attention + MLP; a memory layer reads the block's input and its
    output joins the residual one block later (skip-layer placement)."""

    def __init__(self, dim: int, memory: nn.Module | None) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln_mem = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.memory = memory

    def forward(self, x: Tensor, pending: Tensor | None) -> tuple[Tensor, Tensor | None]:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, D))
        mem = self.memory(self.ln_mem(x)) if self.memory is not None else None
        x = x + self.mlp(self.ln2(x))
        if pending is not None:
            x = x + pending
        return x, mem


class TinyMemoryLM(nn.Module):
    """Token ids [B, L] -> logits; memory layers of three authors in three blocks."""

    def __init__(self, vocab: int = 64, dim: int = 32, seed: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        memories = [AuthorsV1Loops(dim, seed=11), BmmStyle(dim, seed=12), PKMStyle(dim, False, 13)]
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(_Block(dim, mem) for mem in [*memories, None])
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x, pending = self.embed(ids), None
        for block in self.blocks:
            x, pending = block(x, pending)
        return self.head(self.ln_f(x))


class LookalikeLayer(nn.Module):
    """One head, r=2, n=16, m=k=6, E=1 lookup; ``variant`` changes what it computes.

    ``plain``: a lookup the fused ops cover (the control for the negatives below).
    ``squared``: values weighted by score² · ``diagonal``: the final top-k runs over the m
    diagonal grid entries only · ``mean``: values averaged, the scores ignored.
    """

    VARIANTS = ("plain", "squared", "diagonal", "mean")

    def __init__(self, variant: str, dim: int = 32, seed: int = 6) -> None:
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        torch.manual_seed(seed)
        self.variant, self.n, self.m, self.k = variant, 16, 6, 6
        self.wq = nn.Linear(dim, 32, bias=False)
        self.keys = nn.Parameter(torch.randn(2, 16, 16, 2) / 4)  # [side, n, Dk, r]
        self.core = nn.Parameter(torch.randn(2, 2))
        self.u, self.v = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.values = nn.Parameter(torch.randn(256, 24))
        self.wout = nn.Linear(24, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, m, k = self.n, self.m, self.k
        q = self.wq(x).unflatten(-1, (2, 16))
        s_row = torch.einsum("bld,ndr->blnr", q[..., 0, :], self.keys[0])
        s_col = torch.einsum("bld,ndr->blnr", q[..., 1, :], self.keys[1])
        i_row = (s_row @ self.u).topk(m, dim=-1).indices  # [B, L, m]
        i_col = (s_col @ self.v).topk(m, dim=-1).indices
        c_row = s_row.gather(2, i_row.unsqueeze(-1).expand(-1, -1, -1, 2))
        c_col = s_col.gather(2, i_col.unsqueeze(-1).expand(-1, -1, -1, 2))
        grid = c_row @ self.core @ c_col.transpose(-1, -2)  # [B, L, m, m]
        if self.variant == "diagonal":
            scores, pos = grid.diagonal(dim1=-2, dim2=-1).topk(k, dim=-1)
            slot = i_row.gather(-1, pos) * n + i_col.gather(-1, pos)
        else:
            scores, pos = grid.flatten(-2).topk(k, dim=-1)
            slot = i_row.gather(-1, pos // m) * n + i_col.gather(-1, pos % m)
        rows = self.values[slot]  # [B, L, k, Dv]
        if self.variant == "mean":
            return self.wout(rows.mean(-2))
        weights = scores.pow(2) if self.variant == "squared" else scores
        return self.wout((weights.unsqueeze(-1) * rows).sum(-2))


class PlainBlock(nn.Module):
    """No memory layer: a norm, an MLP and a residual."""

    def __init__(self, dim: int = 32, seed: int = 7) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.SiLU(), nn.Linear(64, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.ln(x))


class TopkRouterBlock(nn.Module):
    """No memory layer, but a top-2 expert router with a gather: one top-k, not three."""

    def __init__(self, dim: int = 32, experts: int = 4, seed: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.Parameter(torch.randn(experts, dim, dim) / dim**0.5)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.router(x)
        weights, chosen = logits.topk(2, dim=-1)
        weights = weights.softmax(-1)
        all_out = torch.einsum("bld,edf->blef", x, self.experts)  # [B, L, E, D]
        idx = chosen.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
        picked = all_out.gather(2, idx)
        return x + (weights.unsqueeze(-1) * picked).sum(2)
