"""A PKM written for `torch.compile(dynamic=True)`: shape hints with `torch._check` everywhere.

Idiom followed: PyTorch's escape hatches for dynamic shapes, `torch._check(cond, msg)` and
`torch._check_is_size(n, max=...)` (https://pytorch.org/docs/stable/generated/exportdb/
torch.dynamic-value.html, "Please look at torch._check and torch._check_is_size APIs"),
which compile-minded code bases (torchtitan, gpt-fast forks) sprinkle over `forward` so that
Dynamo/Inductor keep B and T symbolic and never recompile. The lookup itself is a plain
product-key memory in that same style: functional ops (`F.rms_norm` with a bare weight
Parameter, `F.embedding_bag`, `F.softmax(..., dtype=torch.float32)`), `unflatten` instead
of `view`, one einsum over both sides (`"thsd,hsnd->thsn"`), one `topk` over the side axis
then `unbind`, an `init_weights()` method instead of `reset_parameters`.

Every `_check` is on a shape (or a constant), so they lower to `sym_constrain_range` /
`_assert_scalar` nodes in the exported graph, not to data-dependent guards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


class ProductKeyMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        n_keys: int = 256,
        head_dim: int = 64,
        topk: int = 16,
        max_seq_len: int = 4096,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.n_heads = n_heads
        self.n_keys = n_keys
        self.head_dim = head_dim
        self.topk = topk
        self.max_seq_len = max_seq_len
        self.norm_eps = norm_eps
        self.wq = nn.Linear(dim, n_heads * 2 * head_dim, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(head_dim))
        self.keys = nn.Parameter(torch.empty(n_heads, 2, n_keys, head_dim))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))
        self.wo = nn.Linear(dim, dim, bias=False)

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.wq.weight, mean=0.0, std=0.02)
        nn.init.ones_(self.q_norm_weight)
        nn.init.normal_(self.keys, std=self.head_dim**-0.5)
        nn.init.normal_(self.values, std=self.dim**-0.5)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        torch._check_is_size(bs)
        torch._check_is_size(slen, max=self.max_seq_len)
        torch._check(dim == self.dim, lambda: f"expected hidden size {self.dim}, got {dim}")
        ntok = bs * slen
        torch._check(ntok >= 1)

        q = self.wq(x.reshape(ntok, dim)).unflatten(-1, (self.n_heads, 2, self.head_dim))
        q = F.rms_norm(q, (self.head_dim,), self.q_norm_weight, self.norm_eps)

        scores = torch.einsum("thsd,hsnd->thsn", q, self.keys)  # (ntok, heads, 2, n_keys)
        torch._check(self.topk <= scores.size(-1))
        top_scores, top_ids = scores.topk(self.topk, dim=-1)
        torch._check(top_ids.size(-1) == self.topk)
        s_row, s_col = top_scores.unbind(2)
        i_row, i_col = top_ids.unbind(2)

        grid = (s_row.unsqueeze(-1) + s_col.unsqueeze(-2)).flatten(-2)
        ids = (i_row.unsqueeze(-1) * self.n_keys + i_col.unsqueeze(-2)).flatten(-2)
        best, pos = grid.topk(self.topk, dim=-1)
        slots = ids.gather(-1, pos)  # (ntok, heads, topk)
        torch._check(slots.size(0) == ntok)

        weights = F.softmax(best, dim=-1, dtype=torch.float32).to(x.dtype)
        out = F.embedding_bag(
            slots.flatten(1), self.values, per_sample_weights=weights.flatten(1), mode="sum"
        )
        torch._check(out.size(0) == ntok)
        return self.wo(out).view(bs, slen, dim)


class MemoryTransformerBlock(nn.Module):
    def __init__(self, dim: int, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.dim() == 3)
        return x + self.memory(self.ffn_norm(x))


# dim 64, 4 heads, 32 x 32 keys (256²), head_dim 16 (64), top-8 (16)
check_inputs = float_inputs(64, seed=769)


@factory
def compile_checks_pkm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(751)
    mem = ProductKeyMemory(64, n_heads=4, n_keys=32, head_dim=16, topk=8)
    mem.init_weights()  # then overwritten with trained-looking values
    block = MemoryTransformerBlock(64, mem)
    with torch.no_grad():
        block.ffn_norm.weight.copy_(gains(g, 64))
        mem.wq.weight.copy_(fan_in(g, *mem.wq.weight.shape))
        mem.q_norm_weight.copy_(gains(g, 16))
        mem.keys.copy_(normal(g, *mem.keys.shape, std=1 / math.sqrt(16)))
        mem.values.copy_(normal(g, *mem.values.shape, std=0.5))
        mem.wo.weight.copy_(fan_in(g, 64, 64))
    return block.eval(), check_inputs(2, 16)
