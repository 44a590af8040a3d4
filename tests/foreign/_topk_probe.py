"""Record every `aten.topk` a model runs and measure how far its selections are from ties.

A `TorchDispatchMode` sees each `aten.topk` call whatever code issued it (the PyPI
packages, `transformers`, our own modules), so no model needs to cooperate. For each call
the gap that decides the selection is the one between the k-th and the (k+1)-th largest
input along the top-k dimension: if it is zero or tiny, a reordering of floating-point
operations (a fused kernel, another backend) may legitimately select other slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class TopkGaps:
    """Gaps of one top-k call: k, the size it chose from, and per-row gap statistics."""

    k: int
    size: int
    rows: int
    exact_ties: int  # rows whose k-th and (k+1)-th values are equal
    near_ties: int  # rows whose relative gap is <= the threshold
    min_rel_gap: float


class TopkRecorder(TorchDispatchMode):
    """Dispatch mode keeping (input, k, dim, largest) of every `aten.topk` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, int, int, bool]] = []

    def __torch_dispatch__(  # type: ignore[override]
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.topk.default:
            x, k = args[0], int(args[1])
            dim = int(args[2]) if len(args) > 2 else int(kwargs.get("dim", -1))
            largest = bool(args[3]) if len(args) > 3 else bool(kwargs.get("largest", True))
            self.calls.append((x.detach().clone(), k, dim, largest))
        return func(*args, **kwargs)


def topk_gaps(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], rel: float = 1e-4
) -> list[TopkGaps]:
    """Run `model(*inputs)` and return the gap statistics of every top-k it ran."""
    recorder = TopkRecorder()
    with torch.no_grad(), recorder:
        model(*inputs)
    out = []
    for x, k, dim, largest in recorder.calls:
        size = x.shape[dim]
        if k >= size:  # keeps everything: no (k+1)-th value, nothing to decide
            continue
        v = x.movedim(dim, -1).reshape(-1, size).double()
        v = v.sort(dim=-1, descending=largest).values
        kth, nxt = v[:, k - 1], v[:, k]
        gap = (kth - nxt).abs()
        scale = torch.maximum(kth.abs(), nxt.abs()).clamp_min(1e-30)
        rel_gap = gap / scale
        out.append(
            TopkGaps(
                k=k,
                size=size,
                rows=v.shape[0],
                exact_ties=int((gap == 0).sum()),
                near_ties=int((rel_gap <= rel).sum()),
                min_rel_gap=float(rel_gap.min()),
            )
        )
    return out
