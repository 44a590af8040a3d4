"""A Memory+ layer from fine-tuning code that scores EVERY slot: the exhaustive n × n grid.

Source read (not copied): https://github.com/Satgoy152/finetuningmemorylayers,
`qwen_mem/memory_layer.py` (`MemoryPlus`, bolted onto Qwen2.5-0.5B for fine-tuning). That
code keeps one flat key per slot, takes the cosine similarity of the query to ALL keys
(`F.normalize` on both, `matmul(q_norm, k_norm.t())`), one `topk`, a softmax, plain
indexing `self.values[topk_idx]`, `(weights.unsqueeze(-1) * mem_vals).sum(dim=-2)`, and the
Memory+ output `out_proj(mem_out * silu(gate_proj(x)))`.

Here the slots are product keys (Memory+'s two half-key tables, so the layer is a
product-key memory a fine-tuner would load from a Memory+ checkpoint), and the fine-tuning
code keeps its exhaustive habit: it forms the FULL n × n grid of row + column cosine scores
(`s_row[..., :, None] + s_col[..., None, :]`, flattened) and takes ONE top-k over all n²
slots, with no per-side top-m. Memory+ has several heads (own query, own key tables, one
shared value table); the fine-tuning code loops over them in Python, each head scoring its
own full grid, and sums their reads. It sits in a Qwen2-style block (RMSNorm before,
residual after), in the MLP's place.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


class ProductKeyMemoryPlus(nn.Module):
    """
    Memory+ layer with product keys, scored exhaustively.

    Args:
        d_model: model hidden size (896 for Qwen2.5-0.5B)
        n_keys:  keys per side (n_keys ** 2 memory slots)
        d_key:   key dimension (both halves)
        d_value: value dimension (usually = d_model)
        k:       top-k memories per token (per head)
        n_heads: memory heads (Memory+ uses 4), each with its own key tables and query
    """

    def __init__(
        self,
        d_model: int,
        n_keys: int = 128,
        d_key: int = 256,
        d_value: int | None = None,
        k: int = 32,
        n_heads: int = 2,
    ):
        super().__init__()
        if d_value is None:
            d_value = d_model

        self.d_model = d_model
        self.d_key = d_key
        self.d_value = d_value
        self.n_keys = n_keys
        self.n_mem = n_keys * n_keys
        self.k = k
        self.n_heads = n_heads

        # Trainable memory keys (two halves per head) / values (shared by the heads)
        self.keys_row = nn.Parameter(torch.randn(n_heads, n_keys, d_key // 2) * 0.02)
        self.keys_col = nn.Parameter(torch.randn(n_heads, n_keys, d_key // 2) * 0.02)
        self.values = nn.Parameter(torch.randn(self.n_mem, d_value) * 0.02)

        # Query and gating / output projections (Memory+ style)
        self.q_proj = nn.Linear(d_model, n_heads * d_key, bias=False)
        self.gate_proj = nn.Linear(d_model, d_value, bias=False)
        self.out_proj = nn.Linear(d_value, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        x: [B, S, d_model]
        returns: [B, S, d_model]
        """
        B, S, _D = x.shape

        # Project tokens to queries: one query per head, one half per key table
        queries = self.q_proj(x).chunk(self.n_heads, dim=-1)  # n_heads x [B, S, d_key]

        mem_out = 0
        for h in range(self.n_heads):
            q_row, q_col = queries[h].chunk(2, dim=-1)

            # Cosine similarity of each half to all of its keys
            k_row = F.normalize(self.keys_row[h], dim=-1)
            k_col = F.normalize(self.keys_col[h], dim=-1)
            s_row = torch.matmul(F.normalize(q_row, dim=-1), k_row.t())  # [B, S, n_keys]
            s_col = torch.matmul(F.normalize(q_col, dim=-1), k_col.t())

            # Score every slot (row i, col j) -> [B, S, n_keys * n_keys]
            sims = (s_row[..., :, None] + s_col[..., None, :]).reshape(B, S, self.n_mem)

            # Top-k memory slots over the whole grid
            topk_vals, topk_idx = sims.topk(self.k, dim=-1)  # [B, S, k]
            weights = F.softmax(topk_vals, dim=-1)  # [B, S, k]

            # Gather values and do weighted sum (heads summed)
            mem_vals = self.values[topk_idx]  # [B, S, k, d_value]
            mem_out = mem_out + (weights.unsqueeze(-1) * mem_vals).sum(dim=-2)

        # Memory+ gating and projection back to d_model
        gate = F.silu(self.gate_proj(x))
        return self.out_proj(mem_out * gate)


class Qwen2MemoryBlock(nn.Module):
    """The MLP half of a Qwen2 decoder layer with the MLP swapped for the memory."""

    def __init__(self, d_model: int, memory: ProductKeyMemoryPlus) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp = memory

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


# d_model 64 (896), 2 heads of 32 x 32 product keys = 1,024 slots (flat 10,000), d_key 32
# (256), k 8 (32)
exhaustive_inputs = float_inputs(64, seed=719)


@factory
def memory_plus_exhaustive_grid() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(711)
    mem = ProductKeyMemoryPlus(64, n_keys=32, d_key=32, k=8, n_heads=2)
    block = Qwen2MemoryBlock(64, mem)
    with torch.no_grad():
        block.post_attention_layernorm.weight.copy_(gains(g, 64))
        mem.keys_row.copy_(normal(g, 2, 32, 16))
        mem.keys_col.copy_(normal(g, 2, 32, 16))
        mem.values.copy_(normal(g, *mem.values.shape, std=0.5))
        mem.q_proj.weight.copy_(fan_in(g, 64, 64))
        mem.gate_proj.weight.copy_(fan_in(g, 64, 64))
        mem.out_proj.weight.copy_(fan_in(g, 64, 64))
    return block.eval(), exhaustive_inputs(2, 16)
