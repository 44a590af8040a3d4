"""A Hugging Face `LlamaForCausalLM` with memory layers in the MLP slots of some layers.

What a user of `transformers` does to try memory layers: build a tiny model from a
`LlamaConfig` (no download: `HF_HUB_OFFLINE=1`, nothing is fetched), replace
`model.model.layers[i].mlp` with a memory module, and export a wrapper whose
`forward(input_ids)` calls the model with `use_cache=False` and returns the logits.

Two memory modules, in two different hands:

- `LlamaProductKeyMemoryMLP`, written the way `transformers` modelling code is written
  (config-driven, `ACT2FN`, the model's own `LlamaRMSNorm` on the query halves, one
  einsum into [b, t, h, 2, n] then `unbind`, `nn.functional.softmax(..., dtype=float32)`,
  `nn.Embedding` read at the selected slots and a weighted sum over heads and slots), whose
  read is gated like the Llama MLP it replaces: `down_proj(act(gate_proj(x)) * read)`;
- the paper authors' `UltraMemLayerV1` (from `authors_v1.py`) in another slot.

The rest of the graph is stock `transformers` 5.x Llama: rotary embeddings, SDPA
attention with GQA, the causal-mask machinery, RMSNorm, an untied lm_head.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ._trained import (
    factory,
    fan_in,
    gains,
    normal,
    private_global_rng,
    seeded,
    token_inputs,
)
from .authors_v1 import UltraMemLayerV1


class LlamaProductKeyMemoryMLP(nn.Module):
    """Product-key memory in a Llama MLP slot, in `transformers` style."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.memory_num_heads
        self.num_keys = config.memory_num_keys
        self.key_dim = config.memory_key_dim
        self.top_k = config.memory_top_k
        self.value_dim = config.memory_value_dim

        self.query_proj = nn.Linear(self.hidden_size, self.num_heads * 2 * self.key_dim, bias=False)
        self.query_norm = LlamaRMSNorm(self.key_dim, eps=config.rms_norm_eps)
        self.sub_keys = nn.Parameter(torch.empty(self.num_heads, 2, self.num_keys, self.key_dim))
        self.values = nn.Embedding(self.num_keys * self.num_keys, self.value_dim)
        self.gate_proj = nn.Linear(self.hidden_size, self.value_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.value_dim, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = hidden_states.shape
        query = self.query_proj(hidden_states).view(bsz, seq_len, self.num_heads, 2, self.key_dim)
        query = self.query_norm(query)

        sub_scores = torch.einsum("bthpd,hpnd->bthpn", query, self.sub_keys)
        row_scores, col_scores = sub_scores.unbind(dim=-2)
        row_top, row_idx = row_scores.topk(self.top_k, dim=-1)
        col_top, col_idx = col_scores.topk(self.top_k, dim=-1)

        grid_scores = (row_top.unsqueeze(-1) + col_top.unsqueeze(-2)).flatten(-2)
        grid_slots = (row_idx.unsqueeze(-1) * self.num_keys + col_idx.unsqueeze(-2)).flatten(-2)
        top_scores, top_pos = grid_scores.topk(self.top_k, dim=-1)
        slots = grid_slots.gather(-1, top_pos)

        weights = nn.functional.softmax(top_scores, dim=-1, dtype=torch.float32).to(
            hidden_states.dtype
        )
        read = (weights.unsqueeze(-1) * self.values(slots)).sum(dim=(-3, -2))  # [b, t, value_dim]
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * read)


class LlamaLogits(nn.Module):
    """What a user exports: `input_ids -> logits`, no KV cache."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


VOCAB = 128


def tiny_llama_config() -> LlamaConfig:
    """4 layers, D 64, 4 query heads / 2 KV heads; PKM: 2 heads, 32 × 32 keys, k 8, Dv 64."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.memory_num_heads = 2
    config.memory_num_keys = 32
    config.memory_key_dim = 32
    config.memory_top_k = 8
    config.memory_value_dim = 64
    return config


def _retrain_llama(model: nn.Module, g: torch.Generator, keep: nn.Module) -> None:
    """Trained-looking weights for every parameter not in `keep` (the V1 layer has its own)."""
    kept = {id(p) for p in keep.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in kept:
                continue
            if name.endswith("sub_keys"):
                p.copy_(normal(g, *p.shape, std=1 / math.sqrt(p.shape[-1])))
            elif name.endswith(("values.weight", "embed_tokens.weight")):
                p.copy_(normal(g, *p.shape))
            elif name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(gains(g, p.shape[0]))
            elif p.ndim == 2:
                gain = 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(fan_in(g, *p.shape, gain=gain))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))


hf_inputs = token_inputs(VOCAB, seed=601)


@factory
def hf_llama_with_memories() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Llama (4 layers) with PKM-style memories in layers 1 and 3 and a V1 layer in layer 2."""
    config = tiny_llama_config()
    with private_global_rng():
        lm = LlamaForCausalLM(config)
        for i in (1, 3):
            lm.model.layers[i].mlp = LlamaProductKeyMemoryMLP(config)
        v1 = UltraMemLayerV1(64, knum=16, kdim=32, vdim=32, knn=8, head=2)
        lm.model.layers[2].mlp = v1
    v1.reset_parameters_trained(seeded(602))
    _retrain_llama(lm, seeded(601), keep=v1)
    return LlamaLogits(lm).eval(), hf_inputs(2, 16)
