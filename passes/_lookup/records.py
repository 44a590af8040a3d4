"""What the fusion pass reports per lookup, as typed records: read by the compiler as they
are (``rewrite`` reads how parity must read a fused grid), turned into JSON only for the
pass log, ``inspect`` and the manifest (``to_json``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .rules import Failure

PARTS = ("selection", "aggregation")


class ScoreForm(Enum):
    """How the grid's scores combine a row's and a column's."""

    TUCKER = "Tucker"
    ADDITIVE = "additive (row + column)"


@dataclass(frozen=True)
class SelectionSummary:
    """A fused selection: the ``retrieve`` call's sizes and how the model reads its grid."""

    heads: int
    n_keys: int
    tucker_rank: int
    cores: int
    topm: int
    topk: int
    scores: ScoreForm
    outputs: tuple[str, ...]  # the kinds of the op's outputs the model reads
    rows_second: bool  # the rows are the second candidate top-k (or side)
    rows_outer: bool  # the model's grid has the rows as its outer axis
    activation: str

    def to_json(self) -> dict[str, Any]:
        return {
            "heads": self.heads,
            "n_keys": self.n_keys,
            "tucker_rank": self.tucker_rank,
            "cores": self.cores,
            "topm": self.topm,
            "topk": self.topk,
            "scores": self.scores.value,
            "outputs": list(self.outputs),
            "rows_second": self.rows_second,
            "grid": "rows outer" if self.rows_outer else "rows inner",
            "activation": self.activation,
        }


@dataclass(frozen=True)
class AggregationSummary:
    """A fused aggregation: the ``aggregate`` call's tables, maps and weights."""

    tables: int
    value_dim: int
    groups: int
    pooling: str
    row_map: tuple[int, ...] | None  # shapes of the index maps (None: identity)
    group_map: tuple[int, ...] | None
    weights: tuple[str, ...]  # the factors' nodes, or ("ones",)
    selections: int
    shared_with: tuple[str, ...] = ()  # every lookup it pools (itself included)

    def to_json(self) -> dict[str, Any]:
        return {
            "tables": self.tables,
            "value_dim": self.value_dim,
            "groups": self.groups,
            "pooling": self.pooling,
            "row_map": None if self.row_map is None else list(self.row_map),
            "group_map": None if self.group_map is None else list(self.group_map),
            "weights": list(self.weights),
            "selections": self.selections,
            "with": list(self.shared_with),
        }


@dataclass(frozen=True)
class PartReport:
    """One part of a lookup: fused (with its summary) or refused (with why, and the
    furthest rule its binding reached, when a binder ran)."""

    fused: bool
    summary: SelectionSummary | AggregationSummary | None = None
    reason: str = ""
    furthest: Failure | None = None

    @classmethod
    def refused(cls, reason: str, furthest: Failure | None = None) -> PartReport:
        return cls(fused=False, reason=reason, furthest=furthest)

    def to_json(self) -> dict[str, Any]:
        if self.fused:
            return {"fused": True, **(self.summary.to_json() if self.summary else {})}
        out: dict[str, Any] = {"fused": False, "reason": self.reason}
        if self.furthest is not None:
            out["furthest_rule"] = self.furthest.rule
            out["furthest_reason"] = self.furthest.reason
            if self.furthest.node is not None:
                out["furthest_node"] = self.furthest.node
        return out


@dataclass
class LookupReport:
    """What became of one lookup's two parts (None: not tried)."""

    selection: PartReport | None = None
    aggregation: PartReport | None = None

    def part(self, name: str) -> PartReport | None:
        return self.selection if name == "selection" else self.aggregation

    def to_json(self) -> dict[str, Any]:
        return {name: p.to_json() for name in PARTS if (p := self.part(name)) is not None}
