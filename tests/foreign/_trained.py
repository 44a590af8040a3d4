"""Trained-looking weights for the foreign test models, drawn from a local generator.

Nothing here touches the global RNG: every tensor comes from a `torch.Generator` seeded by
the factory that asks for it, so building a model twice gives the same weights whatever the
caller did to `torch.manual_seed`. Third-party constructors (PyPI packages, `transformers`)
that draw their own init from the global RNG run inside `private_global_rng()`, and every
parameter they create is then overwritten through `overwrite()`, which refuses to leave one
untouched.

"Trained-looking" means what a memory layer's weights look like after training, not at
init: keys and queries with real variance (scores of order one, so top-k decisions are not
near-ties), Tucker cores that are identity plus noise of scale 0.3-1, values of unit scale
(the PyPI packages initialise them at 1e-2 or below), norms whose gains are not all ones.

Every case factory is wrapped in `factory`, which runs it inside `private_global_rng()`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

InputMaker = Callable[[int, int], tuple[torch.Tensor, ...]]
Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (never the global one)."""
    return torch.Generator().manual_seed(seed)


def normal(g: torch.Generator, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """N(mean, std²) samples of `shape`, drawn from `g`."""
    return torch.randn(*shape, generator=g) * std + mean


def fan_in(
    g: torch.Generator, out_features: int, in_features: int, gain: float = 1.0
) -> torch.Tensor:
    """A weight [out, in] with variance gain²/in: unit-scale inputs give unit-scale outputs."""
    return normal(g, out_features, in_features, std=gain / math.sqrt(in_features))


def gains(g: torch.Generator, n: int, scale: float = 1.0, spread: float = 0.15) -> torch.Tensor:
    """Norm gains around `scale`, not all equal (as after training)."""
    return scale * (1.0 + spread * torch.randn(n, generator=g))


def near_identity(g: torch.Generator, *lead: int, rank: int, noise: float) -> torch.Tensor:
    """Tucker cores [*lead, rank, rank]: identity plus N(0, noise²)."""
    eye = torch.eye(rank).expand(*lead, rank, rank)
    return eye + noise * torch.randn(*lead, rank, rank, generator=g)


def permutation(g: torch.Generator, n: int) -> torch.Tensor:
    """A random permutation of range(n) (int64), drawn from `g`."""
    return torch.randperm(n, generator=g)


@contextlib.contextmanager
def private_global_rng() -> Iterator[None]:
    """Run constructors (ours and third-party) without consuming the caller's global RNG.

    The global state inside is the caller's (not reseeded): a parameter left at its
    constructor's init would then differ between two builds under different global seeds,
    which the determinism test catches.
    """
    with torch.random.fork_rng(devices=[]):
        yield


def factory(fn: Callable[[], Built]) -> Callable[[], Built]:
    """Decorate a case factory so that building never touches the caller's global RNG."""

    @functools.wraps(fn)
    def build() -> Built:
        with private_global_rng():
            return fn()

    return build


def overwrite(
    module: nn.Module,
    values: dict[str, torch.Tensor],
    *,
    buffers: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy `values` into the module's parameters (all of them must be named) and buffers.

    Raises if a parameter is left out or a name is unknown: a parameter left at a
    third-party init would make the weights depend on the global RNG.
    """
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(values))
    unknown = sorted(set(values) - set(params))
    if missing or unknown:
        raise KeyError(f"overwrite: missing {missing}, unknown {unknown}")
    known_buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in values.items():
            p = params[name]
            p.copy_(value.reshape(p.shape).to(p.dtype))
        for name, value in (buffers or {}).items():
            b = known_buffers[name]
            b.copy_(value.reshape(b.shape).to(b.dtype))


def float_inputs(dim: int, seed: int, scale: float = 1.0) -> InputMaker:
    """make_inputs for models taking hidden states [batch, tokens, dim]."""

    def make(batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
        g = seeded(seed * 100_003 + batch * 1_009 + tokens)
        return (scale * torch.randn(batch, tokens, dim, generator=g),)

    return make


def token_inputs(vocab: int, seed: int) -> InputMaker:
    """make_inputs for models taking int64 token ids [batch, tokens]."""

    def make(batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
        g = seeded(seed * 100_003 + batch * 1_009 + tokens)
        return (torch.randint(0, vocab, (batch, tokens), generator=g, dtype=torch.int64),)

    return make
