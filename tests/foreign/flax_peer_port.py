"""A JAX/Flax (linen) port of PEER, translated back to PyTorch op for op.

Source read (not copied): a public Flax port of lucidrains/PEER-pytorch on GitHub
(`rearrange_b_n_p_h_d`, `RMSNorm`, `ProductKeyMemory`, `PEER`, `TransformerBlock`,
`PEERLanguageModel`; the search index that served it did not name its repository). Habits
kept, each turned into its torch equivalent:

- einops replaced by hand-written reshape helpers (`reshape(b, n, p, h, d)` then
  `transpose(2, 0, 1, 3, 4)`), `jnp.einsum('pbnhd,hkpd->pbnhk', ...)`;
- `jax.lax.top_k` per product side in a list comprehension, `jnp.take_along_axis`
  (`torch.take_along_dim`), `jnp.take(table, idx, axis=0)` (`torch.index_select` on the
  flattened ids);
- linen defaults: `nn.gelu` is the tanh approximation, `nn.LayerNorm` has epsilon 1e-6,
  `nn.BatchNorm(use_running_average=True)` epsilon 1e-5, `nn.Embed` for tokens and a
  512-row position table read at `arange(s)`, `MultiHeadDotProductAttention` with biased
  q/k/v/out projections (no causal mask);
- `x = to_queries(x)` OVERWRITES the input, so the experts' down projection reads the
  BatchNorm'd query features, not the block input (the shapes only agree with 1 head,
  dim_key = dim // 2, the defaults the port's `TransformerBlock` ends up with);
- each block runs two PEERs in a row: `peer2(gelu(peer1(x)))`.

The port as published has two more bugs, kept in `position_bug=True` (the look-alike case):
`(scores_x, scores_y), (indices_x, indices_y) = [top_k(s, k) for s in sim]` unpacks
(values, indices) pairs the wrong way round (so "scores_y" are the x side's integer key ids
and "indices_x" the y side's scores), and the expert tables are read at `pk_indices` (the
positions in the k × k candidate grid) instead of the gathered slot ids. The memory case
(`position_bug=False`) uses the port as its author would fix it: pairs unpacked per side,
tables read at the slot ids.

`jnp.take_along_axis` becomes `torch.take_along_dim`, with which torch 2.13's export
specialises batch and tokens: only a static capture succeeds (as for any port keeping it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded, token_inputs


def rearrange_b_n_p_h_d(x, p, h):
    """[batch_size, seq_len, p * h * dim] -> [p, batch_size, seq_len, h, dim]"""
    batch_size, seq_len, _ = x.shape
    dim = x.shape[-1] // (p * h)
    x = x.reshape(batch_size, seq_len, p, h, dim)
    return x.permute(2, 0, 1, 3, 4)


def flax_gelu(x):
    return F.gelu(x, approximate="tanh")


class FlaxBatchNorm(nn.Module):
    """linen.BatchNorm(use_running_average=True, axis=-1): batch_stats + scale/bias params."""

    def __init__(self, features: int, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.scale = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))

    def forward(self, x):
        return (x - self.mean) * torch.rsqrt(self.var + self.epsilon) * self.scale + self.bias


class PEER(nn.Module):
    def __init__(
        self,
        dim,
        heads=8,
        num_experts=1_000_000,
        num_experts_per_head=16,
        dim_key=None,
        product_key_topk=None,
        position_bug=False,
    ):
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.num_experts = num_experts
        self.position_bug = position_bug
        self.weight_down_embed = nn.Parameter(torch.empty(num_experts, dim))
        self.weight_up_embed = nn.Parameter(torch.empty(num_experts, dim))
        assert (num_experts**0.5).is_integer(), "`num_experts` needs to be a square"
        self.dim_key = dim_key if dim_key is not None else dim // 2
        self.num_keys = int(num_experts**0.5)
        self.to_queries_dense = nn.Linear(dim, self.dim_key * heads * 2, bias=False)
        self.to_queries_bn = FlaxBatchNorm(self.dim_key * heads * 2)
        self.product_key_topk = product_key_topk or num_experts_per_head
        self.num_experts_per_head = self.product_key_topk
        self.keys = nn.Parameter(torch.empty(heads, self.num_keys, 2, self.dim_key))

    def forward(self, x):
        x = self.to_queries_bn(self.to_queries_dense(x))  # to_queries(x); Dropout deterministic
        queries = rearrange_b_n_p_h_d(x, p=2, h=self.heads)

        sim = torch.einsum("pbnhd,hkpd->pbnhk", queries, self.keys)
        if self.position_bug:
            (scores_x, scores_y), (indices_x, indices_y) = [
                s.topk(self.product_key_topk, dim=-1) for s in sim
            ]
        else:
            (scores_x, indices_x), (scores_y, indices_y) = [
                s.topk(self.product_key_topk, dim=-1) for s in sim
            ]

        all_scores = scores_x[..., None] + scores_y[..., None, :]
        all_indices = indices_x[..., None] * self.num_keys + indices_y[..., None, :]
        all_scores = all_scores.reshape(*all_scores.shape[:-2], -1)
        all_indices = all_indices.reshape(*all_indices.shape[:-2], -1)

        scores, pk_indices = all_scores.topk(self.num_experts_per_head, dim=-1)
        indices = torch.take_along_dim(all_indices, pk_indices, dim=-1)

        read_at = pk_indices if self.position_bug else indices
        flat = read_at.reshape(-1)
        weights_down = torch.index_select(self.weight_down_embed, 0, flat)
        weights_down = weights_down.reshape(*read_at.shape, self.dim)
        weights_up = torch.index_select(self.weight_up_embed, 0, flat).reshape(
            *read_at.shape, self.dim
        )

        x = torch.einsum("bnd,bnhkd->bnhk", x, weights_down)
        x = flax_gelu(x)
        x = x * torch.softmax(scores, dim=-1)
        return torch.einsum("bnhk,bnhkd->bnd", x, weights_up)


class MultiHeadDotProductAttention(nn.Module):
    """linen.MultiHeadDotProductAttention(num_heads)(x, x, x), deterministic, no mask."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, inputs_q, inputs_k, inputs_v):
        b, n, _ = inputs_q.shape
        q = self.query(inputs_q).reshape(b, n, self.num_heads, self.head_dim)
        k = self.key(inputs_k).reshape(b, n, self.num_heads, self.head_dim)
        v = self.value(inputs_v).reshape(b, n, self.num_heads, self.head_dim)
        q = q / math.sqrt(self.head_dim)
        attn = torch.softmax(torch.einsum("...qhd,...khd->...hqk", q, k), dim=-1)
        y = torch.einsum("...hqk,...khd->...qhd", attn, v)
        return self.out(y.reshape(b, n, -1))


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, num_experts, num_experts_per_head):
        super().__init__()
        self.attn = MultiHeadDotProductAttention(dim, num_heads)
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.peer1 = PEER(
            dim, heads=num_heads, num_experts=num_experts, num_experts_per_head=num_experts_per_head
        )
        self.peer2 = PEER(
            dim, heads=num_heads, num_experts=num_experts, num_experts_per_head=num_experts_per_head
        )
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = x + self.attn(x, x, x)
        x = self.ln1(x)
        peer_output1 = self.peer1(x)
        peer_output2 = self.peer2(flax_gelu(peer_output1))
        x = x + peer_output2
        return self.ln2(x)


