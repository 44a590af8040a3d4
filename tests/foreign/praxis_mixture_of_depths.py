"""A Mixture-of-Depths router (expert-choice over tokens): top-k + gather + scatter, no memory.

Source read (not copied): https://github.com/0-5788719150923125/praxis,
`praxis/modules/router.py`-era `PraxisMixtureOfDepths(nn.Linear)` ("This uses expert-choice
routing, which was greatly preferred by the original authors", arXiv 2404.02258). Habits
kept: the router IS an `nn.Linear(hidden, 1)` subclass called through
`F.linear(inputs, self.weight, self.bias)`; `k = int(s * self.capacity)`; `torch.topk(
router_logits, k, dim=1, sorted=False)` over the SEQUENCE dim; `token_indices.expand(-1,
-1, d)` and `torch.gather(input=inputs, dim=1, index=...)` to pull the chosen tokens; the
chosen tokens go through a whole transformer block; the router weights scale the result.

Changes, each seen in other MoD ports: the chosen indices are `torch.sort`ed back into
causal order before the gather (and the weights permuted alike), and the block's update is
re-integrated with `torch.scatter_add` of `sigmoid(weight) · block(x_sel)` into the residual
stream (praxis `scatter`s the block output over the input). praxis's inference branch for
batch 1 (sigmoid > 0.5 with `nonzero`, a data-dependent shape) is left out.

No product keys, no value table: the top-k ranks tokens, the gather reads activations, the
scatter writes them back. `int(s * capacity)` makes `torch.export` specialise the token count
(dynamic capture refused), as in the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._trained import factory, fan_in, float_inputs, gains, normal, seeded


@dataclass
class PraxisConfig:
    hidden_size: int = 64
    num_heads: int = 4
    capacity: float = 0.5


class PraxisBlock(nn.Module):
    """Pre-norm causal attention + MLP; returns the block's update (not x + update)."""

    def __init__(self, config: PraxisConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.attn_norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        h = self.out(a.transpose(1, 2).reshape(b, s, d))
        return h + self.down(F.gelu(self.up(self.mlp_norm(x + h))))


class PraxisMixtureOfDepths(nn.Linear):
    """
    This uses expert-choice routing, which was greatly preferred by the
    original authors of this research: https://arxiv.org/abs/2404.02258
    """

    def __init__(self, config: PraxisConfig) -> None:
        super().__init__(in_features=config.hidden_size, out_features=1)
        self.capacity = config.capacity
        assert self.capacity > 0 and self.capacity < 1.0, (
            "'capacity' must be set to a value between 0 and 1."
        )

    def forward(self, expert: nn.Module, inputs: Tensor) -> Tensor:  # type: ignore[override]
        _b, s, d = inputs.shape
        k = int(s * self.capacity)

        # emit scalar weights for each token
        router_logits = F.linear(inputs, self.weight, self.bias)  # -> batch, seq_len, 1

        #  r > P_beta(R) - equation 1
        token_weights, token_indices = torch.topk(router_logits, k, dim=1, sorted=False)

        # keep the selected tokens in causal order
        token_indices, order = torch.sort(token_indices, dim=1)
        token_weights = torch.gather(token_weights, 1, order)

        # expand router predictions to match input dimensions
        indices_expanded = token_indices.expand(-1, -1, d)

        # pull top-k tokens from the original inputs
        filtered_inputs = torch.gather(input=inputs, dim=1, index=indices_expanded)

        # pass the selected tokens through a transformer block
        expert_outputs = expert(filtered_inputs)

        # re-integrate the activated tokens with our residual stream
        return torch.scatter_add(
            inputs, 1, indices_expanded, expert_outputs * torch.sigmoid(token_weights)
        )


class PraxisDecoder(nn.Module):
    """A dense block, then a routed block (MoD on every other layer)."""

    def __init__(self, config: PraxisConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([PraxisBlock(config), PraxisBlock(config)])
        self.router = PraxisMixtureOfDepths(config)
        self.norm = nn.RMSNorm(config.hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = hidden_states + self.blocks[0](hidden_states)
        hidden_states = self.router(self.blocks[1], hidden_states)
        return self.norm(hidden_states)


# hidden 64, 4 heads, capacity 0.5 (praxis default 0.125 on 512+ tokens)
mod_inputs = float_inputs(64, seed=741)


@factory
def praxis_mixture_of_depths() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = seeded(741)
    config = PraxisConfig()
    model = PraxisDecoder(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(gains(g, p.shape[0]))
            elif p.dim() == 2:
                p.copy_(fan_in(g, *p.shape, gain=0.8))
            else:
                p.copy_(normal(g, *p.shape, std=0.05))
        # a router that has learnt to prefer some tokens: logits of order one
        model.router.weight.copy_(normal(g, 1, 64, std=1.5 / math.sqrt(64)))
    return model.eval(), mod_inputs(2, 16)
