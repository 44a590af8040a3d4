"""Which memory slots each stage selected, so parity can count flipped selections.

A lookup is discontinuous: a tiny numeric difference can flip a selected slot. Parity
therefore records every top-k a stage computes ("selection sites", in execution order)
and, per memory layer, turns its sites into selected slot ids:

    row candidates  I_row = topk(a_row, m)   over n keys
    col candidates  I_col = topk(a_col, m)   over n keys
    final           pos   = topk(grid, k)    over m² grid positions
    slots = I_row[pos // m] · n + I_col[pos % m]

PyTorch stages are recorded with a dispatch mode that sees every ``aten.topk`` call
(no cooperation from the model's code); ONNX stages expose their TopK nodes' outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ...kernels import RETRIEVE_OP
from ...passes.lookups import lookup_anchors

TOPK_OPS = (torch.ops.aten.topk.default,)


@dataclass
class TopkRecord:
    values: Tensor
    indices: Tensor
    input_size: int  # length of the dimension top-k ran over


@dataclass
class RetrieveRecord:
    """One ``ultramem::retrieve`` call: the slots it selected and their scores [.., k, M]."""

    scores: Tensor
    slots: Tensor


SiteRecord = TopkRecord | RetrieveRecord


@dataclass
class Selection:
    """Selected slot ids [rows, k] and the scores that ranked them (same order)."""

    slots: Tensor
    values: Tensor


class SiteRecorder(TorchDispatchMode):
    """Records every top-k and fused retrieval; ``run_op`` says how an op runs (as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[SiteRecord] = []

    def run_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = self.run_op(func, args, kwargs or {})
        if func in TOPK_OPS:
            x = args[0]
            dim = args[2] if len(args) > 2 else (kwargs or {}).get("dim", -1)
            values, indices = out
            self.records.append(TopkRecord(values.detach(), indices.detach(), x.shape[dim]))
        elif func is RETRIEVE_OP:
            scores, slots = out
            self.records.append(RetrieveRecord(scores.detach(), slots.detach()))
        return out


def run_recording_sites(
    fn: Callable[..., Any], inputs: tuple[Any, ...], recorder: SiteRecorder | None = None
) -> tuple[Any, list[SiteRecord]]:
    """Run ``fn`` and record every top-k and fused retrieval it computes, in order."""
    recorder = recorder if recorder is not None else SiteRecorder()
    with torch.no_grad(), recorder:
        out = fn(*inputs)
    return out, recorder.records


def layer_selections(records: list[SiteRecord]) -> list[Selection]:
    """One selection per memory layer, in execution order.

    A fused layer is one retrieve record. An unfused one is three top-ks (row, column,
    final over the m_row × m_col grid), turned into the same slot ids the op returns.
    """
    out: list[Selection] = []
    i = 0
    while i < len(records):
        rec = records[i]
        if isinstance(rec, RetrieveRecord):
            k = rec.slots.shape[-1]
            values = rec.scores.float().sum(-1)  # the ranking score when no activation
            out.append(Selection(rec.slots.reshape(-1, k), values.reshape(-1, k)))
            i += 1
            continue
        triple = _triple_selection(records[i : i + 3])
        if triple is not None:
            out.append(triple)
            i += 3
            continue
        i += 1  # a top-k that is not part of a lookup
    return out


def _triple_selection(records: list[SiteRecord]) -> Selection | None:
    if len(records) != 3 or not all(isinstance(r, TopkRecord) for r in records):
        return None
    row, col, final = records  # type: ignore[misc]
    m_row, m_col = row.indices.shape[-1], col.indices.shape[-1]
    if final.input_size != m_row * m_col or final.indices.dim() != row.indices.dim():
        return None
    pos = final.indices
    i_row = row.indices.gather(-1, pos // m_col)
    i_col = col.indices.gather(-1, pos % m_col)
    k = pos.shape[-1]
    slots = (i_row * col.input_size + i_col).reshape(-1, k)
    return Selection(slots, final.values.reshape(-1, k).float())


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, _ = list(stack.values())[-1]
    return str(path) or "<root>"


def memory_layer_names(graph: torch.fx.Graph) -> list[str]:
    """Names (module paths) of the memory layers in a graph, fused or not, in order."""
    finals = {final for final, _, _ in lookup_anchors(graph)}
    return [
        _module_path(n)
        for n in graph.nodes
        if n in finals or (n.op == "call_function" and n.target is RETRIEVE_OP)
    ]
