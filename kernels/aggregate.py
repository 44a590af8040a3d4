"""``ultramem::aggregate``: gather value rows, weight them by core, pool per expansion group.

Semantics (ULTRAMEM.md steps 7-8), for each token t, over its H·k selected slots in order
(head-major, then the k of each head):

    j     = slot_map[slot] if slot_map is given else slot       # virtual slot id
    row   = j mod R,  group = j div R        (mapping = "mod", the authors' IVE)
          = j div E,  group = j mod E        (mapping = "div", per-row projection ids)
    row   = (row + row_offset) mod R                            # V2 tables shared by layers
    w     = values[row] with chunk c of its M equal chunks multiplied by scores[..., c]
    pooled[t, group] += w                     (pooling = "add", scatter-add)
    pooled[t, group]  = w                     (pooling = "scatter": the last of the H·k wins,
                                               PyTorch's CPU order; groups never hit stay 0)

Inputs: ``values`` [R, Dv] (per-core tables concatenated along Dv are the same thing),
``scores`` [T, H, k, M], ``slots`` [T, H, k] int64 in [0, slot_count), optional
``slot_map`` [slot_count] int64 (a permutation of virtual slot ids). ``expansion`` is E;
``slot_count`` defaults to R·E. Output ``pooled`` [T, E, Dv] in the values' dtype, the
sum accumulated in fp32. The expansion projection (``pooled.reshape(T, E·Dv) @ Wout``)
stays outside the op: it is one dense GEMM, which cuBLAS and TensorRT already do best.

Indices are checked at the op boundary: a slot outside [0, slot_count) or a slot_map
entry outside [0, R·E) raises ``ValueError`` instead of reading out of bounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAPPINGS = ("mod", "div")
POOLINGS = ("add", "scatter")


def check_aggregate_inputs(
    values: Tensor,
    scores: Tensor,
    slots: Tensor,
    slot_map: Tensor | None,
    expansion: int,
    mapping: str,
    pooling: str,
    row_offset: int,
) -> None:
    """Raise ``ValueError`` with what was received; shape checks only (no device sync)."""
    if values.dim() != 2:
        raise ValueError(f"values must be [R, Dv], got {tuple(values.shape)}")
    if scores.dim() != 4 or slots.dim() != 3 or tuple(scores.shape[:3]) != tuple(slots.shape):
        raise ValueError(
            "scores must be [T, H, k, M] and slots [T, H, k] with the same T, H, k; got "
            f"{tuple(scores.shape)} and {tuple(slots.shape)}"
        )
    if slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slots must be int32 or int64, got {slots.dtype}")
    n_cores = scores.shape[3]
    if values.shape[1] % n_cores:
        raise ValueError(
            f"value_dim = {values.shape[1]} must split into M = {n_cores} equal chunks"
        )
    if expansion < 1:
        raise ValueError(f"expansion must be >= 1, got {expansion}")
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    if slot_map is not None and (slot_map.dim() != 1 or slot_map.dtype != torch.int64):
        raise ValueError(
            f"slot_map must be a 1-D int64 tensor, got {slot_map.dtype} {tuple(slot_map.shape)}"
        )


def check_aggregate_indices(
    values: Tensor, slots: Tensor, slot_map: Tensor | None, expansion: int
) -> None:
    """Bounds of every index (syncs with the device: done once at the op boundary)."""
    virtual_count = values.shape[0] * expansion
    slot_count = slot_map.shape[0] if slot_map is not None else virtual_count
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= slot_count):
        raise ValueError(
            f"slots must lie in [0, {slot_count}), got [{int(slots.min())}, {int(slots.max())}]"
        )
    if slot_map is not None and slot_map.numel():
        lo, hi = int(slot_map.min()), int(slot_map.max())
        if lo < 0 or hi >= virtual_count:
            raise ValueError(
                f"slot_map entries must lie in [0, R·E = {virtual_count}), got [{lo}, {hi}]"
            )


def physical_rows_and_groups(
    slots: Tensor,
    slot_map: Tensor | None,
    value_rows: int,
    expansion: int,
    mapping: str,
    row_offset: int,
) -> tuple[Tensor, Tensor]:
    virtual = slot_map[slots] if slot_map is not None else slots.long()
    if mapping == "mod":
        row, group = virtual % value_rows, virtual // value_rows
    else:
        row, group = virtual // expansion, virtual % expansion
    if row_offset:
        row = (row + row_offset) % value_rows
    return row, group


def aggregate_reference(
    values: Tensor,
    scores: Tensor,
    slots: Tensor,
    slot_map: Tensor | None,
    expansion: int,
    mapping: str = "mod",
    pooling: str = "add",
    row_offset: int = 0,
) -> Tensor:
    check_aggregate_inputs(values, scores, slots, slot_map, expansion, mapping, pooling, row_offset)
    check_aggregate_indices(values, slots, slot_map, expansion)
    tokens, heads, k, n_cores = scores.shape
    value_rows, value_dim = values.shape
    row, group = physical_rows_and_groups(
        slots, slot_map, value_rows, expansion, mapping, row_offset
    )
    gathered = values[row].float().view(tokens, heads, k, n_cores, value_dim // n_cores)
    weighted = (gathered * scores.float().unsqueeze(-1)).reshape(tokens, heads * k, value_dim)
    pooled = weighted.new_zeros(tokens, expansion, value_dim)
    index = group.reshape(tokens, heads * k, 1).expand(-1, -1, value_dim)
    if pooling == "add":
        pooled = pooled.scatter_add(1, index, weighted)
    else:
        # Explicit "last of the H·k wins", the order PyTorch's CPU scatter follows, so that
        # the reference is deterministic on every device.
        for j in range(heads * k):
            pooled[torch.arange(tokens, device=pooled.device), group.reshape(tokens, -1)[:, j]] = (
                weighted[:, j]
            )
    return pooled.to(values.dtype)


@torch.library.custom_op("ultramem::aggregate", mutates_args=())
def aggregate(
    values: Tensor,
    scores: Tensor,
    slots: Tensor,
    slot_map: Tensor | None,
    expansion: int,
    mapping: str = "mod",
    pooling: str = "add",
    row_offset: int = 0,
) -> Tensor:
    """Fused aggregation; see the module docstring. Returns ``pooled [T, E, Dv]``."""
    return aggregate_reference(
        values, scores, slots, slot_map, expansion, mapping, pooling, row_offset
    )


@aggregate.register_fake
def _aggregate_fake(
    values: Tensor,
    scores: Tensor,
    slots: Tensor,
    slot_map: Tensor | None,
    expansion: int,
    mapping: str = "mod",
    pooling: str = "add",
    row_offset: int = 0,
) -> Tensor:
    check_aggregate_inputs(values, scores, slots, slot_map, expansion, mapping, pooling, row_offset)
    return values.new_empty(scores.shape[0], expansion, values.shape[1])
