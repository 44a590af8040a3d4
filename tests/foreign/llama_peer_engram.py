"""A `transformers` Llama with PEER injected after a decoder layer (the "PEER + Engram" project).

Source read (not copied): https://github.com/MikeyBeez/PEER, `llama_peer_engram.py`
(`PEERConfig`, `LlamaPEER`, `ModifiedLlamaDecoderLayer`, `inject_peer_engram`), which loads
TinyLlama and wraps chosen decoder layers so that `hidden_states + peer(hidden_states)` is
added AFTER the original layer (attention + MLP). Habits kept:

- `LlamaPEER` keys [heads, num_keys, 2, dim_key] scored SIDE BY SIDE through slices of the
  parameter: `einsum('bthd,hkd->bthk', queries[0], self.keys[:, :, 0, :])` and the same with
  `self.keys[:, :, 1, :]`;
- queries `view(B, T, h, 2, dim_key).permute(3, 0, 1, 2, 4)` then indexed `queries[0]`,
  `queries[1]`;
- the cartesian product built with explicit `expand`s of both scores and indices, `view(B,
  T, h, k * k)`, a final `topk` and `gather`;
- two `nn.Embedding` expert tables, `einsum('btd,bthkd->bthk')`, `nn.SiLU()` ("Match Llama's
  activation"), `non_competing=True`: `hidden * F.relu(final_scores)`, then
  `einsum('bthk,bthkd->btd')`;
- the 2-D input path (`unsqueeze(0)` / `squeeze(0)`) and the wrapper's pass-through of
  every decoder-layer keyword.

The Engram half (hashed n-gram tables, `mode="hybrid"`) is not used: `mode="peer"`.
One change forced by `transformers` 5.x: the wrapper reads `outputs[0]` (4.x decoder layers
returned tuples); 5.x layers return the tensor, so `outputs[0]` would be batch row 0 and the
PEER result would be dropped; the port takes the tensor whole when it is not a tuple.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ._trained import factory, fan_in, gains, normal, private_global_rng, seeded, token_inputs


@dataclass
class PEERConfig:
    """Configuration for PEER layers"""

    num_experts: int = 16384  # 128x128 for testing, scale to 1M for real
    experts_per_head: int = 8
    num_heads: int = 4
    dim_key: int = 64
    dropout: float = 0.0
    non_competing: bool = True  # ReLU vs softmax for scores


class LlamaPEER(nn.Module):
    """
    PEER layer compatible with Llama's hidden dimensions.
    """

    def __init__(self, hidden_size: int, config: PEERConfig):
        super().__init__()
        self.hidden_size = hidden_size
        self.config = config
        self.num_keys = int(math.sqrt(config.num_experts))
        assert self.num_keys**2 == config.num_experts

        self.to_queries = nn.Linear(hidden_size, config.dim_key * config.num_heads * 2, bias=False)
        self.keys = nn.Parameter(
            torch.randn(config.num_heads, self.num_keys, 2, config.dim_key) * 0.02
        )
        self.expert_down = nn.Embedding(config.num_experts, hidden_size)
        self.expert_up = nn.Embedding(config.num_experts, hidden_size)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze_output = False
        if x.dim() == 2:
            x = x.unsqueeze(0)
            squeeze_output = True

        B, T, _D = x.shape
        h = self.config.num_heads
        k = self.config.experts_per_head
        num_keys = self.num_keys

        queries = self.to_queries(x)  # [B, T, h * dim_key * 2]
        queries = queries.view(B, T, h, 2, self.config.dim_key)
        queries = queries.permute(3, 0, 1, 2, 4)  # [2, B, T, h, dim_key]

        sim1 = torch.einsum("bthd,hkd->bthk", queries[0], self.keys[:, :, 0, :])
        sim2 = torch.einsum("bthd,hkd->bthk", queries[1], self.keys[:, :, 1, :])

        scores1, idx1 = sim1.topk(k, dim=-1)
        scores2, idx2 = sim2.topk(k, dim=-1)

        idx1_exp = idx1.unsqueeze(-1).expand(-1, -1, -1, -1, k)
        idx2_exp = idx2.unsqueeze(-2).expand(-1, -1, -1, k, -1)
        scores1_exp = scores1.unsqueeze(-1).expand(-1, -1, -1, -1, k)
        scores2_exp = scores2.unsqueeze(-2).expand(-1, -1, -1, k, -1)

        all_indices = (idx1_exp * num_keys + idx2_exp).view(B, T, h, k * k)
        all_scores = (scores1_exp + scores2_exp).view(B, T, h, k * k)

        final_scores, pk_idx = all_scores.topk(k, dim=-1)
        final_indices = all_indices.gather(-1, pk_idx)

        weights_down = self.expert_down(final_indices)  # [B, T, h, k, D]
        weights_up = self.expert_up(final_indices)

        hidden = torch.einsum("btd,bthkd->bthk", x, weights_down)
        hidden = self.activation(hidden)
        hidden = self.dropout(hidden)

        if self.config.non_competing:
            hidden = hidden * F.relu(final_scores)
        else:
            hidden = hidden * F.softmax(final_scores, dim=-1)

        output = torch.einsum("bthk,bthkd->btd", hidden, weights_up)
        if squeeze_output:
            output = output.squeeze(0)
        return output


class ModifiedLlamaDecoderLayer(nn.Module):
    """
    Wrapper that adds PEER/Engram to an existing Llama decoder layer.
    """

    def __init__(
        self, original_layer: nn.Module, hidden_size: int, layer_idx: int, mode: str, peer_config
    ):
        super().__init__()
        self.original_layer = original_layer
        self.layer_idx = layer_idx
        self.mode = mode
        self.hidden_size = hidden_size
        self.peer = None
        self.engram = None
        if mode in ["peer", "hybrid"] and peer_config is not None:
            self.peer = LlamaPEER(hidden_size, peer_config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        outputs = self.original_layer(
            hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        # source: hidden_states = outputs[0]  (transformers 4.x tuples)
        hidden_states = outputs[0] if isinstance(outputs, tuple) else outputs

        if self.peer is not None:
            if hidden_states.dim() == 2:
                hidden_states = hidden_states.unsqueeze(0)
            peer_out = self.peer(hidden_states)
            hidden_states = hidden_states + peer_out

        if isinstance(outputs, tuple):
            return (hidden_states, *outputs[1:])
        return hidden_states


def inject_peer(model: LlamaForCausalLM, peer_layers: list[int], peer: PEERConfig) -> None:
    layers = model.model.layers
    for idx in peer_layers:
        layers[idx] = ModifiedLlamaDecoderLayer(
            layers[idx], model.config.hidden_size, idx, "peer", peer_config=peer
        )


class CausalLMLogits(nn.Module):
    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


VOCAB = 128


def _retrain(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("peer.keys"):
                p.copy_(normal(g, *p.shape, std=1 / math.sqrt(p.shape[-1])))
            elif name.endswith("expert_down.weight"):
                p.copy_(fan_in(g, *p.shape, gain=2.0))
            elif name.endswith(("expert_up.weight", "embed_tokens.weight")):
                p.copy_(normal(g, *p.shape, std=0.5))
            elif name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(gains(g, p.shape[0]))
            elif name.endswith("to_queries.weight"):
                # the queries read a residual stream of RMS ~1: unit-scale per-side scores
                p.copy_(fan_in(g, *p.shape, gain=1.0))
            elif p.ndim == 2:
                gain = 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(fan_in(g, *p.shape, gain=gain))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))


# Llama: 3 layers, D 64, 4/2 heads; PEER after layers 1 and 2: 32 x 32 experts (128²),
# 8 per head, 4 heads, dim_key 16 (64)
llama_peer_inputs = token_inputs(VOCAB, seed=765)


@factory
def llama_peer_sliced_keys() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with private_global_rng():
        lm = LlamaForCausalLM(config)
        inject_peer(
            lm, [1, 2], PEERConfig(num_experts=1024, experts_per_head=8, num_heads=4, dim_key=16)
        )
    _retrain(lm, seeded(761))
    return CausalLMLogits(lm).eval(), llama_peer_inputs(2, 16)
