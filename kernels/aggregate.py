"""``ultramem::aggregate``: gather value rows, weight them by core, pool per group.

Semantics (docs/ultramem.md, steps 7-8), for each token t, over its H·k selected slots in order
(head-major, then the k of each head), with ``s`` a slot id and ``h`` its head:

    row   = row_map[h', s]   if row_map is given, else s       # h' = h, or 0 for a [1, S] map
    group = group_map[h', s] if group_map is given, else 0
    w     = values[row] with chunk c of its M equal chunks multiplied by weights[t, h, j, c]
    pooled[t, group] += w                   (pooling = "add", scatter-add)
    pooled[t, group]  = w                   (pooling = "scatter": the last of the H·k wins,
                                             PyTorch's CPU order; groups never hit stay 0)

The maps are *computed*, not chosen from a menu: the fusion pass evaluates the model's own
integer path from the slot ids to each table read and to the pooling index on every slot id
(``passes/_lookup/index_maps.py``). So one op covers the authors' global shuffle with
``j mod R`` / ``j div R``, per-row permutations with ``j // E``, per-layer offsets into a
shared table (V2), per-head tables (``[H, R, Dv]`` viewed as ``[H·R, Dv]``, the head offset
in the row map) and per-head pooling (groups ``h·E + e``).

Inputs: ``values`` [R, Dv] (per-core tables side by side are the same thing), ``weights``
[T, H, k, M] (the per-slot weights: scores after any activation or gate), ``slots`` [T, H, k]
int32/int64 in [0, S) with S the maps' width (R without maps), optional ``row_map`` and
``group_map`` [1 or H, S] int32/int64. Attributes: ``groups`` G (pooled rows per token),
``pooling``. Output ``pooled`` [T, G, Dv] in the values' dtype, the sum accumulated in fp32.
The expansion projection (``pooled.reshape(T, G·Dv) @ Wout``) stays outside the op: it is
one dense GEMM, which cuBLAS and TensorRT already do best.

Indices are checked at the op boundary: a slot outside [0, S), a row outside [0, R) or a
group outside [0, G) raises ``ValueError`` instead of reading out of bounds. The maps are
weights (the same buffer every call), so their ranges are measured once per map
(``index_map_range``: a device reduction and a read-back) and later calls compare the
remembered range with the call's bounds on the host. Slots are data: the Triton launcher
checks them only where that costs no device sync (CPU tensors); on a GPU the kernel masks
an out-of-range slot, row or group (it contributes nothing), so no call syncs and a decode
step can be captured in a CUDA graph.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .contract import AGGREGATE
from .registry import define_op

POOLINGS = AGGREGATE.attribute("pooling").choices


def check_aggregate_inputs(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The call's arguments by name, checked against the contract; shapes only (no sync)."""
    bound = AGGREGATE.bind(*args, **kwargs)
    AGGREGATE.check(bound)
    return bound


def slot_count(values: Tensor, row_map: Tensor | None, group_map: Tensor | None) -> int:
    """S: the maps' width, or the table's rows when no map is given."""
    for index_map in (row_map, group_map):
        if index_map is not None:
            return int(index_map.shape[1])
    return int(values.shape[0])


@dataclass(frozen=True)
class _MapRange:
    """A map's measured [low, high], valid while the tensor is this one, unchanged."""

    tensor: weakref.ref[Tensor]
    version: int | None
    layout: tuple[Any, ...]
    low: int
    high: int


# id(map) -> its range; an entry leaves when its tensor is freed
_MAP_RANGES: dict[int, _MapRange] = {}


def _version(tensor: Tensor) -> int | None:
    """The in-place write counter; None for inference tensors, which keep none (a map
    written in place under inference_mode after its first call is not measured again:
    the kernels still mask out-of-range entries)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _measure_range(index_map: Tensor) -> tuple[int, int]:
    """min and max of a map: two reductions and a device sync."""
    return int(index_map.min()), int(index_map.max())


def index_map_range(index_map: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty index map, measured on the first call for this tensor
    and again only after it was written in place (its version) or re-pointed."""
    key = id(index_map)
    layout = (
        index_map.data_ptr(),
        index_map.storage_offset(),
        tuple(index_map.shape),
        index_map.stride(),
        index_map.dtype,
        index_map.device,
    )
    version = _version(index_map)
    known = _MAP_RANGES.get(key)
    if (
        known is not None
        and known.tensor() is index_map
        and known.version == version
        and known.layout == layout
    ):
        return known.low, known.high
    low, high = _measure_range(index_map)
    ref = weakref.ref(index_map, lambda _, key=key: _MAP_RANGES.pop(key, None))
    _MAP_RANGES[key] = _MapRange(ref, version, layout, low, high)
    return low, high


def check_aggregate_indices(
    values: Tensor,
    slots: Tensor,
    row_map: Tensor | None,
    group_map: Tensor | None,
    groups: int,
    *,
    check_slots: bool = True,
) -> None:
    """Bounds of every index: the maps' ranges once per map (``index_map_range``), the
    slots (a device sync) when ``check_slots``."""
    slot_ids = slot_count(values, row_map, group_map)
    if check_slots and slots.numel():
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= slot_ids:
            raise ValueError(f"slots must lie in [0, {slot_ids}), got [{low}, {high}]")
    for name, index_map, bound in (
        ("row_map", row_map, values.shape[0]),
        ("group_map", group_map, groups),
    ):
        if index_map is not None and index_map.numel():
            low, high = index_map_range(index_map)
            if low < 0 or high >= bound:
                raise ValueError(f"{name} entries must lie in [0, {bound}), got [{low}, {high}]")


def rows_and_groups(
    slots: Tensor, row_map: Tensor | None, group_map: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Each selection's table row and pooling group, [T, H, k] int64."""
    heads = torch.arange(slots.shape[1], device=slots.device).view(1, -1, 1)
    slots = slots.long()

    def mapped(index_map: Tensor | None, default: Tensor) -> Tensor:
        if index_map is None:
            return default
        head = heads if index_map.shape[0] > 1 else torch.zeros_like(heads)
        return index_map.long()[head, slots]

    return mapped(row_map, slots), mapped(group_map, torch.zeros_like(slots))


def aggregate_reference(
    values: Tensor,
    weights: Tensor,
    slots: Tensor,
    row_map: Tensor | None = None,
    group_map: Tensor | None = None,
    groups: int = 1,
    pooling: str = "add",
) -> Tensor:
    check_aggregate_inputs(values, weights, slots, row_map, group_map, groups, pooling)
    check_aggregate_indices(values, slots, row_map, group_map, groups)
    tokens, heads, k, n_cores = weights.shape
    value_dim = values.shape[1]
    row, group = rows_and_groups(slots, row_map, group_map)
    gathered = values[row].float().view(tokens, heads, k, n_cores, value_dim // n_cores)
    weighted = (gathered * weights.float().unsqueeze(-1)).reshape(tokens, heads * k, value_dim)
    pooled = weighted.new_zeros(tokens, groups, value_dim)
    index = group.reshape(tokens, heads * k, 1).expand(-1, -1, value_dim)
    if pooling == "add":
        pooled = pooled.scatter_add(1, index, weighted)
    else:
        # Explicit "last of the H·k wins", the order PyTorch's CPU scatter follows, so that
        # the reference is deterministic on every device.
        every_token = torch.arange(tokens, device=pooled.device)
        for j in range(heads * k):
            pooled[every_token, group.reshape(tokens, -1)[:, j]] = weighted[:, j]
    return pooled.to(values.dtype)


define_op(AGGREGATE, aggregate_reference)
