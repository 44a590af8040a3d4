"""UltraMemV2 written with the paper authors' habits (their OLMoE fork, `UltraMemLayerV2`).

Source read (not copied): https://github.com/ZihaoHuang-notabot/Ultra-Sparse-Memory-Network,
`olmo/ultramem_layer_v2.py`. What V2 adds over V1 and what is kept here:

- the value tables live in ONE module (`has_value=True`, here `FullMemoryLayer`) that every
  query layer receives as an argument of `forward(hidden_state, full_memory_layer)`; the
  tables are shared by all memory layers of the model. Layer `l` has
  `offset = l · knum²`, the model `all_value_num = knum² · mem_layer_num` rows, and each
  layer a grid over `value_num = int(sqrt(all_value_num · share_ratio))²` rows, so it reads
  physical row `((j % value_num) + offset) % all_value_num` (R_all > R; the ranges of two
  layers overlap and wrap around);
- a second table `pre_values_for_look_up` [R_all, pre_vdim] and `pre_values_proj`: each
  selected slot's score is multiplied by `<x · Wpre, PV[row]>`, through GELU when
  `mem_use_glu_act` (their fused path) or as it is;
- `mem_key_expand_time = 2`: a key grid √E times larger per side (E = 4 virtual groups,
  `shuffle_index` over 4 · value_num virtual slots); with `value_expand_time = 1` the 4
  pooled groups are summed (`output.view(bs, 4, vdim).sum(1)`) before `values_proj`,
  with `value_expand_time = 4` they are projected side by side;
- `mem_q_for_each_tucker_rank`: a query per side AND per Tucker rank, and the scores of
  all sides and ranks in one batched `torch.matmul` of [2r, bs, kdim] by
  [2r, kdim, head · n] (their `ParallelKeyQueryInnerProductNew`);
- sign-smoothed `tucker_core_u` / `tucker_core_v` buffers, cores in an `nn.ParameterList`,
  and their `Dropout` subclass that returns its input when `p == 0`.

The model stacks two such layers with a feed-forward in between, so the second layer's
input depends on the first one's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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
)


class Dropout(nn.Dropout):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return input
        return F.dropout(input, self.p, self.training, self.inplace)


@dataclass
class MemConfig:
    """The `config.mem_*` fields V2 reads."""

    mem_key_expand_time: int = 2
    mem_q_for_each_tucker_rank: bool = True
    mem_use_glu_act: bool = True
    mem_output_dropout_rate: float = 0.0


class FullMemoryLayer(nn.Module):
    """The `has_value=True` layer: the value tables shared by every memory layer."""

    def __init__(
        self, knum: int, vdim: int, pre_vdim: int, knn: int, head: int, mem_layer_num: int
    ) -> None:
        super().__init__()
        self.all_value_num = knum * knum * mem_layer_num
        self.vdim = vdim
        self.pre_vdim = pre_vdim
        self.values_for_look_up = nn.Parameter(torch.empty(self.all_value_num, vdim))
        if pre_vdim > 0:
            self.pre_values_for_look_up = nn.Parameter(torch.empty(self.all_value_num, pre_vdim))

    def ImplicitValueExpansion(
        self,
        best_scores: Tensor,
        best_indice: Tensor,
        pre_input: Tensor | None,
        all_value_num: int,
        value_num: int,
        offset: int,
        knn: int,
        head: int,
        tucker_multihead: int,
        num_group: int,
        use_glu_act: bool,
    ) -> Tensor:
        # what their FusedLookup computes, in plain torch: [bs, num_group * vdim]
        group_indice = best_indice // value_num
        real_indice = ((best_indice % value_num) + offset) % all_value_num

        bs = best_scores.shape[0]
        values = torch.nn.functional.embedding(
            real_indice, self.values_for_look_up
        )  # [bs, knn*head, vdim]
        values = values.view(bs, knn * head, tucker_multihead, -1)

        if pre_input is not None:
            pre_values = torch.nn.functional.embedding(real_indice, self.pre_values_for_look_up)
            pre_scores = torch.einsum("bd,bkd->bk", (pre_input, pre_values))
            if use_glu_act:
                pre_scores = F.gelu(pre_scores)
            values = (values * best_scores.unsqueeze(dim=-1) * pre_scores[..., None, None]).view(
                bs, knn * head, -1
            )
        else:
            values = (values * best_scores.unsqueeze(dim=-1)).view(bs, knn * head, -1)

        output = torch.zeros((bs, num_group, self.vdim), device=values.device, dtype=values.dtype)
        output.scatter_add_(1, group_indice.unsqueeze(dim=-1).expand(-1, -1, self.vdim), values)
        return output.view(bs, -1)


class UltraMemLayerV2(nn.Module):
    """A V2 query layer (`has_value=False`): queries, keys, cores, shuffle, output proj."""

    def __init__(
        self,
        hidden_size: int,
        knum: int,
        kdim: int,
        vdim: int,
        pre_vdim: int,
        knn: int,
        head: int = 1,
        tucker_rank: int = 2,
        tucker_multihead: int = 2,
        value_expand_time: int = 4,
        layer_id: int = 0,
        share_ratio: float = 1.0,
        mem_layer_num: int = 1,
        config: MemConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or MemConfig()
        self.config = config
        self.layer_id = layer_id

        q_proj_out_dim = kdim * 2 * tucker_rank if config.mem_q_for_each_tucker_rank else kdim * 2
        self.key_expand_time = config.mem_key_expand_time
        self.fake_value_expand_time = self.key_expand_time * self.key_expand_time

        assert 0 < share_ratio <= 1
        assert value_expand_time == 1 or value_expand_time == self.fake_value_expand_time
        self.offset = layer_id * knum**2
        self.all_value_num = knum * knum * mem_layer_num
        knum = int((self.all_value_num * share_ratio) ** 0.5)
        value_num = knum**2
        virtual_value_num = self.fake_value_expand_time * value_num
        key_num = self.key_expand_time * knum

        self.kdim = kdim
        self.vdim = vdim
        self.pre_vdim = pre_vdim
        self.knn = knn
        self.tucker_rank = tucker_rank
        self.key_num = key_num
        self.tucker_multihead = tucker_multihead
        self.value_num = value_num
        self.value_expand_time = value_expand_time
        self.virtual_value_num = virtual_value_num
        self.head = head
        self.hidden_size = hidden_size
        self.mem_q_for_each_tucker_rank = config.mem_q_for_each_tucker_rank
        self.use_glu_act = config.mem_use_glu_act
        self.output_dropout = Dropout(config.mem_output_dropout_rate)

        self.query_proj = nn.Linear(hidden_size, q_proj_out_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(head, 2, key_num, kdim, tucker_rank))
        self.values_proj = nn.Linear(vdim * value_expand_time, hidden_size, bias=False)
        if pre_vdim > 0:
            self.pre_values_proj = nn.Linear(hidden_size, pre_vdim, bias=False)
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

    def reset_parameters_trained(self, g: torch.Generator) -> None:
        """Weights as after training; u/v as the online sign smoothing leaves them."""
        with torch.no_grad():
            self.query_norm.weight.copy_(gains(g, self.kdim, scale=self.kdim**-0.4, spread=0.3))
            self.keys_norm.weight.copy_(gains(g, self.kdim, scale=self.kdim**-0.4, spread=0.3))
            self.query_proj.weight.copy_(fan_in(g, *self.query_proj.weight.shape))
            self.values_proj.weight.copy_(fan_in(g, *self.values_proj.weight.shape, gain=0.5))
            self.keys.copy_(normal(g, *self.keys.shape, std=1 / math.sqrt(self.kdim)))
            if self.pre_vdim > 0:
                self.pre_values_proj.weight.copy_(fan_in(g, *self.pre_values_proj.weight.shape))
            for c in self.tucker_core:
                c.copy_(near_identity(g, self.head, rank=self.tucker_rank, noise=0.4))
            self.shuffle_index.copy_(permutation(g, self.virtual_value_num))
            u, v, _ = self._calc_tucker_1rank()
            prev = torch.where(torch.rand(1, self.head, 1, 1, generator=g) < 0.5, -1.0, 1.0)
            self.tucker_core_u.copy_(prev * u)
            self.tucker_core_v.copy_(prev * v)
            self._online_update_tucker_approx()

    def _calc_tucker_1rank(self) -> tuple[Tensor, Tensor, Tensor]:
        tucker_core_sum = torch.stack(list(self.tucker_core), dim=0).sum(dim=0).to(torch.float32)
        U, S, V = torch.svd(tucker_core_sum)
        u = U[..., 0][None, :, None, :]
        v = V[..., 0][None, :, None, :]
        aux_loss = (torch.nn.functional.relu(S[..., 1:] - 0.15) ** 2).mean()
        return u, v, aux_loss

    @torch.no_grad()
    def _online_update_tucker_approx(self) -> None:
        U, V, _ = self._calc_tucker_1rank()
        pos_sim = (U - self.tucker_core_u).abs().sum(-1, keepdim=True) + (
            V - self.tucker_core_v
        ).abs().sum(-1, keepdim=True)
        neg_sim = (-U - self.tucker_core_u).abs().sum(-1, keepdim=True) + (
            -V - self.tucker_core_v
        ).abs().sum(-1, keepdim=True)
        sign = torch.sign(neg_sim - pos_sim)
        sign[sign == 0] = 1
        self.tucker_core_u.copy_(U * sign)
        self.tucker_core_v.copy_(V * sign)

    def forward(
        self, hidden_state: torch.Tensor, full_memory_layer: FullMemoryLayer
    ) -> torch.Tensor:
        prefix_shape = hidden_state.shape[:-1]
        bs = np.prod(prefix_shape)

        query = self.query_proj(hidden_state.view(bs, -1))
        qtr = self.tucker_rank if self.mem_q_for_each_tucker_rank else 1
        query = query.view(bs, 2, qtr, self.kdim)
        query = self.query_norm(query)

        keys = self.keys_norm(self.keys.transpose(3, 4)).transpose(3, 4)

        best_scores, best_indice = self.TuckerDecomposedQueryKeyRetrieval(query, keys)

        # real index
        best_indice = self.shuffle_index[best_indice]

        pre_input = self.pre_values_proj(hidden_state.view(bs, -1)) if self.pre_vdim > 0 else None
        output = full_memory_layer.ImplicitValueExpansion(
            best_scores,
            best_indice,
            pre_input,
            self.all_value_num,
            self.value_num,
            self.offset,
            self.knn,
            self.head,
            self.tucker_multihead,
            self.fake_value_expand_time,
            self.use_glu_act,
        )

        if self.value_expand_time != self.key_expand_time * self.key_expand_time:
            assert self.value_expand_time == 1
            output = output.view(bs, self.fake_value_expand_time, self.vdim)
            output = torch.sum(output, dim=1, keepdim=False)

        output = self.values_proj(output)
        output = self.output_dropout(output)
        return output.view(*prefix_shape, -1)

    def TuckerDecomposedQueryKeyRetrieval(
        self, query: Tensor, keys: Tensor
    ) -> tuple[Tensor, Tensor]:
        # query [bs, 2, qtr, kdim]; keys [head, 2, n_keys, kdim, rank]
        bs = query.shape[0]
        head_num, _, n_keys, kdim, tucker_rank = keys.shape

        # all sides and ranks in one batched matmul: [2r, bs, kdim] @ [2r, kdim, head*n]
        query = (
            query.permute(1, 2, 0, 3)
            .expand(2, tucker_rank, bs, kdim)
            .reshape(2 * tucker_rank, bs, kdim)
        )
        keys = keys.permute(1, 4, 3, 0, 2).reshape(2 * tucker_rank, kdim, head_num * n_keys)
        scores = torch.matmul(query, keys)  # [2r, bs, head*n]
        scores = scores.view(2, tucker_rank, bs, head_num, n_keys).permute(0, 2, 3, 4, 1)
        scores1_refine, scores2_refine = scores[0], scores[1]  # [bs, head, n, rank]

        scores1 = (scores1_refine * self.tucker_core_u).sum(-1)
        scores2 = (scores2_refine * self.tucker_core_v).sum(-1)

        _scores1_chosen, indices1 = scores1.topk(self.knn, dim=2, largest=True, sorted=True)
        _scores2_chosen, indices2 = scores2.topk(self.knn, dim=2, largest=True, sorted=True)

        _scores1_refine = scores1_refine.gather(
            2, indices1.unsqueeze(dim=-1).expand(-1, -1, -1, scores1_refine.shape[-1])
        )
        _scores2_refine = scores2_refine.gather(
            2, indices2.unsqueeze(dim=-1).expand(-1, -1, -1, scores2_refine.shape[-1])
        )

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


class TwoMemoryLayerModel(nn.Module):
    """x → (+ mem layer 0) → (+ FFN) → (+ mem layer 1), both layers reading one value table."""

    def __init__(self, hidden: int, layers: list[UltraMemLayerV2], values: FullMemoryLayer) -> None:
        super().__init__()
        self.full_memory_layer = values
        self.memory_layers = nn.ModuleList(layers)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden) for _ in layers])
        self.ff_norm = nn.RMSNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, 2 * hidden, bias=False),
            nn.SiLU(),
            nn.Linear(2 * hidden, hidden, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.memory_layers[0](self.norms[0](x), self.full_memory_layer)
        x = x + self.ff(self.ff_norm(x))
        x = x + self.memory_layers[1](self.norms[1](x), self.full_memory_layer)
        return x


def _build(
    seed: int,
    *,
    hidden: int,
    knum: int,
    kdim: int,
    vdim: int,
    pre_vdim: int,
    knn: int,
    head: int,
    tucker_multihead: int,
    value_expand_time: int,
    share_ratio: float,
    config: MemConfig,
) -> TwoMemoryLayerModel:
    g = seeded(seed)
    layers = [
        UltraMemLayerV2(
            hidden,
            knum,
            kdim,
            vdim,
            pre_vdim,
            knn,
            head=head,
            tucker_multihead=tucker_multihead,
            value_expand_time=value_expand_time,
            layer_id=i,
            share_ratio=share_ratio,
            mem_layer_num=2,
            config=config,
        )
        for i in range(2)
    ]
    values = FullMemoryLayer(knum, vdim, pre_vdim, knn, head, mem_layer_num=2)
    model = TwoMemoryLayerModel(hidden, layers, values)
    for layer in layers:
        layer.reset_parameters_trained(g)
    with torch.no_grad():
        values.values_for_look_up.copy_(normal(g, *values.values_for_look_up.shape))
        if pre_vdim > 0:
            # pre-values ~ N(0, 1/pre_vdim): the gate <x Wpre, PV[row]> is of order one
            pv = values.pre_values_for_look_up
            pv.copy_(
                normal(g, *pv.shape, std=1 / math.sqrt(pre_vdim), mean=0.3 / math.sqrt(pre_vdim))
            )
        for norm in [*model.norms, model.ff_norm]:
            norm.weight.copy_(gains(g, hidden))
        for lin in (model.ff[0], model.ff[2]):
            lin.weight.copy_(fan_in(g, *lin.weight.shape, gain=0.7))
    return model.eval()


# D 64; per-layer knum 16 → R_all 512 rows, share 0.78125 → R = 400 (20²), offsets 0 and 256;
# key grid 40 × 40 = 1,600 virtual slots (E 4 groups, summed: value_expand_time 1)
v2_shared_inputs = float_inputs(64, seed=301)


@factory
def authors_v2_shared_table() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two V2 layers on one table; per-rank queries, GELU pre-value gate, E 1 (groups summed)."""
    model = _build(
        301,
        hidden=64,
        knum=16,
        kdim=32,
        vdim=32,
        pre_vdim=16,
        knn=8,
        head=2,
        tucker_multihead=2,
        value_expand_time=1,
        share_ratio=0.78125,
        config=MemConfig(mem_q_for_each_tucker_rank=True, mem_use_glu_act=True),
    )
    return model, v2_shared_inputs(2, 16)


# D 48; per-layer knum 12 → R_all 288, share 0.5 → R = 144 (12²), offsets 0 and 144 (no
# overlap); key grid 24 × 24 = 576 virtual slots, E 4 groups projected side by side
v2_expand_inputs = float_inputs(48, seed=302)


@factory
def authors_v2_expand_plain_gate() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two V2 layers on one table; one shared query per side, linear gate, E 4, 1 core."""
    model = _build(
        302,
        hidden=48,
        knum=12,
        kdim=24,
        vdim=24,
        pre_vdim=8,
        knn=12,
        head=1,
        tucker_multihead=1,
        value_expand_time=4,
        share_ratio=0.5,
        config=MemConfig(mem_q_for_each_tucker_rank=False, mem_use_glu_act=False),
    )
    return model, v2_expand_inputs(2, 16)
