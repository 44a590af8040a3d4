"""The real PyPI memory layers, exactly as a user installs and builds them.

Nothing is re-implemented here: each factory constructs the package's own module
(`ultra_mem.UltraMem`, `product_key_memory.PKM`, `PEER_pytorch.PEER`) with every
structural default kept and only its sizes shrunk, then overwrites its parameters with
trained-looking values (the packages initialise keys and cores at 1e-2 and memories at
1e-2 or below, which makes every top-k a near-tie). Buffers that are part of the maths
(ultra-mem's per-row projection permutation) are redrawn from the local generator too.

What the packages do that a compiler must live with, as they are:

- ultra-mem returns a tuple `(out, memory_indices, aux_loss)`; in eval `aux_loss` is the
  module's `zero` buffer (a 0-d constant output). Its forward also key-LayerNorms the keys
  and then uses the raw `self.keys` (a norm computed and never used), calls `torch.svd` of
  the cores on every call, and pools the expanded values with `zeros(...).scatter(...)`
  (not scatter-add: two selected slots with the same projection id keep only one).
  The `step` buffer and `mem_lr_scale` are training-only (`if self.training`).
- ultra-mem and PEER compute with `einx`, whose torch backend reads every shape with
  `int(...)`: under `torch.export` batch and tokens specialise, so a dynamic capture is
  refused and only a static one succeeds (`STATIC_CAPTURE_ONLY`).
- PKM keeps four `nn.Dropout(0.)` modules that survive in the exported graph as
  `aten.dropout(..., train=False)`, pools with `nn.EmbeddingBag` on 2-D indices (the
  export shows `embedding_bag.padding_idx` and an `arange` for the offsets) and takes one
  `topk` over both product-key sides at once (`[..., 2, n]`, then `chunk`).
- PEER with its default `non_competing_scores=True` keeps ONE expert per head (final top-1
  over the 16 × 16 candidate grid) and gates it with ReLU; each selected expert is a pair
  of rows (down, up) with a GELU between them: the V2-style per-slot gate with the input
  itself as the pre-value query.
"""

from __future__ import annotations

import math

import torch
from PEER_pytorch import PEER
from product_key_memory import PKM
from torch import nn
from ultra_mem import UltraMem

from ._trained import (
    factory,
    fan_in,
    float_inputs,
    gains,
    near_identity,
    normal,
    overwrite,
    private_global_rng,
    seeded,
)

DIM = 64

#: cases whose package code pins batch and tokens under torch.export (einx reads shapes with
#: int()), so only a static capture succeeds; the eager modules take any shape.
STATIC_CAPTURE_ONLY = frozenset(
    {"pypi-ultra-mem-defaults", "pypi-ultra-mem-e1-four-cores", "pypi-peer-defaults"}
)


def _retrain_ultra_mem(mem: UltraMem, g: torch.Generator) -> None:
    """Trained-looking weights for ultra-mem; every parameter and the permutation buffer."""
    n_keys = mem.num_keys
    heads, rank = mem.heads, mem.rank
    dim_qk = mem.to_queries.weight.shape[0]
    dim = mem.to_queries.weight.shape[1]
    e = mem.value_expansion
    dv = mem.memories.shape[-1]
    values: dict[str, torch.Tensor] = {
        "to_queries.weight": fan_in(g, dim_qk, dim),
        "query_ln.weight": gains(g, dim_qk),
        "key_ln.weight": gains(g, dim_qk),
        # keys ~ N(0, 1/Dk): with layer-normed queries (norm √Dk) the scores are ~N(0, 1)
        "keys": normal(g, 2, rank, n_keys, dim_qk, std=1 / math.sqrt(dim_qk)),
        "core": near_identity(g, heads, rank=rank, noise=0.5),
        "value_expansion_proj": normal(g, e, dv, dv, std=1 / math.sqrt(dv)),
        "memories": normal(g, heads, mem.num_virtual_mems, dv),
    }
    params = dict(mem.named_parameters())
    if "prenorm.weight" in params:
        values["prenorm.weight"] = gains(g, dim)
    conv = [name for name in params if name.startswith("pre_query_causal_conv")]
    for name in conv:
        p = params[name]
        if name.endswith("weight"):  # [dim, 1, K]: mostly the current token, some context
            w = normal(g, *p.shape, std=0.3 / math.sqrt(p.shape[-1]))
            w[..., -1] += 1.0
            values[name] = w
        else:
            values[name] = normal(g, *p.shape, std=0.1)
    for name in params:
        if name.startswith("combine_values_to_out") or name.startswith("mem_output_gates"):
            p = params[name]
            values[name] = fan_in(g, *p.shape) if p.ndim == 2 else normal(g, *p.shape, std=0.1)
    # the per-row permutation of the E projection ids, redrawn from our generator
    mapping = torch.rand(mem.num_virtual_mems, e, generator=g).argsort(dim=-1).flatten()
    overwrite(mem, values, buffers={"rand_proj_mapping": mapping})


