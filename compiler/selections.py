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
from torch.export import ExportedProgram
from torch.utils._python_dispatch import TorchDispatchMode

TOPK_OPS = (torch.ops.aten.topk.default,)


@dataclass
class TopkRecord:
    values: Tensor
    indices: Tensor
    input_size: int  # length of the dimension top-k ran over


@dataclass
class Selection:
    """Selected slot ids [rows, k] and the scores that ranked them (same order)."""

    slots: Tensor
    values: Tensor


@dataclass
class MemoryLayerSites:
    """A memory layer found in a captured graph and the indices of its top-k sites."""

    name: str
    sites: list[int]
    fused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fused": self.fused, "topk_sites": self.sites}


class _TopkRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[TopkRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in TOPK_OPS:
            x = args[0]
            dim = args[2] if len(args) > 2 else (kwargs or {}).get("dim", -1)
            values, indices = out
            self.records.append(TopkRecord(values.detach(), indices.detach(), x.shape[dim]))
        return out


def run_recording_topk(
    fn: Callable[..., Any], inputs: tuple[Any, ...]
) -> tuple[Any, list[TopkRecord]]:
    recorder = _TopkRecorder()
    with torch.no_grad(), recorder:
        out = fn(*inputs)
    return out, recorder.records


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    # the innermost module; its path is the first element of the (path, type) value
    path, _ = list(stack.values())[-1]
    return str(path) or "<root>"


def find_memory_layers(program: ExportedProgram) -> list[MemoryLayerSites]:
    """Group the graph's top-k nodes by the module that computes them.

    A group with at least three top-k nodes is a memory layer (two candidate stages and
    one final selection). The passes issue replaces this with semantic matching.
    """
    groups: dict[str, list[int]] = {}
    site = 0
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in TOPK_OPS:
            groups.setdefault(_module_path(node), []).append(site)
            site += 1
    return [MemoryLayerSites(name, sites) for name, sites in groups.items() if len(sites) >= 3]


def layer_selection(records: list[TopkRecord], layer: MemoryLayerSites) -> Selection:
    """Slot ids of one layer from its last three sites (row, column, final)."""
    row, col, final = (records[i] for i in layer.sites[-3:])
    m_row, m_col, n = row.indices.shape[-1], col.indices.shape[-1], col.input_size
    pos = final.indices
    if final.input_size == m_row * m_col and pos.dim() == row.indices.dim():
        i_row = row.indices.gather(-1, pos // m_col)
        i_col = col.indices.gather(-1, pos % m_col)
        slots = i_row * n + i_col
    else:  # not the TDQKR pattern: compare the final top-k's own indices
        slots = pos
    k = slots.shape[-1]
    return Selection(slots.reshape(-1, k), final.values.reshape(-1, k).float())
