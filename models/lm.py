"""A small decoder-only language model with UltraMem layers.

Placement follows the paper: a memory layer reads the (normalised) input of block
``src`` and its output is added to the residual stream at the end of block ``dst``;
``dst > src`` is the skip-layer placement that lets memory reads overlap with compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LMConfig
from .ultramem import UltraMemLayer


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, d = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, cfg.n_heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UltraMemLM(nn.Module):
    """``tokens [B, L] (int64) -> logits [B, L, vocab]``."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.memory_norms = nn.ModuleDict(
            {str(src): nn.LayerNorm(cfg.d_model) for src in cfg.memory_layers}
        )
        self.memories = nn.ModuleDict(
            {str(src): UltraMemLayer(cfg.memory, seed=src) for src in cfg.memory_layers}
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        seq = tokens.shape[1]
        positions = torch.arange(seq, device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        pending: dict[int, list[Tensor]] = {}
        for i, block in enumerate(self.blocks):
            dst = self.cfg.memory_layers.get(i)
            if dst is not None:
                mem_out = self.memories[str(i)](self.memory_norms[str(i)](x))
                pending.setdefault(dst, []).append(mem_out)
            x = block(x)
            for mem_out in pending.pop(i, []):
                x = x + mem_out
        return self.head(self.norm(x))
