"""Memory layers whose code pins a dimension, so a fully dynamic capture is refused.

Real code pins shapes in several ways, each seen differently by `torch.export`:

- `FixedLengthMemoryClassifier`: a fixed-length encoder (absolute position table of
  exactly `seq_len` rows added without slicing) that guards its input with
  `assert x.shape[1] == self.seq_len` — tokens specialise to 16, batch stays free;
- `StaticBatchProductKeyMemory`: a memory written for one serving shape, reshaping with
  `x.view(self.batch_size, self.seq_len, ...)` from `__init__` — batch AND tokens
  specialise (2, 16);
- `xlm-len-pinned`: XLM's memory exactly as written, `bs = len(query)`: `len()` of a
  tensor needs a Python int, so the flattened B·T becomes a hidden runtime guard
  (`B·T == 32`): the dynamic export does NOT raise, the exported program rejects every
  other B·T — the silent kind of pin;
- `PositionTableMemoryLM` (not pinned): a learned position table of 32 rows sliced with
  `self.pos[:t]` — any length up to 32 works, so the capture is dynamic with
  `max_tokens = 32`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._trained import (
    factory,
    fan_in,
    float_inputs,
    gains,
    normal,
    private_global_rng,
    seeded,
    token_inputs,
)
from .xlm_hashing import HashingMemoryProductFast, retrain_xlm_memory, xlm_params


@dataclass(frozen=True)
class Pin:
    """How a case pins shapes: what eager accepts, and how a dynamic capture fails."""

    batch: int | None  # the only batch the eager forward accepts (None: any)
    tokens: int | None  # the only token count the eager forward accepts (None: any)
    capture: str  # "raises": a dynamic export raises; "guard": it succeeds, the program
    # then rejects other shapes at run time


class ProductKeyMemory(nn.Module):
    """A plain PKM read (Lample et al. 2019): queries per head, additive grid, softmax."""

    def __init__(self, dim: int, heads: int, n_keys: int, k_dim: int, knn: int) -> None:
        super().__init__()
        self.heads, self.n_keys, self.k_dim, self.knn = heads, n_keys, k_dim, knn
        self.query = nn.Linear(dim, heads * 2 * k_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))

    def read(self, q: torch.Tensor) -> torch.Tensor:
        # q [T, heads, 2, k_dim] -> [T, dim]
        s = torch.einsum("thsd,hsnd->thsn", q, self.keys)
        top, idx = s.topk(self.knn, dim=-1)  # [T, h, 2, knn]
        grid = (top[:, :, 0, :, None] + top[:, :, 1, None, :]).flatten(2)
        slots = (idx[:, :, 0, :, None] * self.n_keys + idx[:, :, 1, None, :]).flatten(2)
        best, pos = grid.topk(self.knn, dim=-1)
        chosen = slots.gather(-1, pos)
        w = best.softmax(dim=-1)
        return torch.einsum("thk,thkd->td", w, self.values[chosen])

    def retrain(self, g: torch.Generator) -> None:
        with torch.no_grad():
            self.query.weight.copy_(fan_in(g, *self.query.weight.shape))
            self.query.bias.copy_(normal(g, *self.query.bias.shape, std=0.1))
            self.keys.copy_(normal(g, *self.keys.shape, std=1 / math.sqrt(self.k_dim)))
            self.values.copy_(normal(g, *self.values.shape, std=0.5))


class FixedLengthMemoryClassifier(nn.Module):
    """Fixed-length encoder: `assert x.shape[1] == self.seq_len`, position table added whole."""

    def __init__(self, dim: int, seq_len: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.pos = nn.Parameter(torch.empty(seq_len, dim))
        self.norm = nn.LayerNorm(dim)
        self.memory = ProductKeyMemory(dim, heads=2, n_keys=32, k_dim=16, knn=8)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.seq_len, f"expected {self.seq_len} tokens, got {x.shape[1]}"
        h = self.norm(x + self.pos)
        b, t, d = h.shape
        q = self.memory.query(h).view(b * t, self.memory.heads, 2, self.memory.k_dim)
        h = h + self.memory.read(q).view(b, t, d)
        return self.out(h)


class StaticBatchProductKeyMemory(nn.Module):
    """A memory written for one serving shape: views with the batch and length of __init__."""

    def __init__(self, dim: int, batch_size: int, seq_len: int) -> None:
        super().__init__()
        self.dim, self.batch_size, self.seq_len = dim, batch_size, seq_len
        self.memory = ProductKeyMemory(dim, heads=4, n_keys=24, k_dim=16, knn=6)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.view(self.batch_size * self.seq_len, self.dim)
        q = self.memory.query(tokens).view(self.batch_size * self.seq_len, 4, 2, 16)
        read = self.memory.read(q).view(self.batch_size, self.seq_len, self.dim)
        return x + F.silu(self.gate(x)) * read


class PositionTableMemoryLM(nn.Module):
    """Token LM with a learned position table of `max_len` rows, sliced to the input length."""

    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.empty(max_len, dim))
        self.norm = nn.LayerNorm(dim)
        self.memory = ProductKeyMemory(dim, heads=2, n_keys=32, k_dim=16, knn=8)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.embed(ids) + self.pos[:t]
        q = self.memory.query(self.norm(h)).reshape(b * t, 2, 2, 16)
        h = h + self.memory.read(q).reshape(b, t, -1)
        return self.head(h)


def _retrain_rest(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("memory."):
                continue
            if name.endswith("norm.weight"):
                p.copy_(gains(g, p.shape[0]))
            elif name in ("pos", "embed.weight"):
                p.copy_(normal(g, *p.shape, std=0.5 if name == "pos" else 1.0))
            elif p.ndim == 2:
                p.copy_(fan_in(g, *p.shape))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))


SEQ_LEN = 16
_fixed_inputs = float_inputs(64, seed=801)


def fixed_length_inputs(batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """Any batch, exactly 16 tokens."""
    if tokens != SEQ_LEN:
        raise ValueError(f"pinned-seq-len-assert takes exactly {SEQ_LEN} tokens, not {tokens}")
    return _fixed_inputs(batch, tokens)


@factory
def pinned_seq_len_assert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """PKM (2 heads, 32 × 32 keys, k 8) in a fixed-length encoder asserting 16 tokens."""
    g = seeded(806)
    model = FixedLengthMemoryClassifier(64, SEQ_LEN)
    model.memory.retrain(g)
    _retrain_rest(model, g)
    return model.eval(), fixed_length_inputs(2, SEQ_LEN)


STATIC_BATCH = 2
_static_inputs = float_inputs(64, seed=802)


def static_batch_inputs(batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """Only batch 2 × 16 tokens."""
    if (batch, tokens) != (STATIC_BATCH, SEQ_LEN):
        raise ValueError(f"pinned-batch-and-tokens-view takes only ({STATIC_BATCH}, {SEQ_LEN})")
    return _static_inputs(batch, tokens)


@factory
def pinned_batch_and_tokens_view() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """PKM (4 heads, 24 × 24 keys, k 6) viewing with batch 2 and 16 tokens from __init__."""
    g = seeded(802)
    model = StaticBatchProductKeyMemory(64, STATIC_BATCH, SEQ_LEN)
    model.memory.retrain(g)
    _retrain_rest(model, g)
    return model.eval(), static_batch_inputs(STATIC_BATCH, SEQ_LEN)


class HashingMemoryAsWritten(HashingMemoryProductFast):
    """XLM's `get_indices` with its `len(query)` (the rest as in `xlm_hashing.py`)."""

    def get_indices(self, query: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert query.dim() == 2 and query.size(1) == self.k_dim
        bs = len(query)
        query = query.view(-1, self.heads, self.k_dim)
        outputs = [
            self._get_indices(query[:, i], knn, self.keys[i][0], self.keys[i][1])
            for i in range(self.heads)
        ]
        scores = torch.cat([s.unsqueeze(1) for s, _ in outputs], 1).view(bs, knn)
        indices = torch.cat([idx.unsqueeze(1) for _, idx in outputs], 1).view(bs, knn)
        return scores, indices


xlm_len_inputs = float_inputs(64, seed=803)


@factory
def xlm_len_pinned() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """XLM memory (4 heads, 32 × 32 keys, k 8, BN) with `len(query)` as XLM writes it."""
    params = xlm_params(
        mem_k_dim=64, mem_heads=4, mem_knn=8, mem_n_keys=32, mem_query_batchnorm=True
    )
    with private_global_rng():
        mem = HashingMemoryAsWritten(64, 64, params)
    retrain_xlm_memory(mem, seeded(814), xlm_len_inputs(4, 16)[0])
    return mem.eval(), xlm_len_inputs(2, 16)


MAX_LEN = 32
POS_VOCAB = 80
position_inputs = token_inputs(POS_VOCAB, seed=804)


@factory
def position_table_lm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """PKM (2 heads, 32 × 32 keys, k 8) in an LM with a 32-row position table."""
    g = seeded(804)
    model = PositionTableMemoryLM(POS_VOCAB, 64, MAX_LEN)
    model.memory.retrain(g)
    _retrain_rest(model, g)
    return model.eval(), position_inputs(2, 16)


#: the cases of this file whose capture is pinned, and how
PINNED: dict[str, Pin] = {
    "pinned-seq-len-assert": Pin(batch=None, tokens=SEQ_LEN, capture="raises"),
    "pinned-batch-and-tokens-view": Pin(batch=STATIC_BATCH, tokens=SEQ_LEN, capture="raises"),
    "pinned-xlm-len": Pin(batch=None, tokens=None, capture="guard"),
}
