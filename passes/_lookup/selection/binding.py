"""A selection binding: which tensors are the row and column scores, how each is viewed as
``[T, H, n, r]``, the rank-1 vectors and cores, and which model node is which op output.

Output kinds (``OutputKind``): ``slot``, ``row`` = slot div n, ``col`` = slot mod n,
``scores`` per core, ``ranking`` = their sum, ``core<c>`` = one core's scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.fx import Node

from ....kernels import retrieve_reference
from ..anchors import LookupAnchors
from ..layouts import Layout
from ..records import ScoreForm, SelectionSummary


class OutputKind:
    """The names of the op's outputs a model node may be (``core(c)``: one core's)."""

    SLOT = "slot"
    ROW = "row"
    COL = "col"
    SCORES = "scores"
    RANKING = "ranking"
    INTEGER = (SLOT, ROW, COL)

    @staticmethod
    def core(c: int) -> str:
        return f"core{c}"

    @staticmethod
    def core_index(kind: str) -> int | None:
        return int(kind.removeprefix("core")) if kind.startswith("core") else None


@dataclass
class ScoreSide:
    """One side's score tensor: ``node`` (its ``side`` of a joint tensor, if joint), viewed
    as [T, H, n, r] by ``layout`` (additive: [T, H, n], rank 1)."""

    node: Node
    side: tuple[int, int] | None
    layout: Layout

    def value(self, x: Tensor) -> Tensor:
        return x.select(*self.side) if self.side else x


@dataclass(frozen=True)
class Output:
    """A selection output: ``kind`` (an ``OutputKind``) of the op's outputs, in ``layout``."""

    node: Node
    kind: str
    layout: Layout


@dataclass
class SelectionBinding:
    lookup: LookupAnchors
    rows: ScoreSide
    cols: ScoreSide
    heads: int
    n: int
    rank: int
    topm: int
    topk: int
    row_weight: Tensor
    col_weight: Tensor
    cores: Tensor
    additive: bool
    broadcast: bool  # one score tensor read by every head
    outputs: list[Output] = field(default_factory=list)
    verified_max_abs: float = 0.0
    rows_second: bool = False  # the rows are the second candidate (or side): parity reads so
    rows_outer: bool = True  # the model's grid has the rows as its outer axis: parity reads so
    # the model's own activation of the selected scores, taken into the op when every use
    # of them goes through it
    activation: str = "none"
    # an absorbed activation: output node -> (the activation's node, its layout)
    activated: dict[Node, tuple[Node, Layout]] = field(default_factory=dict)

    def summary(self) -> SelectionSummary:
        return SelectionSummary(
            heads=self.heads,
            n_keys=self.n,
            tucker_rank=1 if self.additive else self.rank,
            cores=int(self.cores.shape[0]),
            topm=self.topm,
            topk=self.topk,
            scores=ScoreForm.ADDITIVE if self.additive else ScoreForm.TUCKER,
            outputs=tuple(sorted({o.kind for o in self.outputs})),
            rows_second=self.rows_second,
            rows_outer=self.rows_outer,
            activation=self.activation,
        )

    def canonical(self, side: ScoreSide, x: Tensor) -> Tensor:
        sizes = {"h": self.heads} if self.broadcast else None
        y = side.layout.canonical(side.value(x), sizes)
        if not self.additive:
            return y
        y = y.unsqueeze(-1)
        ones = torch.ones_like(y)
        return torch.cat([y, ones] if side is self.rows else [ones, y], dim=-1)

    def run(self, rows: Tensor, cols: Tensor, activation: str = "none") -> tuple[Tensor, Tensor]:
        """The op on canonical views of the score tensors: (scores [T,H,k,M], slots)."""
        return retrieve_reference(
            self.canonical(self.rows, rows), self.canonical(self.cols, cols), self.row_weight,
            self.col_weight, self.cores, self.topm, self.topk, activation,
        )  # fmt: skip


def output_value(kind: str, scores: Tensor, slots: Tensor, n: int) -> Tensor:
    """The canonical value of a selection output of ``kind``."""
    if kind == OutputKind.SLOT:
        return slots
    if kind == OutputKind.ROW:
        return slots // n
    if kind == OutputKind.COL:
        return slots % n
    if kind == OutputKind.SCORES:
        return scores
    if kind == OutputKind.RANKING:
        return scores.sum(-1)
    return scores[..., int(kind.removeprefix("core"))]
