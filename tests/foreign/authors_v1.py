"""UltraMem V1 written with the paper authors' habits (their OLMoE fork, `UltraMemLayerV1`).

Source read (not copied): https://github.com/ZihaoHuang-notabot/Ultra-Sparse-Memory-Network,
`olmo/ultramem_layer.py`. The habits kept here, because a compiler sees each of them:

- tokens flattened with `bs = np.prod(prefix_shape)` and `hidden_state.view(bs, -1)`;
- ONE query [bs, 2·kdim] read as (row, col) halves after a LayerNorm over kdim, shared by
  `nhead_share_query = 2` key heads (head i reads query head i // 2);
- keys [head, 2, key_num, kdim, rank] normalised over kdim through a transpose pair;
- the row/column scores computed in a `torch.autograd.Function` that allocates TWO
  buffers with identical arguments (`query.new_zeros(bs, head, n)` twice: a trap for
  common-subexpression elimination, the buffers differ only by what is later written into
  them) and fills them head by head with `torch.matmul(..., out=buf[:, i])`, called once
  per Tucker rank (`torch.select(keys, -1, r)`) and stacked;
- the rank-1 merge with `tucker_core_u` / `tucker_core_v` BUFFERS [1, head, 1, rank], kept
  by an online sign-smoothing rule during training (so their signs are the buffers', not
  what a fresh `torch.svd` returns), or with `torch.svd` (which returns V, not Vᵀ) of the
  SUM of the cores called in `forward`;
- M Tucker cores in an `nn.ParameterList`, each scoring the m × m grid in a Python loop;
  selection on their sum, per-core scores gathered at the selected positions;
- implicit value expansion through a global `shuffle_index` buffer, physical row
  `j % value_num`, group `j // value_num`, each value row split into M chunks weighted by
  the M core scores, pooled by `scatter_add_` into [bs, E, vdim], then `values_proj`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from ._trained import (
    factory,
    fan_in,
    float_inputs,
    gains,
    near_identity,
    normal,
    permutation,
    seeded,
    token_inputs,
)


class ParallelKeyQueryInnerProduct(torch.autograd.Function):
    """Row and column scores of every key head, written head by head into two buffers."""

    @staticmethod
    def forward(
        ctx,
        query: Tensor,
        keys: Tensor,
        bs: int,
        n_keys: int,
        head_num: int,
        nhead_share_query: int,
    ) -> tuple[Tensor, Tensor]:
        # query [bs, qhead, 2*kdim], keys [head, 2, n_keys, kdim]
        k_dim = query.shape[-1]
        half = k_dim // 2

        scores1 = query.new_zeros(bs, head_num, n_keys)  # (bs, head, num_keys)
        scores2 = query.new_zeros(bs, head_num, n_keys)  # (bs, head, num_keys)

        for i in range(head_num):
            q1 = query[:, i // nhead_share_query, :half]  # (bs, half)
            q2 = query[:, i // nhead_share_query, half:]
            key1 = keys[i, 0]
            key2 = keys[i, 1]
            torch.matmul(q1, key1.transpose(0, 1), out=scores1[:, i])
            torch.matmul(q2, key2.transpose(0, 1), out=scores2[:, i])

        ctx.half = half
        ctx.head_num = head_num
        ctx.nhead_share_query = nhead_share_query
        ctx.save_for_backward(query, keys)
        return scores1, scores2

    @staticmethod
    def backward(ctx, score1_grad: Tensor, score2_grad: Tensor) -> tuple[Tensor | None, ...]:
        query, keys = ctx.saved_tensors
        keys_grad = torch.zeros_like(keys)
        query_grad = torch.zeros_like(query)
        for i in range(ctx.head_num):
            j = i // ctx.nhead_share_query
            torch.matmul(
                score1_grad[:, i].transpose(0, 1), query[:, j, : ctx.half], out=keys_grad[i][0]
            )
            torch.matmul(
                score2_grad[:, i].transpose(0, 1), query[:, j, ctx.half :], out=keys_grad[i][1]
            )
            query_grad[:, j, : ctx.half].add_(torch.matmul(score1_grad[:, i], keys[i][0]))
            query_grad[:, j, ctx.half :].add_(torch.matmul(score2_grad[:, i], keys[i][1]))
        return query_grad, keys_grad, None, None, None, None


class UltraMemLayerV1(nn.Module):
    """The authors' V1 layer: TDQKR with M cores, IVE through a global shuffle, MCS pooling.

    `svd_in_forward=False` (their forward) merges ranks with the sign-smoothed u/v buffers;
    `True` calls `_calc_tucker_1rank()` (`torch.svd` of the summed cores) on every call, as
    their commented-out line does. `dropout > 0` puts `nn.Dropout` on the query, on the
    selected per-core scores and on the gathered values (inactive in eval).
    """

    def __init__(
        self,
        hidden_size: int,
        knum: int,
        kdim: int,
        vdim: int,
        knn: int,
        head: int = 1,
        tucker_rank: int = 2,
        tucker_multihead: int = 2,
        value_expand_time: int = 4,
        svd_in_forward: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        assert head <= 2, "one query head shared by nhead_share_query = 2 key heads"
        q_proj_out_dim = kdim * 2
        v_proj_in_dim = vdim * value_expand_time
        key_expand_time = int(value_expand_time**0.5)
        value_num = knum * knum
        virtual_value_num = value_expand_time * value_num
        key_num = key_expand_time * knum
        assert vdim % tucker_multihead == 0

        self.kdim = kdim
        self.vdim = vdim
        self.knn = knn
        self.tucker_rank = tucker_rank
        self.key_num = key_num
        self.tucker_multihead = tucker_multihead
        self.value_num = value_num
        self.value_expand_time = value_expand_time
        self.virtual_value_num = virtual_value_num
        self.head = head
        self.svd_in_forward = svd_in_forward

        self.query_proj = nn.Linear(hidden_size, q_proj_out_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(head, 2, key_num, kdim, tucker_rank))
        self.values_for_look_up = nn.Parameter(torch.empty(value_num, vdim))
        self.values_proj = nn.Linear(v_proj_in_dim, hidden_size, bias=False)
        self.query_norm = nn.LayerNorm(kdim, bias=False)
        self.keys_norm = nn.LayerNorm(kdim, bias=False)
        self.tucker_core = nn.ParameterList(
            [
                nn.Parameter(torch.empty(head, tucker_rank, tucker_rank))
                for _ in range(tucker_multihead)
            ]
        )
        self.register_buffer("shuffle_index", torch.arange(virtual_value_num))
        self.register_buffer("tucker_core_u", torch.zeros([1, head, 1, tucker_rank]))
        self.register_buffer("tucker_core_v", torch.zeros([1, head, 1, tucker_rank]))
        self.query_dropout = nn.Dropout(dropout)
        self.score_dropout = nn.Dropout(dropout)
        self.value_dropout = nn.Dropout(dropout)
        self.use_dropout = dropout > 0

    # -- training-time machinery, run once at build time to set the buffers ---------------

    def reset_parameters_trained(self, g: torch.Generator) -> None:
        """Weights as after training, and u/v as the online sign smoothing leaves them."""
        with torch.no_grad():
            self.query_proj.weight.copy_(fan_in(g, *self.query_proj.weight.shape))
            self.query_norm.weight.copy_(gains(g, self.kdim, scale=self.kdim**-0.33, spread=0.3))
            self.keys_norm.weight.copy_(gains(g, self.kdim, scale=self.kdim**-0.33, spread=0.3))
            self.keys.copy_(normal(g, *self.keys.shape, std=1 / math.sqrt(self.kdim)))
            self.values_for_look_up.copy_(normal(g, *self.values_for_look_up.shape))
            w = self.values_proj.weight
            w.copy_(fan_in(g, *w.shape, gain=1 / math.sqrt(self.knn * self.head)))
            # cores: near rank one after the aux loss, but not exactly (noise 0.3-0.6)
            for i, c in enumerate(self.tucker_core):
                c.copy_(near_identity(g, self.head, rank=self.tucker_rank, noise=0.3 + 0.03 * i))
            self.shuffle_index.copy_(permutation(g, self.virtual_value_num))
            # the u/v a training run ends with: smoothed against the previous step's, whose
            # sign was random per head (so some heads keep -u, -v)
            u, v, _ = self._calc_tucker_1rank()
            prev_sign = torch.where(torch.rand(1, self.head, 1, 1, generator=g) < 0.5, -1.0, 1.0)
            self.tucker_core_u.copy_(prev_sign * u + 0.01 * normal(g, *u.shape))
            self.tucker_core_v.copy_(prev_sign * v + 0.01 * normal(g, *v.shape))
            self._online_update_tucker_approx()

    def _calc_tucker_1rank(self) -> tuple[Tensor, Tensor, Tensor]:
        tucker_core_sum = torch.stack(list(self.tucker_core), dim=0).sum(dim=0)
        U, S, V = torch.svd(tucker_core_sum)
        u = U[..., 0]  # [head, rank]
        v = V[..., 0]
        u = u[None, :, None, :]
        v = v[None, :, None, :]
        aux_loss = (torch.nn.functional.relu(S[..., 1:] - 0.15) ** 2).mean()
        return u, v, aux_loss

    @torch.no_grad()
    def _online_update_tucker_approx(self) -> None:
        U, V, _ = self._calc_tucker_1rank()
        pos_sim = torch.abs(U - self.tucker_core_u).sum(dim=-1, keepdim=True) + torch.abs(
            V - self.tucker_core_v
        ).sum(dim=-1, keepdim=True)
        neg_sim = torch.abs(-U - self.tucker_core_u).sum(dim=-1, keepdim=True) + torch.abs(
            -V - self.tucker_core_v
        ).sum(dim=-1, keepdim=True)
        sign = torch.sign(neg_sim - pos_sim)
        sign[sign == 0] = 1
        self.tucker_core_u.copy_(U * sign)
        self.tucker_core_v.copy_(V * sign)

    # -- inference ---------------------------------------------------------------------------

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        prefix_shape = hidden_state.shape[:-1]
        bs = np.prod(prefix_shape)

        query = self.query_proj(hidden_state.view(bs, -1))  # [bs, 2*kdim]
        query = query.view(bs, 1, 2, self.kdim)  # [bs, 1, 2, kdim]
        query = self.query_norm(query)
        query = query.view(bs, 1, 2 * self.kdim)
        if self.use_dropout:
            query = self.query_dropout(query)

        keys = self.keys_norm(self.keys.transpose(-1, -2)).transpose(-1, -2)

        best_scores, best_indice = self.TuckerDecomposedQueryKeyRetrieval(query, keys)
        output = self.ImplicitValueExpansion(best_scores, best_indice)
        return output.view(*prefix_shape, -1)

    def TuckerDecomposedQueryKeyRetrieval(
        self, query: Tensor, keys: Tensor
    ) -> tuple[Tensor, Tensor]:
        bs = query.shape[0]
        head_num, _, n_keys, _kdim, tucker_rank = keys.shape
        nhead_share_query = 2

        scores1_refine = []
        scores2_refine = []
        for key_idx in range(tucker_rank):
            scores1_refine_, scores2_refine_ = ParallelKeyQueryInnerProduct.apply(
                query, torch.select(keys, -1, key_idx), bs, n_keys, head_num, nhead_share_query
            )
            scores1_refine.append(scores1_refine_)
            scores2_refine.append(scores2_refine_)
        scores1_refine = torch.stack(scores1_refine, dim=-1)  # [bs, head, n_keys, rank]
        scores2_refine = torch.stack(scores2_refine, dim=-1)

        if self.svd_in_forward:
            tucker_core_u, tucker_core_v, _ = self._calc_tucker_1rank()
        else:
            tucker_core_u, tucker_core_v = self.tucker_core_u, self.tucker_core_v
        scores1 = (scores1_refine * tucker_core_u).sum(-1)
        scores2 = (scores2_refine * tucker_core_v).sum(-1)

        _scores1_chosen, indices1 = scores1.topk(self.knn, dim=2, largest=True, sorted=True)
        _scores2_chosen, indices2 = scores2.topk(self.knn, dim=2, largest=True, sorted=True)

        _scores1_refine = scores1_refine.gather(
            2, indices1.unsqueeze(dim=-1).expand(-1, -1, -1, scores1_refine.shape[-1])
        )
        _scores2_refine = scores2_refine.gather(
            2, indices2.unsqueeze(dim=-1).expand(-1, -1, -1, scores2_refine.shape[-1])
        )  # [bs, head, knn, rank]

        score_list = []
        for i in range(self.tucker_multihead):
            score_list.append(
                (_scores1_refine @ (self.tucker_core[i]) @ _scores2_refine.transpose(-1, -2)).view(
                    bs, head_num, -1
                )
            )
        all_scores = torch.stack(score_list, dim=-1).sum(dim=-1)

        all_indices = (
            indices1.view(bs, head_num, self.knn, 1).expand(bs, head_num, self.knn, self.knn)
            * n_keys
            + indices2.view(bs, head_num, 1, self.knn).expand(bs, head_num, self.knn, self.knn)
        ).view(bs, head_num, -1)
        _scores, best_indices = torch.topk(all_scores, k=self.knn, dim=2, largest=True, sorted=True)

        best_scores = torch.stack([s.gather(2, best_indices) for s in score_list], dim=-1).view(
            bs, -1, self.tucker_multihead
        )
        best_indices = all_indices.gather(2, best_indices).view(bs, -1)
        return best_scores, best_indices

    def ImplicitValueExpansion(self, best_scores: Tensor, best_indice: Tensor) -> Tensor:
        bs = best_scores.shape[0]
        best_indice_shuffled = self.shuffle_index[best_indice]
        real_indice = best_indice_shuffled % self.value_num
        group_indice = best_indice_shuffled // self.value_num

        if self.use_dropout:
            best_scores = self.score_dropout(best_scores)
        values = torch.nn.functional.embedding(
            real_indice, self.values_for_look_up
        )  # [bs, knn*head, vdim]
        if self.use_dropout:
            values = self.value_dropout(values)
        values = values.view(bs, self.knn * self.head, self.tucker_multihead, -1)
        values = (values * best_scores.unsqueeze(dim=-1)).view(bs, self.knn * self.head, -1)

        output = torch.zeros(
            (bs, self.value_expand_time, self.vdim), device=values.device, dtype=values.dtype
        )
        output.scatter_add_(1, group_indice.unsqueeze(dim=-1).expand(-1, -1, self.vdim), values)
        output = output.view(bs, -1)
        output = self.values_proj(output)
        return output


class CausalBlock(nn.Module):
    """Pre-norm causal self-attention + GELU MLP (OLMo-like, no KV cache)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.att_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.ff_out = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in (q, k, v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ff_out(torch.nn.functional.gelu(self.ff_proj(self.ff_norm(x))))


class SkipLayerLM(nn.Module):
    """A small LM with the paper's skip-layer placement: the memory reads block 0's input
    and its output is added after block 1 (training overlaps the lookup with compute; at
    inference it is ordinary data flow)."""

    def __init__(self, vocab: int, dim: int, memory: UltraMemLayerV1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([CausalBlock(dim, heads=4) for _ in range(2)])
        self.mem_norm = nn.LayerNorm(dim)
        self.memory = memory
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h0 = self.embed(ids)
        mem_out = self.memory(self.mem_norm(h0))
        h = self.blocks[0](h0)
        h = self.blocks[1](h) + mem_out
        return self.head(self.norm(h))


def _trained_v1(seed: int, **kw) -> UltraMemLayerV1:
    layer = UltraMemLayerV1(**kw)
    layer.reset_parameters_trained(seeded(seed))
    return layer.eval()


# D 64, knum 16 (256 rows, E 4 → 32 × 32 keys), kdim 32, vdim 32, m = k 8, 2 heads, r 2, M 2
v1_inputs = float_inputs(64, seed=201)


@factory
def authors_v1_buffers() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """V1 as the authors run it: sign-smoothed u/v buffers, 2 heads sharing one query."""
    layer = _trained_v1(210, hidden_size=64, knum=16, kdim=32, vdim=32, knn=8, head=2)
    return layer, v1_inputs(2, 16)


v1_svd_inputs = float_inputs(96, seed=202)


@factory
def authors_v1_svd_forward() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """V1 with `torch.svd` of the summed cores in forward; 1 head, m = k 12, 3 cores."""
    layer = _trained_v1(
        202,
        hidden_size=96,
        knum=16,
        kdim=48,
        vdim=48,
        knn=12,
        head=1,
        tucker_multihead=3,
        svd_in_forward=True,
    )
    return layer, v1_svd_inputs(2, 16)


v1_ten_inputs = float_inputs(64, seed=203)


@factory
def authors_v1_ten_cores() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """V1 with M = 10 Tucker cores: 10 separate Parameters in the ParameterList, vdim 40."""
    layer = _trained_v1(
        203, hidden_size=64, knum=16, kdim=32, vdim=40, knn=8, head=2, tucker_multihead=10
    )
    return layer, v1_ten_inputs(2, 16)


v1_dropout_inputs = float_inputs(64, seed=204)


@factory
def authors_v1_dropout_e1() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """V1 with `nn.Dropout(0.1)` on query, scores and values; E = 1 (32 × 32 keys, 1024 rows)."""
    layer = _trained_v1(
        204,
        hidden_size=64,
        knum=32,
        kdim=32,
        vdim=32,
        knn=8,
        head=2,
        value_expand_time=1,
        dropout=0.1,
    )
    return layer, v1_dropout_inputs(2, 16)


SKIP_VOCAB = 96
skip_lm_inputs = token_inputs(SKIP_VOCAB, seed=205)


@factory
def authors_v1_skip_lm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A 2-block LM (vocab 96, D 64) holding one V1 layer in the skip-layer placement."""
    g = seeded(205)
    memory = _trained_v1(206, hidden_size=64, knum=16, kdim=32, vdim=32, knn=8, head=2)
    model = SkipLayerLM(SKIP_VOCAB, 64, memory)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("memory."):
                continue
            if p.ndim == 2:
                p.copy_(
                    fan_in(g, *p.shape) if not name.startswith("embed") else normal(g, *p.shape)
                )
            elif name.endswith("weight"):
                p.copy_(gains(g, p.shape[0]))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))
    return model.eval(), skip_lm_inputs(2, 16)