class PEERLanguageModel(nn.Module):
    def __init__(self, vocab_size, dim, num_layers, num_heads, num_experts, top_k):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(512, dim)
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, num_heads, num_experts, top_k) for _ in range(num_layers)]
        )
        self.ln_f = nn.LayerNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab_size)

    def forward(self, x):
        _b, s = x.shape
        positions = torch.arange(s, device=x.device)[None, :]
        x = self.token_embedding(x) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _retrain_peer(peer: PEER, g: torch.Generator, calibration: torch.Tensor) -> None:
    with torch.no_grad():
        peer.to_queries_dense.weight.copy_(fan_in(g, *peer.to_queries_dense.weight.shape))
        q = peer.to_queries_dense(calibration.reshape(-1, peer.dim))
        bn = peer.to_queries_bn
        bn.mean.copy_(q.mean(0) + 0.1)
        bn.var.copy_(q.var(0) * (1.2 + torch.rand(q.shape[1], generator=g)))
        bn.scale.copy_(gains(g, q.shape[1], spread=0.25))
        bn.bias.copy_(normal(g, q.shape[1], std=0.1))
        peer.keys.copy_(normal(g, *peer.keys.shape, std=1 / math.sqrt(peer.dim_key)))
        peer.weight_down_embed.copy_(fan_in(g, *peer.weight_down_embed.shape, gain=1.5))
        peer.weight_up_embed.copy_(normal(g, *peer.weight_up_embed.shape, std=0.5))


VOCAB = 96

# vocab 96, dim 64, 1 layer, 1 head (heads = the attention's num_heads), 32 x 32 experts
# (1M), 8 per head (16), dim_key 32 (dim // 2)
flax_lm_inputs = token_inputs(VOCAB, seed=785)


@factory
def flax_peer_language_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(781)
    model = PEERLanguageModel(VOCAB, 64, num_layers=1, num_heads=1, num_experts=1024, top_k=8)
    with torch.no_grad():
        model.token_embedding.weight.copy_(normal(g, VOCAB, 64))
        model.position_embedding.weight.copy_(normal(g, 512, 64, std=0.3))
        for name, p in model.named_parameters():
            if ".peer" in name or "embedding" in name:
                continue
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(gains(g, p.shape[0]))
            elif p.dim() == 2:
                p.copy_(fan_in(g, *p.shape))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))
        block = model.blocks[0]
        # calibrate each PEER's BatchNorm on what reaches it
        x = model.token_embedding(flax_lm_inputs(4, 16)[0]) + model.position_embedding.weight[:16]
        x = block.ln1(x + block.attn(x, x, x))
    _retrain_peer(block.peer1, g, x)
    with torch.no_grad():
        h = flax_gelu(block.peer1(x))
    _retrain_peer(block.peer2, g, h)
    return model.eval(), flax_lm_inputs(2, 16)


class ResidualPEER(nn.Module):
    def __init__(self, dim: int, peer: PEER) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.peer = peer

    def forward(self, x):
        return x + self.peer(self.norm(x))


# dim 48, 1 head, 24 x 24 experts, 6 per head, dim_key 24
position_bug_inputs = float_inputs(48, seed=782)


@factory
def flax_peer_position_bug() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(782)
    peer = PEER(48, heads=1, num_experts=576, num_experts_per_head=6, position_bug=True)
    model = ResidualPEER(48, peer)
    with torch.no_grad():
        model.norm.weight.copy_(gains(g, 48))
        model.norm.bias.copy_(normal(g, 48, std=0.05))
        x = model.norm(position_bug_inputs(4, 16)[0])
    _retrain_peer(peer, g, x)
    return model.eval(), position_bug_inputs(2, 16)
