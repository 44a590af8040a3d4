"""Rule ``core_order``: with a table per core, which table goes with which core.

Each read's factor weights one core only; the factors are put in core order and every
order of the tables is a hypothesis (proven by ``proof``). One read is one table, as is.
"""

from __future__ import annotations

import itertools

from torch.fx import Node

from ..rules import Failure
from .binding import WeightFactor

RULE = "core_order"


def check(factors: list[WeightFactor], reads: list[Node]) -> list[list[Node]] | Failure:
    """The reads in the order of the cores their factors weight (a table per core), or
    the reads as they are (one table). Sorts ``factors`` into core order."""
    if len(reads) == 1:
        return [reads]
    cores = [f.core for f in factors]
    if len(factors) != len(reads) or any(c is None for c in cores) or len(set(cores)) != len(cores):
        reason = (
            f"{len(reads)} tables are read, but the weights are not one factor per core "
            f"(cores {cores})"
        )
        return Failure.at(RULE, reason, reads[0])
    # the factors in core order: the tables must come in the same order
    factors.sort(key=lambda f: f.core)  # type: ignore[arg-type, return-value]
    return [list(p) for p in itertools.permutations(reads)]
