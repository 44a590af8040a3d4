"""Thirteen memory layers and look-alikes written blind, as a check of generality.

Written on 2026-12-01 by a helper session that was forbidden to read ``passes/``,
``compiler/`` or the rest of ``tests/``: from the maths of docs/ultramem.md and its own idea of how
people write these layers. Its first run found four bugs (a sigmoid on the selected
scores, ``take_along_dim`` for the score gather, heads as the last dim, column-major slot
ids mis-read by parity), since fixed; the models are kept as written, apart from building
under ``torch.random.fork_rng`` (the registry's rule: the global RNG is left untouched) and
one example redrawn away from a near-tie.

Ten memory layers (``m01``-``m10``) in ten styles, and three top-k models that are no
product-key lookup (``x01``-``x03``). ``MODELS``: name -> factory() -> (model, example).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _randn(*shape, scale=1.0):
    return nn.Parameter(torch.randn(*shape) * scale)


# ---------------------------------------------------------------------------
# 1. Compact PKM: stacked key tensor [2, n, dk], one batched matmul for both halves,
#    flatten batch*seq first, gather on candidate indices, softmax, F.embedding,
#    einsum '...k,...kd->...d'. No output projection (value dim == model dim).
# ---------------------------------------------------------------------------
class StackedKeyPKM(nn.Module):
    def __init__(self, d=64, dk=32, n=32, m=8, k=8):
        super().__init__()
        self.dk, self.n, self.m, self.k = dk, n, m, k
        self.wq = nn.Linear(d, 2 * dk, bias=False)
        with torch.no_grad():
            self.wq.weight.copy_(torch.randn(2 * dk, d) / math.sqrt(d))
        self.keys = _randn(2, n, dk, scale=1 / math.sqrt(dk))
        self.values = _randn(n * n, d, scale=0.3)

    def forward(self, x):
        B, L, D = x.shape
        h = x.reshape(B * L, D)
        q = self.wq(h).view(-1, 2, self.dk).transpose(0, 1)  # [2, T, dk]
        s = torch.bmm(q, self.keys.transpose(1, 2))  # [2, T, n]
        sv, si = s.topk(self.m, dim=-1)
        grid = sv[0].unsqueeze(-1) + sv[1].unsqueeze(-2)  # [T, m, m]
        gv, gi = grid.flatten(1).topk(self.k, dim=-1)
        r = si[0].gather(1, gi // self.m)
        c = si[1].gather(1, gi % self.m)
        ids = r * self.n + c
        w = gv.softmax(-1)
        vals = F.embedding(ids, self.values)  # [T, k, D]
        out = torch.einsum("...k,...kd->...d", w, vals)
        return out.view(B, L, D)


# ---------------------------------------------------------------------------
# 2. Verbose PKM keeping [B, L] leading dims throughout; keys stored transposed
#    [dk, n] as two separate parameters; LayerNorm per query half; scores scaled by
#    1/sqrt(dk) before top-k; column-major slot ids row + col*n built for all m*m
#    candidates up front and picked with torch.take_along_dim; plain indexing of
#    the value table; broadcast-multiply-sum; Linear out with bias.
# ---------------------------------------------------------------------------
class ColumnMajorPKM(nn.Module):
    def __init__(self, d_model=96, key_dim=32, num_keys=48, topm=10, topk=12, value_dim=64):
        super().__init__()
        self.num_keys, self.topm, self.topk = num_keys, topm, topk
        self.scale = 1.0 / math.sqrt(key_dim)
        self.query = nn.Linear(d_model, 2 * key_dim)
        self.norm_r = nn.LayerNorm(key_dim)
        self.norm_c = nn.LayerNorm(key_dim)
        self.keys_row_t = nn.Parameter(torch.randn(key_dim, num_keys))
        self.keys_col_t = nn.Parameter(torch.randn(key_dim, num_keys))
        self.values = nn.Parameter(torch.randn(num_keys * num_keys, value_dim) * 0.5)
        self.out = nn.Linear(value_dim, d_model)
        with torch.no_grad():
            self.norm_r.weight.uniform_(0.5, 1.5)
            self.norm_r.bias.normal_(0, 0.1)
            self.norm_c.weight.uniform_(0.5, 1.5)
            self.norm_c.bias.normal_(0, 0.1)

    def forward(self, x):
        batch, length, _ = x.shape
        n, m, k = self.num_keys, self.topm, self.topk
        q = self.query(x)
        q_r, q_c = q.chunk(2, dim=-1)
        q_r = self.norm_r(q_r)
        q_c = self.norm_c(q_c)
        s_r = torch.matmul(q_r, self.keys_row_t) * self.scale  # [B, L, n]
        s_c = torch.matmul(q_c, self.keys_col_t) * self.scale
        top_r, idx_r = torch.topk(s_r, m, dim=-1)
        top_c, idx_c = torch.topk(s_c, m, dim=-1)
        cand_scores = (top_r[..., :, None] + top_c[..., None, :]).reshape(batch, length, m * m)
        cand_ids = (idx_r[..., :, None] + idx_c[..., None, :] * n).reshape(batch, length, m * m)
        best, pos = torch.topk(cand_scores, k, dim=-1)
        ids = torch.take_along_dim(cand_ids, pos, dim=-1)
        weights = F.softmax(best, dim=-1)
        v = self.values[ids]  # [B, L, k, Dv]
        mixed = (weights.unsqueeze(-1) * v).sum(dim=-2)
        return self.out(mixed)


# ---------------------------------------------------------------------------
# 3. UltraMem V1 Tucker scoring, r = 2, one core, written with explicit mm/bmm;
#    keys [2, n, dk, r] L2-normalised inside forward; u, v from torch.linalg.svd of
#    the core inside forward; ReLU scores; index_select; weighted sum with bmm.
# ---------------------------------------------------------------------------
class TuckerBmmMemory(nn.Module):
    def __init__(self, D=64, dk=32, n=32, r=2, m=8, k=8, Dv=64):
        super().__init__()
        self.D, self.dk, self.n, self.r, self.m, self.k, self.Dv = D, dk, n, r, m, k, Dv
        self.wq = nn.Linear(D, 2 * dk, bias=False)
        self.keys = nn.Parameter(torch.randn(2, n, dk, r))
        self.core = nn.Parameter(torch.randn(r, r) + 2.0 * torch.eye(r))
        self.values = nn.Parameter(torch.randn(n * n, Dv) * 0.2)
        self.wout = nn.Linear(Dv, D, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        T = B * L
        dk, n, r, m, k = self.dk, self.n, self.r, self.m, self.k
        x2 = x.reshape(T, self.D)
        q = self.wq(x2).view(T, 2, dk)
        q = F.layer_norm(q, (dk,))
        K = F.normalize(self.keys, dim=2)  # [2, n, dk, r]
        Kr = K[0].permute(1, 0, 2).reshape(dk, n * r)
        Kc = K[1].permute(1, 0, 2).reshape(dk, n * r)
        S_row = torch.mm(q[:, 0], Kr).view(T, n, r)
        S_col = torch.mm(q[:, 1], Kc).view(T, n, r)
        U, _, Vh = torch.linalg.svd(self.core)
        u = U[:, 0]
        v = Vh[0]
        a_row = torch.matmul(S_row, u)  # [T, n]
        a_col = torch.matmul(S_col, v)
        _, I_row = a_row.topk(m, dim=1)
        _, I_col = a_col.topk(m, dim=1)
        Sr = torch.gather(S_row, 1, I_row.unsqueeze(-1).expand(T, m, r))  # [T, m, r]
        Sc = torch.gather(S_col, 1, I_col.unsqueeze(-1).expand(T, m, r))
        G = torch.bmm(torch.bmm(Sr, self.core.expand(T, r, r)), Sc.transpose(1, 2))  # [T, m, m]
        sc, pos = G.reshape(T, m * m).topk(k, dim=1)
        slot = I_row.gather(1, pos // m) * n + I_col.gather(1, pos % m)
        w = F.relu(sc)
        vals = self.values.index_select(0, slot.reshape(-1)).view(T, k, self.Dv)
        pooled = torch.bmm(w.unsqueeze(1), vals).squeeze(1)  # [T, Dv]
        return self.wout(pooled).view(B, L, self.D)


# ---------------------------------------------------------------------------
# 4. Multi-head PKM, each head with its own value table stored as one [H, R, Dv]
#    parameter; Python loop over heads; F.embedding on values[h]; torch.div floor /
#    remainder; heads' outputs concatenated then projected.
# ---------------------------------------------------------------------------
class PerHeadTablePKM(nn.Module):
    def __init__(self, d=64, heads=2, dk=16, n=32, m=8, k=8, dv=32):
        super().__init__()
        self.heads, self.dk, self.n, self.m, self.k = heads, dk, n, m, k
        self.wq = nn.Linear(d, heads * 2 * dk)
        self.keys = _randn(heads, 2, n, dk, scale=0.5)
        self.values = _randn(heads, n * n, dv, scale=0.4)
        self.proj = nn.Linear(heads * dv, d)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.heads, 2, self.dk)
        outs = []
        for h in range(self.heads):
            sr = q[:, :, h, 0] @ self.keys[h, 0].t()  # [B, L, n]
            sc = q[:, :, h, 1] @ self.keys[h, 1].t()
            vr, ir = sr.topk(self.m)
            vc, ic = sc.topk(self.m)
            g = (vr.unsqueeze(-1) + vc.unsqueeze(-2)).flatten(-2)
            gv, gp = g.topk(self.k)
            row = torch.gather(ir, -1, torch.div(gp, self.m, rounding_mode="floor"))
            col = torch.gather(ic, -1, torch.remainder(gp, self.m))
            slot = row * self.n + col
            p = torch.softmax(gv, -1)
            v = F.embedding(slot, self.values[h])  # [B, L, k, dv]
            outs.append(torch.einsum("blk,blkd->bld", p, v))
        return self.proj(torch.cat(outs, dim=-1))


# ---------------------------------------------------------------------------
# 5. Tiny transformer (token ids in, logits out): pre-LN block with causal SDPA
#    attention and a PKM (2 heads, BatchNorm'd queries in eval mode, scaled scores,
#    index_select, weighted sum by bmm) replacing the FFN, residual + LayerNorm.
# ---------------------------------------------------------------------------
class _BlockPKM(nn.Module):
    def __init__(self, d, heads=2, half=32, n=40, knn=12):
        super().__init__()
        self.h, self.half, self.n, self.knn = heads, half, n, knn
        self.q_proj = nn.Linear(d, heads * 2 * half, bias=False)
        self.q_bn = nn.BatchNorm1d(heads * 2 * half)
        self.keys = nn.Parameter(torch.randn(heads, 2, n, half) / math.sqrt(half))
        self.values = nn.Parameter(torch.randn(n * n, d) * 0.1)
        with torch.no_grad():
            self.q_bn.running_mean.normal_(0, 0.2)
            self.q_bn.running_var.uniform_(0.5, 2.0)
            self.q_bn.weight.uniform_(0.8, 1.2)
            self.q_bn.bias.normal_(0, 0.05)

    def forward(self, x):
        bs, seq, d = x.shape
        flat = x.reshape(-1, d)
        q = self.q_bn(self.q_proj(flat)).view(-1, self.h, 2, self.half)
        s = torch.einsum("thsd,hsnd->thsn", q, self.keys) / math.sqrt(self.half)
        s1, i1 = s[:, :, 0].topk(self.knn, dim=-1)  # [T, h, knn]
        s2, i2 = s[:, :, 1].topk(self.knn, dim=-1)
        all_s = (s1.unsqueeze(3) + s2.unsqueeze(2)).view(-1, self.h, self.knn * self.knn)
        all_i = (i1.unsqueeze(3) * self.n + i2.unsqueeze(2)).view(-1, self.h, self.knn * self.knn)
        best_s, best_p = all_s.topk(self.knn, dim=-1)
        best_i = all_i.gather(-1, best_p)
        attn = F.softmax(best_s.float(), dim=-1).type_as(best_s)
        T = flat.shape[0]
        rows = self.values.index_select(0, best_i.view(-1)).view(T, self.h * self.knn, d)
        out = torch.bmm(attn.view(T, 1, self.h * self.knn), rows).view(bs, seq, d)
        return out


class TinyMemLM(nn.Module):
    def __init__(self, vocab=128, d=64, n_heads=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mem = _BlockPKM(d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.n_heads = n_heads

    def forward(self, ids):
        x = self.emb(ids)
        B, L, D = x.shape
        a = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads)
        q, k, v = a.unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.o(y.transpose(1, 2).reshape(B, L, D))
        x = x + self.mem(self.ln2(x))
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------------------
# 6. Authors-style UltraMem V1 with everything: Hk=2 key heads, r=2, M=2 cores,
#    u/v buffers from the SVD of the summed cores, loops over heads and ranks
#    writing into a preallocated buffer, RMSNorm query, multi-core scores on
#    chunked values, IVE E=4 with a global shuffle and mod/div, scatter_add pooling,
#    Wout as a raw matrix.
# ---------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class UltraMemIVE(nn.Module):
    def __init__(self, D=64, Dk=32, Hk=2, n=32, r=2, M=2, m=8, k=8, Dv=64, E=4):
        super().__init__()
        assert (n * n) % E == 0 and Dv % M == 0
        self.D, self.Dk, self.Hk, self.n, self.r, self.M = D, Dk, Hk, n, r, M
        self.m, self.k, self.Dv, self.E = m, k, Dv, E
        self.R = n * n // E
        self.wq = nn.Linear(D, 2 * Dk, bias=False)
        self.qnorm = _RMSNorm(Dk)
        with torch.no_grad():
            self.qnorm.weight.uniform_(0.7, 1.3)
        self.keys = nn.Parameter(torch.randn(Hk, 2, n, Dk, r) / math.sqrt(Dk))
        cores = torch.randn(M, Hk, r, r) * 0.3
        cores[..., 0, 0] += 1.5
        self.cores = nn.Parameter(cores)
        with torch.no_grad():
            U, _, Vh = torch.linalg.svd(self.cores.sum(0))
        self.register_buffer("u", U[..., :, 0].clone())  # [Hk, r]
        self.register_buffer("v", Vh[..., 0, :].clone())
        self.register_buffer("shuffle", torch.randperm(n * n))
        self.values = nn.Parameter(torch.randn(self.R, Dv) * 0.3)
        self.wout = nn.Parameter(torch.randn(E * Dv, D) / math.sqrt(E * Dv))

    def forward(self, x):
        B, L, _ = x.shape
        T = B * L
        Hk, n, r, M, m, k, E, R = self.Hk, self.n, self.r, self.M, self.m, self.k, self.E, self.R
        q = self.qnorm(self.wq(x.reshape(T, self.D)).view(T, 2, self.Dk))
        S = x.new_empty(T, Hk, 2, n, r)
        for h in range(Hk):
            for p in range(r):
                S[:, h, 0, :, p] = q[:, 0] @ self.keys[h, 0, :, :, p].T
                S[:, h, 1, :, p] = q[:, 1] @ self.keys[h, 1, :, :, p].T
        S_row, S_col = S[:, :, 0], S[:, :, 1]  # [T, Hk, n, r]
        a_row = (S_row * self.u[None, :, None, :]).sum(-1)
        a_col = (S_col * self.v[None, :, None, :]).sum(-1)
        I_row = a_row.topk(m, dim=-1).indices  # [T, Hk, m]
        I_col = a_col.topk(m, dim=-1).indices
        Sr = torch.gather(S_row, 2, I_row[..., None].expand(-1, -1, -1, r))
        Sc = torch.gather(S_col, 2, I_col[..., None].expand(-1, -1, -1, r))
        G = torch.stack(
            [torch.einsum("thar,hrs,thbs->thab", Sr, self.cores[c], Sc) for c in range(M)], dim=2
        ).flatten(-2)  # [T, Hk, M, m*m]
        pos = G.sum(2).topk(k, dim=-1).indices  # [T, Hk, k]
        s_c = G.gather(-1, pos[:, :, None, :].expand(-1, -1, M, -1))  # [T, Hk, M, k]
        slot = I_row.gather(-1, pos // m) * n + I_col.gather(-1, pos % m)
        j = self.shuffle[slot]
        row = j % R
        grp = j // R
        vals = self.values[row].view(T, Hk, k, M, self.Dv // M)
        weighted = (vals * s_c.permute(0, 1, 3, 2)[..., None]).reshape(T, Hk * k, self.Dv)
        P = torch.zeros(T, E, self.Dv, dtype=x.dtype, device=x.device)
        P = P.scatter_add(1, grp.reshape(T, Hk * k, 1).expand(-1, -1, self.Dv), weighted)
        out = P.reshape(T, E * self.Dv) @ self.wout
        return out.view(B, L, self.D)


# ---------------------------------------------------------------------------
# 7. Lample-style multi-head PKM (4 heads, shared table) summing all H*k rows with
#    F.embedding_bag(per_sample_weights); returns a tuple (output, slot indices).
# ---------------------------------------------------------------------------
class BagPKM(nn.Module):
    def __init__(self, input_dim=64, output_dim=64, heads=4, k_dim=32, n_keys=32, knn=8):
        super().__init__()
        self.heads, self.k_dim, self.n_keys, self.knn = heads, k_dim, n_keys, knn
        self.output_dim = output_dim
        self.query_proj = nn.Sequential(nn.Linear(input_dim, heads * k_dim), nn.Identity())
        half = k_dim // 2
        self.keys = nn.Parameter(torch.randn(heads, 2, n_keys, half) * (1.0 / math.sqrt(half)))
        self.values = nn.EmbeddingBag(n_keys**2, output_dim, mode="sum")
        with torch.no_grad():
            self.values.weight.normal_(0, output_dim**-0.5)

    def _get_indices(self, query, subkeys):
        bs = query.size(0)
        half = self.k_dim // 2
        q1 = query[:, :half]
        q2 = query[:, half:]
        scores1 = F.linear(q1, subkeys[0])
        scores2 = F.linear(q2, subkeys[1])
        scores1, indices1 = scores1.topk(self.knn, dim=1)
        scores2, indices2 = scores2.topk(self.knn, dim=1)
        all_scores = (
            scores1.view(bs, self.knn, 1).expand(bs, self.knn, self.knn)
            + scores2.view(bs, 1, self.knn).expand(bs, self.knn, self.knn)
        ).view(bs, -1)
        all_indices = (
            indices1.view(bs, self.knn, 1).expand(bs, self.knn, self.knn) * self.n_keys
            + indices2.view(bs, 1, self.knn).expand(bs, self.knn, self.knn)
        ).view(bs, -1)
        scores, best_indices = torch.topk(all_scores, k=self.knn, dim=1)
        indices = all_indices.gather(1, best_indices)
        return scores, indices

    def forward(self, input):
        prefix_shape = input.shape[:-1]
        bs = input.numel() // input.shape[-1]
        query = self.query_proj(input.contiguous().view(-1, input.shape[-1]))
        query = query.view(bs * self.heads, self.k_dim)
        query = query.view(bs, self.heads, self.k_dim)
        outputs = [self._get_indices(query[:, i], self.keys[i]) for i in range(self.heads)]
        scores = torch.cat([s.unsqueeze(1) for s, _ in outputs], 1).view(bs, -1)
        indices = torch.cat([idx.unsqueeze(1) for _, idx in outputs], 1).view(bs, -1)
        scores = F.softmax(scores.float().view(bs, self.heads, self.knn), dim=-1).view(bs, -1)
        output = self.values(indices, per_sample_weights=scores)
        return output.view((*prefix_shape, self.output_dim)), indices.view(
            (*prefix_shape, self.heads * self.knn)
        )


# ---------------------------------------------------------------------------
# 8. UltraMemV2-style: two memory layers sharing one value table (per-layer offsets,
#    wrap-around mod R_all), Tucker r=2 with u/v buffers, per-slot gate
#    gelu(<x Wpre, PV[row]>), softmax scores, output gate silu(x Wg) (no bias), residual.
# ---------------------------------------------------------------------------
class _V2Layer(nn.Module):
    def __init__(self, d, dk, n, r, m, k, dp, offset, shared):
        super().__init__()
        self.d, self.dk, self.n, self.r, self.m, self.k, self.offset = d, dk, n, r, m, k, offset
        self.shared = [shared]  # not registered twice
        self.wq = nn.Linear(d, 2 * dk, bias=False)
        self.ln_q = nn.LayerNorm(dk, elementwise_affine=False)
        self.row_keys = nn.Parameter(torch.randn(r, n, dk) / math.sqrt(dk))
        self.col_keys = nn.Parameter(torch.randn(r, n, dk) / math.sqrt(dk))
        core = torch.randn(r, r) * 0.4 + torch.diag(torch.tensor([2.0, 0.5]))
        self.core = nn.Parameter(core)
        U, _, Vh = torch.linalg.svd(core)
        self.register_buffer("u", U[:, 0].clone())
        self.register_buffer("v", Vh[0].clone())
        self.wpre = nn.Linear(d, dp, bias=False)
        self.wg = nn.Linear(d, d, bias=False)
        self.wout = nn.Linear(shared.values.shape[1], d, bias=False)

    def forward(self, x):
        tab = self.shared[0]
        R_all = tab.values.shape[0]
        _B, _L, _d = x.shape
        q = self.ln_q(self.wq(x).unflatten(-1, (2, self.dk)))  # [B, L, 2, dk]
        s_row = torch.einsum("bld,rnd->blnr", q[..., 0, :], self.row_keys)
        s_col = torch.einsum("bld,rnd->blnr", q[..., 1, :], self.col_keys)
        ir = torch.topk(s_row @ self.u, self.m, dim=-1).indices  # [B, L, m]
        ic = torch.topk(s_col @ self.v, self.m, dim=-1).indices
        sr = torch.take_along_dim(s_row, ir[..., None], dim=-2)  # [B, L, m, r]
        sc = torch.take_along_dim(s_col, ic[..., None], dim=-2)
        grid = torch.einsum("blir,rs,blcs->blic", sr, self.core, sc).flatten(-2)
        top = torch.topk(grid, self.k, dim=-1)
        slot = ir.gather(-1, top.indices // self.m) * self.n + ic.gather(-1, top.indices % self.m)
        row = (slot + self.offset) % R_all
        w = top.values.softmax(-1)
        pre = self.wpre(x)  # [B, L, dp]
        gate = F.gelu((tab.pv[row] * pre.unsqueeze(-2)).sum(-1))  # [B, L, k]
        w = w * gate
        v = tab.values[row]  # [B, L, k, Dv]
        out = self.wout(torch.einsum("blk,blkd->bld", w, v))
        return out * F.silu(self.wg(x))


class _SharedTable(nn.Module):
    def __init__(self, rows, dv, dp):
        super().__init__()
        self.values = nn.Parameter(torch.randn(rows, dv) * 0.3)
        self.pv = nn.Parameter(torch.randn(rows, dp) * 0.3)


class UltraMemV2Stack(nn.Module):
    def __init__(self, d=64, dk=32, n=32, r=2, m=10, k=8, dv=48, dp=16):
        super().__init__()
        rows = (n * n * 3) // 2
        self.table = _SharedTable(rows, dv, dp)
        self.layer0 = _V2Layer(d, dk, n, r, m, k, dp, 0, self.table)
        self.layer1 = _V2Layer(d, dk, n, r, m, k, dp, n * n, self.table)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.layer0(self.norm(x))
        x = x + self.layer1(self.norm(x))
        return x


# ---------------------------------------------------------------------------
# 9. One shared query for both sides after a causal depthwise conv; single key
#    matrix [2n, dk] (rows then columns) scored in one matmul and split; RMSNorm by
#    hand; sigmoid on the selected scores; output gate sigmoid(x Wg + b).
# ---------------------------------------------------------------------------
class SharedQueryConvPKM(nn.Module):
    def __init__(self, dim=64, qdim=32, n=32, m=8, k=8):
        super().__init__()
        self.n, self.m, self.k = n, m, k
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, groups=dim, padding=2)
        self.to_q = nn.Linear(dim, qdim, bias=False)
        self.g = nn.Parameter(torch.rand(qdim) + 0.5)
        self.key_table = nn.Parameter(torch.randn(2 * n, qdim) / math.sqrt(qdim))
        self.mem = nn.Parameter(torch.randn(n * n, dim) * 0.2)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        h = self.conv(x.transpose(1, 2))[..., :L].transpose(1, 2)  # causal
        q = self.to_q(h)
        q = q / q.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * self.g
        both = q @ self.key_table.T  # [B, L, 2n]
        left, right = both[..., : self.n], both[..., self.n :]
        lv, li = left.topk(self.m, -1)
        rv, ri = right.topk(self.m, -1)
        tot = lv.unsqueeze(-1) + rv.unsqueeze(-2)
        flat_v, flat_i = tot.view(B, L, -1).topk(self.k, -1)
        li_sel = li.gather(-1, flat_i.div(self.m, rounding_mode="trunc"))
        ri_sel = ri.gather(-1, flat_i.fmod(self.m))
        addr = li_sel.mul(self.n).add(ri_sel)
        p = torch.sigmoid(flat_v)
        read = self.mem[addr.flatten()].view(B, L, self.k, C)
        y = (p[..., None] * read).sum(2)
        return y * torch.sigmoid(self.gate(x))


# ---------------------------------------------------------------------------
# 10. Heads as the LAST dim everywhere: keys [2, n, dk, H], scores [T, 2, n, H],
#     top-k over dim 1/2, grid [T, m*m, H]; m != k; 1/sqrt(dk) scaling; shared table
#     read by plain indexing; einsum 'tkh,tkhd->td' sums heads and slots at once.
# ---------------------------------------------------------------------------
class HeadsLastPKM(nn.Module):
    def __init__(self, d=64, dk=24, n=36, H=2, m=12, k=16):
        super().__init__()
        self.d, self.dk, self.n, self.H, self.m, self.k = d, dk, n, H, m, k
        self.Wq = nn.Parameter(torch.randn(d, 2, dk, H) / math.sqrt(d))
        self.K = nn.Parameter(torch.randn(2, n, dk, H))
        self.V = nn.Parameter(torch.randn(n * n, d) * 0.25)

    def forward(self, x):
        B, L, d = x.shape
        t = x.reshape(-1, d)
        q = torch.einsum("td,dsjh->tsjh", t, self.Wq)
        s = torch.einsum("tsjh,snjh->tsnh", q, self.K) * (self.dk**-0.5)  # [T, 2, n, H]
        val, idx = torch.topk(s, self.m, dim=2)  # [T, 2, m, H]
        grid = (val[:, 0, :, None, :] + val[:, 1, None, :, :]).reshape(-1, self.m * self.m, self.H)
        gval, gidx = torch.topk(grid, self.k, dim=1)  # [T, k, H]
        r = torch.gather(idx[:, 0], 1, gidx // self.m)
        c = torch.gather(idx[:, 1], 1, gidx % self.m)
        slots = r * self.n + c  # [T, k, H]
        w = torch.softmax(gval, dim=1)
        vals = self.V[slots]  # [T, k, H, d]
        return torch.einsum("tkh,tkhd->td", w, vals).reshape(B, L, d)


# ---------------------------------------------------------------------------
# Look-alike A: top-k sparsified self-attention (not a memory lookup).
# ---------------------------------------------------------------------------
class TopKSparseAttention(nn.Module):
    def __init__(self, d=64, heads=4, topk=4):
        super().__init__()
        self.h, self.topk = heads, topk
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2) / math.sqrt(D // self.h)  # [B, h, L, L]
        kk = min(self.topk, L)
        top_v, top_i = att.topk(kk, dim=-1)
        sparse = torch.full_like(att, float("-inf")).scatter(-1, top_i, top_v)
        y = sparse.softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, L, D))


# ---------------------------------------------------------------------------
# Look-alike B: kNN memory over a flat key table (no product structure).
# ---------------------------------------------------------------------------
class FlatKNNMemory(nn.Module):
    def __init__(self, d=64, dk=32, N=1024, k=16):
        super().__init__()
        self.k = k
        self.wq = nn.Linear(d, dk, bias=False)
        self.keys = nn.Parameter(torch.randn(N, dk) / math.sqrt(dk))
        self.values = nn.Parameter(torch.randn(N, d) * 0.3)

    def forward(self, x):
        q = self.wq(x)
        s = q @ self.keys.t()  # [B, L, N]
        top_s, top_i = s.topk(self.k, dim=-1)
        w = top_s.softmax(-1)
        v = F.embedding(top_i, self.values)
        return torch.einsum("blk,blkd->bld", w, v)


# ---------------------------------------------------------------------------
# Look-alike C (bonus): top-2 mixture-of-experts router, computed densely.
# ---------------------------------------------------------------------------
class Top2MoE(nn.Module):
    def __init__(self, d=64, experts=8, hidden=64):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, d, hidden) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(experts, hidden, d) / math.sqrt(hidden))

    def forward(self, x):
        logits = self.router(x)  # [B, L, E]
        tv, ti = logits.topk(2, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, ti, tv.softmax(-1))
        h = F.gelu(torch.einsum("bld,edh->bleh", x, self.w1))
        y = torch.einsum("bleh,ehd->bled", h, self.w2)
        return (gates.unsqueeze(-1) * y).sum(-2)


# ---------------------------------------------------------------------------
def _mk(cls, seed, shape=(2, 16, 64), ids_vocab=None, example_seed=None, **kw):
    def factory():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**kw).eval()
        g = torch.Generator().manual_seed(1000 + seed if example_seed is None else example_seed)
        if ids_vocab is not None:
            ex = (torch.randint(0, ids_vocab, shape, generator=g),)
        else:
            ex = (torch.randn(*shape, generator=g),)
        return model, ex

    factory.input_shape = shape
    factory.ids_vocab = ids_vocab
    return factory


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]] = {
    "m01_stacked_bmm_pkm": _mk(StackedKeyPKM, 1),
    "m02_colmajor_transposed_keys": _mk(ColumnMajorPKM, 2, shape=(2, 16, 96)),
    "m03_tucker_bmm_svd": _mk(TuckerBmmMemory, 3),
    "m04_per_head_tables_loop": _mk(PerHeadTablePKM, 4),
    "m05_tiny_transformer_ids": _mk(TinyMemLM, 5, shape=(2, 16), ids_vocab=128),
    "m06_ultramem_ive_mcs": _mk(UltraMemIVE, 6),
    # example redrawn (seed 1007 held a 7.6e-6 near-tie, too close for exact parity claims)
    "m07_embedding_bag_tuple": _mk(BagPKM, 7, example_seed=4007),
    "m08_v2_shared_table_gates": _mk(UltraMemV2Stack, 8),
    "m09_shared_query_conv_sigmoid": _mk(SharedQueryConvPKM, 9),
    "m10_heads_last_einsum": _mk(HeadsLastPKM, 10),
    "x01_lookalike_topk_attention": _mk(TopKSparseAttention, 11),
    "x02_lookalike_flat_knn": _mk(FlatKNNMemory, 12),
    "x03_lookalike_top2_moe": _mk(Top2MoE, 13),
}


def inputs(name: str) -> Callable[[int, int], tuple[Tensor, ...]]:
    """(batch, tokens) -> inputs like ``name``'s example (a local generator)."""
    factory = MODELS[name]

    def make(batch: int, tokens: int) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(7 * batch + tokens)
        if factory.ids_vocab is not None:  # type: ignore[attr-defined]
            return (torch.randint(0, factory.ids_vocab, (batch, tokens), generator=g),)  # type: ignore[attr-defined]
        width = factory.input_shape[-1]  # type: ignore[attr-defined]
        return (torch.randn(batch, tokens, width, generator=g),)

    return make
