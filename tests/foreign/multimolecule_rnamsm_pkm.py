"""RNA-MSM (an MSA transformer for RNA) with its registered "pkm" layer: PKM in a biology code base.

Source read (not copied): https://github.com/DLS5-Omics/multimolecule,
`multimolecule/models/rnamsm/modeling_rnamsm.py` (`RnaMsmEmbeddings`, `RnaMsmEncoder`,
`RnaMsmAxialLayer`, `RowSelfAttention`, `ColumnSelfAttention`, `NormalizedResidualBlock`,
and `@layer_registry.register("pkm") class RnaMsmPkmLayer`, which wraps
`product_key_memory.PKM` — here the real package, product-key-memory==0.3.0). Habits kept:

- the MSA layout: embeddings [B, R, C, D] (R alignments, C residues) permuted to
  R x C x B x D for every layer ("B x R x C x D -> R x C x B x D") and back at the end;
- `RnaMsmLearnedPositionalEmbedding` reading `position_ids + 1` ("This is a bug in the
  original implementation"), position ids multiplied by the padding mask, an MSA row
  embedding `msa_embeddings[:, :num_alignments]`, LayerNorm eps 1e-12, embeddings zeroed
  at pads;
- row attention with `einsum("rinhd,rjnhd->hnij")`, scaling divided by sqrt(num_rows),
  padded queries zeroed; column attention's single-row shortcut (`num_rows == 1`:
  `out_proj(v_proj(x))` and all-ones attention probabilities);
- the PKM layer: pre-LN row attention + residual, then `final_layer_norm`, `self.pkm(...)`,
  residual.

What the source's pkm layer cannot do as published, and how the port makes it run:
`self.final_layer_norm = nn.LayerNorm(self.hidden_size)` reads an attribute that is never
set (here `config.hidden_size`); the registry entry is never used by `RnaMsmEncoder`, which
builds only axial layers (here the encoder takes a list of layer types, axial then pkm);
and `PKM` wants [b, t, d] while the layer holds R x C x B x D, so the port flattens R·C:
the package's "b" is then the residues and its "t" the batch. The model runs on single
sequences (MSA depth R = 1, the common inference mode): `input_ids` [B, C] -> [B, 1, C].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from product_key_memory import PKM
from torch import Tensor, nn

from ._trained import factory, fan_in, gains, normal, private_global_rng, seeded


@dataclass
class RnaMsmConfig:
    vocab_size: int = 26
    hidden_size: int = 64
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    max_tokens_per_msa: int = 2**14
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    embed_positions_msa: bool = True
    layer_types: tuple[str, ...] = ("axial", "pkm")
    pkm_attention_heads: int = 4
    num_product_keys: int = 32
    pkm_topk: int = 8
    pkm_head_size: int = 16


class RnaMsmLearnedPositionalEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, *args, **kwargs):
        num_embeddings += 2
        super().__init__(num_embeddings, *args, **kwargs)
        self.max_positions = num_embeddings

    def forward(self, position_ids: Tensor) -> Tensor:
        # This is a bug in the original implementation
        positions = position_ids + 1
        return F.embedding(positions, self.weight, self.padding_idx)


class RnaMsmEmbeddings(nn.Module):
    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.max_position_embeddings = config.max_position_embeddings
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = RnaMsmLearnedPositionalEmbedding(
            self.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.register_buffer(
            "position_ids",
            torch.arange(self.max_position_embeddings).expand((1, -1)) + 1,
            persistent=False,
        )
        self.msa_embeddings = nn.Parameter(
            0.01 * torch.randn(1, self.max_position_embeddings, 1, 1)
        )
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        _, num_alignments, seq_length = input_ids.size()
        attention_mask = input_ids.ne(self.pad_token_id)
        position_ids = self.position_ids[:, :seq_length] * attention_mask.long()
        embeddings = self.word_embeddings(input_ids.long()) + self.position_embeddings(position_ids)
        embeddings = embeddings + self.msa_embeddings[:, :num_alignments]
        embeddings = self.layer_norm(embeddings)
        embeddings = (embeddings * attention_mask.unsqueeze(-1)).to(embeddings.dtype)
        return embeddings, attention_mask


class RowSelfAttention(nn.Module):
    """Compute self-attention over rows of a 2D input."""

    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = int(config.hidden_size / config.num_attention_heads)
        self.scaling = self.attention_head_size**-0.5
        self.max_tokens_per_msa = config.max_tokens_per_msa
        self.attention_shape = "hnij"
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def align_scaling(self, q):
        num_rows = q.size(0)
        return self.scaling / math.sqrt(num_rows)

    def forward(self, hidden_states, key_padding_mask=None):
        num_rows, num_cols, batch_size, hidden_size = hidden_states.size()
        scaling = self.align_scaling(hidden_states)
        shape = (num_rows, num_cols, batch_size, self.num_attention_heads, self.attention_head_size)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        q = q * scaling
        if key_padding_mask is not None:
            # Zero out any padded aligned positions - this is important since
            # we take a sum across the alignment axis.
            q = q * (1 - key_padding_mask.permute(1, 2, 0).unsqueeze(3).unsqueeze(4).to(q))
        attention_scores = torch.einsum(f"rinhd,rjnhd->{self.attention_shape}", q, k)
        if key_padding_mask is not None:
            attention_scores = attention_scores.masked_fill(
                key_padding_mask[:, 0].unsqueeze(0).unsqueeze(2), -10000
            )
        attention_probs = attention_scores.softmax(-1)
        v = self.v_proj(hidden_states).view(shape)
        context_layer = torch.einsum(f"{self.attention_shape},rjnhd->rinhd", attention_probs, v)
        context_layer = context_layer.reshape(num_rows, num_cols, batch_size, hidden_size)
        return self.out_proj(context_layer), attention_probs


class ColumnSelfAttention(nn.Module):
    """Compute self-attention over columns of a 2D input."""

    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, key_padding_mask=None):
        num_rows, num_cols, batch_size, _hidden_size = hidden_states.size()
        assert num_rows == 1  # single-sequence port: the full column path is not needed
        # if there is only 1 position, this is equivalent and doesn't break with padding
        attention_probs = torch.ones(
            self.num_attention_heads, num_cols, batch_size, num_rows, num_rows,
            device=hidden_states.device, dtype=hidden_states.dtype,
        )  # fmt: skip
        context_layer = self.out_proj(self.v_proj(hidden_states))
        return context_layer, attention_probs


class FeedForwardNetwork(nn.Module):
    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class NormalizedResidualBlock(nn.Module):
    def __init__(self, config: RnaMsmConfig, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.layer_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states, *args, **kwargs):
        residual = hidden_states
        hidden_states = self.layer_norm(hidden_states)
        outputs = self.layer(hidden_states, *args, **kwargs)
        if isinstance(outputs, tuple):
            hidden_states, *out = outputs
        else:
            hidden_states, out = outputs, []
        hidden_states = residual + hidden_states
        return (hidden_states, *out)


class RnaMsmAxialLayer(nn.Module):
    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.row_self_attention = NormalizedResidualBlock(config, RowSelfAttention(config))
        self.column_self_attention = NormalizedResidualBlock(config, ColumnSelfAttention(config))
        self.feed_forward_layer = NormalizedResidualBlock(config, FeedForwardNetwork(config))

    def forward(self, hidden_states, key_padding_mask=None):
        row_attention_output, row_attention = self.row_self_attention(
            hidden_states, key_padding_mask
        )
        col_attention_output, col_attention = self.column_self_attention(
            row_attention_output, key_padding_mask
        )
        (context_layer,) = self.feed_forward_layer(col_attention_output)
        return context_layer, col_attention, row_attention


class RnaMsmPkmLayer(nn.Module):
    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.self = RowSelfAttention(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.pkm = PKM(
            config.hidden_size,
            config.pkm_attention_heads,
            config.num_product_keys,
            config.pkm_topk,
            config.pkm_head_size,
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)  # source: self.hidden_size

    def forward(self, hidden_states, key_padding_mask=None):
        residual = hidden_states
        hidden_states = self.layer_norm(hidden_states)
        hidden_states, attention_probs = self.self(hidden_states, key_padding_mask=key_padding_mask)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.final_layer_norm(hidden_states)
        num_rows, num_cols, batch_size, hidden_size = hidden_states.size()
        hidden_states = self.pkm(hidden_states.flatten(0, 1))  # (R C) x B x D
        hidden_states = hidden_states.view(num_rows, num_cols, batch_size, hidden_size)
        hidden_states = residual + hidden_states
        return hidden_states, attention_probs


class RnaMsmEncoder(nn.Module):
    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        layer_classes = {"axial": RnaMsmAxialLayer, "pkm": RnaMsmPkmLayer}
        self.layer = nn.ModuleList([layer_classes[t](config) for t in config.layer_types])
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        key_padding_mask = (attention_mask.long() ^ 1).bool()
        # B x R x C x D -> R x C x B x D
        hidden_states = hidden_states.permute(1, 2, 0, 3)
        for layer_module in self.layer:
            layer_outputs = layer_module(hidden_states, key_padding_mask)
            hidden_states = layer_outputs[0]
        hidden_states = self.layer_norm(hidden_states)
        return hidden_states.permute(2, 0, 1, 3)  # R x C x B x D -> B x R x C x D


class RnaMsmModel(nn.Module):
    """Single-sequence entry point: input_ids [B, C] -> last hidden state [B, C, D]."""

    def __init__(self, config: RnaMsmConfig):
        super().__init__()
        self.embeddings = RnaMsmEmbeddings(config)
        self.encoder = RnaMsmEncoder(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        msa = input_ids.unsqueeze(1)  # an MSA of depth 1
        embedding_output, attention_mask = self.embeddings(msa)
        sequence_output = self.encoder(embedding_output, attention_mask)
        return sequence_output[:, 0]


INPUT_SEED = 815


def rnamsm_inputs(batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """Nucleotide and IUPAC tokens (ids 5..25), never the pad (0) or specials (1..4)."""
    g = seeded(INPUT_SEED * 100_003 + batch * 1_009 + tokens)
    return (torch.randint(5, 26, (batch, tokens), generator=g, dtype=torch.int64),)


@factory
def multimolecule_rnamsm_pkm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    config = RnaMsmConfig()
    g = seeded(811)
    with private_global_rng():
        model = RnaMsmModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pkm.keys"):
                p.copy_(normal(g, *p.shape, std=1 / math.sqrt(p.shape[-1])))
            elif name.endswith("pkm.values.weight"):
                p.copy_(normal(g, *p.shape, std=0.5))
            elif name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
                p.copy_(normal(g, *p.shape))
            elif name.endswith("msa_embeddings"):
                p.copy_(normal(g, *p.shape, std=0.1))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(gains(g, p.shape[0]))
            elif p.dim() == 2:
                p.copy_(fan_in(g, *p.shape))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))
    return model.eval(), rnamsm_inputs(2, 16)
