"""Rule ``aggregation_proof``: the op must reproduce the pooled node on every probe.

Probes: the model's real slot ids and factors, random factors, random slot ids; the
expected pooled values come from the model's own pooling region, in fp32 where the model
runs in half precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import run_widened
from ..region import Region
from ..rules import Failure
from .binding import AggregationBinding, WeightFactor

RULE = "aggregation_proof"
RANDOM_PROBES = 2
Probe = tuple[list[Tensor], list[Tensor], Tensor]  # slot ids, factor values, expected


def probes(
    region: Region,
    real: dict[Node, Any],
    slots: list[Node],
    factors: list[WeightFactor],
    slot_count: int,
    module: GraphModule,
    extras: list[Tensor],
) -> list[Probe]:
    """(slot ids, factor values, expected pooled) on the real run, random factors and
    random slot ids."""
    gen = torch.Generator().manual_seed(0)
    real_slots = [real[s] for s in slots]
    real_factors = [real[f.node] for f in factors]
    out = [(real_slots, real_factors, real[region.outputs[0]])]
    for i in range(RANDOM_PROBES):
        if i % 2 == 0:
            xs = real_slots
            fs = [torch.randn(v.shape, generator=gen).to(v.dtype) for v in real_factors]
        else:
            xs = [torch.randint(0, slot_count, v.shape, generator=gen) for v in real_slots]
            fs = real_factors
        with torch.no_grad():
            (expected,) = run_widened(module, *xs, *fs, *extras)
        out.append((xs, fs, expected))
    return out


def check(binding: AggregationBinding, probes: list[Probe], table: Tensor) -> float | Failure:
    """The worst error over the probes, or where the op stops reproducing the pooled node."""
    worst = 0.0
    pooled = binding.pooled
    for i, (slots, factors, expected) in enumerate(probes):
        try:
            with torch.no_grad():
                got = binding.run(table, slots, factors)
                got = binding.pooled_layout.model(
                    got.reshape(got.shape[0], *binding.pooled_shape), list(expected.shape)
                )
        except (ValueError, RuntimeError, IndexError) as exc:
            reason = f"ultramem::aggregate refuses this reading of {pooled.name}: {exc}"
            return Failure.at(RULE, reason, pooled)
        if got.shape != expected.shape:
            reason = f"the op gives {list(got.shape)} where {pooled.name} is {list(expected.shape)}"
            return Failure.at(RULE, reason, pooled)
        got, want = got.float(), expected.float()
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            reason = f"the op's pooled values differ from {pooled.name} ({_probe_name(i)})"
            return Failure.at(RULE, reason, pooled)
        worst = max(worst, float((got - want).abs().max()) if want.numel() else 0.0)
    return worst


def _probe_name(index: int) -> str:
    if index == 0:
        return "the model's activations"
    return "random weights" if index % 2 else "random slot ids"