@factory
def pypi_ultra_mem_defaults() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`ultra_mem.UltraMem` with its structural defaults (ReLU, E = 4, causal conv, ...)."""
    with private_global_rng():
        mem = UltraMem(DIM, num_memories=32 * 32, topk=8, dim_queries_keys=32)
    _retrain_ultra_mem(mem, seeded(101))
    return mem.eval(), ultra_mem_inputs(2, 16)


ultra_mem_inputs = float_inputs(DIM, seed=101)


@factory
def pypi_ultra_mem_e1_four_cores() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`ultra_mem.UltraMem` with `value_expansion=1, core_heads=4, pre_query_causal_conv=False`."""
    with private_global_rng():
        mem = UltraMem(
            DIM,
            num_memories=24 * 24,
            topk=8,
            dim_queries_keys=32,
            value_expansion=1,
            core_heads=4,
            pre_query_causal_conv=False,
        )
    _retrain_ultra_mem(mem, seeded(102))
    return mem.eval(), ultra_mem_e1_inputs(2, 16)


ultra_mem_e1_inputs = float_inputs(DIM, seed=102)


@factory
def pypi_pkm_defaults() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`product_key_memory.PKM` with its defaults (4 heads, LayerNorm queries, softmax, bag)."""
    with private_global_rng():
        pkm = PKM(DIM, num_keys=32, topk=8, dim_head=32)
    g = seeded(103)
    heads, dh, n = pkm.heads, pkm.keys.shape[-1], pkm.num_keys
    overwrite(
        pkm,
        {
            "to_queries.weight": fan_in(g, 2 * heads * dh, DIM),
            "norm.weight": gains(g, dh),
            "norm.bias": normal(g, dh, std=0.05),
            "keys": normal(g, heads, n, 2, dh, std=1 / math.sqrt(dh)),
            "values.weight": normal(g, n * n, DIM),
        },
    )
    return pkm.eval(), pkm_inputs(2, 16)


pkm_inputs = float_inputs(DIM, seed=103)


@factory
def pypi_peer_defaults() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`PEER_pytorch.PEER` with its defaults (8 heads, 16 candidates per side, top-1, ReLU)."""
    with private_global_rng():
        peer = PEER(DIM, num_experts=32 * 32)
    g = seeded(104)
    heads, n, dk = peer.heads, peer.num_keys, peer.keys.shape[-1]
    overwrite(
        peer,
        {
            "weight_down_embed.weight": normal(g, n * n, DIM, std=1 / math.sqrt(DIM)),
            "weight_up_embed.weight": normal(g, n * n, DIM, std=0.5),
            "to_queries.0.weight": fan_in(g, 2 * heads * dk, DIM),
            "keys": normal(g, heads, n, 2, dk, std=1 / math.sqrt(dk)),
        },
    )
    return peer.eval(), peer_inputs(2, 16)


peer_inputs = float_inputs(DIM, seed=104)
