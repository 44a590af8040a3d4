"""Triton kernel for ``ultramem::aggregate`` (see ``aggregate.py`` for the semantics).

One program per (token, block of 64 value columns), 2 warps. It loads up to 64 of the
token's H·k slots at once, maps them to (table row, pooling group) in registers (through the
row and group maps when given), gathers the [64, BLOCK_D] value tile in one go (every row
load in flight together: at decode sizes the lookup is bound by memory latency, and a loop
over the selections would serialise a slot → map → row chain of dependent loads per
selection), weights it by its core's weight (one load a selection when the block lies in one
core's chunk) and pools per group into a [G, BLOCK_D] fp32 tile written once. Each value
row's columns are read once, in 16-byte vectors.

Numerics: products are rounded once as in the reference, accumulated in fp32. Scatter
pooling is exact ("the last of the H·k wins": the highest selection index per group; -0.0
kept, NaN stays NaN).
Scatter-add sums each group as a tree within a chunk of selections and in order across
chunks, so it may differ from the reference's sequential sum in the last bits (the
reference's own order is unspecified on CUDA, where scatter_add uses atomics).

An out-of-range slot, row or group contributes nothing in the kernel (masked loads), so
even the compiled path, which cannot raise on data, never reads out of bounds. Eager calls
raise ``ValueError`` first for a map out of range, measuring each map once
(``check_aggregate_indices``), and for slots out of range where they are CPU tensors; on a
GPU an eager call does not sync with the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .aggregate import check_aggregate_indices, check_aggregate_inputs, slot_count
from .contract import AGGREGATE
from .launch import LaunchConfig
from .registry import register_triton

# Selections and value columns a program holds at once, and its warps. sm_90, paper sizes
# (H·k = 64 selections, Dv = 256, 2 cores, 4 groups, bf16), Triton 3.9: (selections,
# columns, warps) -> registers, warp-instructions a program runs, estimated µs at 1 / 4096
# tokens (scripts/kernel_report.py): (64, 64, 8) -> 59, 7.4 K, 4.1 / 135 · (64, 64, 4) ->
# 72, 4.5 K, 3.6 / 83 · (64, 64, 2) -> 121, 2.7 K, 3.8 / 51 · (32, 64, 1) -> 120, 2.2 K,
# 47.8 at 4096 · (64, 256, 4) -> 255, 12.5 K, 4.8 / 60; no spills. Fewer warps cost fewer
# instructions (the pooling's sums cross fewer threads); at 2 the 4096-token estimate is
# 8 % above its memory floor (44.8 µs) before the launch, so one configuration serves every
# token count and the ahead-of-time bundle's kernel is the JIT's.
_BLOCK_S, _BLOCK_D, _WARPS = 64, 64, 2


# Parameters come in TensorRT's order for quickly-deployable AOT plugins: the op's inputs
# (the contract's order), the int32 scalars, then the op's outputs. The plugin
# (plugins/trt_plugin.py) launches this very kernel from the bundle, so the order is part of
# its contract (tests/kernels/test_contract.py checks it).
@triton.jit
def _aggregate_kernel(
    values_ptr, weights_ptr, slots_ptr, row_map_ptr, group_map_ptr,
    selections, k, value_rows, value_dim, chunk, n_cores, slots_count, groups,
    row_map_head_stride, group_map_head_stride, values_stride_row, values_stride_col,
    pooled_ptr,
    HAS_ROW_MAP: tl.constexpr, HAS_GROUP_MAP: tl.constexpr, POOLING: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_CORE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    first_d = tl.program_id(1) * BLOCK_D
    offs_d = first_d + tl.arange(0, BLOCK_D)
    mask_d = offs_d < value_dim
    offs_g = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, selections, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        valid = offs_s < selections
        slot = tl.load(slots_ptr + t * selections + offs_s, mask=valid, other=0).to(tl.int64)
        valid = valid & (slot >= 0) & (slot < slots_count)
        head = (offs_s // k).to(tl.int64)
        if HAS_ROW_MAP:
            row = tl.load(row_map_ptr + head * row_map_head_stride + slot, mask=valid, other=0)
            row = row.to(tl.int64)
        else:
            row = slot
        if HAS_GROUP_MAP:
            group = tl.load(
                group_map_ptr + head * group_map_head_stride + slot, mask=valid, other=0
            ).to(tl.int64)
        else:
            group = tl.zeros_like(slot)
        valid = valid & (row >= 0) & (row < value_rows) & (group >= 0) & (group < groups)
        tile_mask = valid[:, None] & mask_d[None, :]
        v = tl.load(
            values_ptr + row[:, None] * values_stride_row + offs_d[None, :] * values_stride_col,
            mask=tile_mask,
            other=0.0,
        ).to(tl.float32)
        w_at = weights_ptr + (t * selections + offs_s) * n_cores
        if ONE_CORE:
            # every column of the block scales by one core's weight: one load a selection
            w = tl.load(w_at + first_d // chunk, mask=valid, other=0.0).to(tl.float32)[:, None]
        else:
            w = tl.load(w_at[:, None] + (offs_d // chunk)[None, :], mask=tile_mask, other=0.0)
            w = w.to(tl.float32)
        if POOLING == "add":
            # rounded once, never fused into the sum below (fma with +0 is not contracted)
            weighted = tl.fma(v, w, 0.0)
        else:
            # the picked product as the reference writes it: x * y keeps a zero product's
            # sign, which fma(x, y, +0.0) loses, and no add follows here to fuse with; moved
            # as its bits, since a float sum may start from +0.0 (the interpreter's does)
            # where an integer sum of one non-zero term is that term
            weighted_bits = (v * w).to(tl.int32, bitcast=True)
        for g in range(groups):
            in_group = valid & (group == g)
            if POOLING == "add":
                part = tl.sum(tl.where(in_group[:, None], weighted, 0.0), axis=0)
                acc = tl.where(offs_g[:, None] == g, acc + part[None, :], acc)
            else:
                last = tl.max(tl.where(in_group, offs_s, -1), axis=0)
                part = tl.sum(tl.where(offs_s[:, None] == last, weighted_bits, 0), axis=0)
                part = part.to(tl.float32, bitcast=True)
                acc = tl.where((offs_g[:, None] == g) & (last >= 0), part[None, :], acc)
    out = pooled_ptr + (t * groups + offs_g[:, None]) * value_dim + offs_d[None, :]
    out_mask = (offs_g[:, None] < groups) & mask_d[None, :]
    tl.store(out, acc.to(pooled_ptr.dtype.element_ty), mask=out_mask)


def aggregate_launch_config(
    heads: int,
    k: int,
    value_dim: int,
    n_cores: int,
    groups: int,
    pooling: str,
    *,
    has_row_map: bool,
    has_group_map: bool,
) -> LaunchConfig:
    """Constexprs, warps and grid of ``_aggregate_kernel``: one program per (token, block
    of ``BLOCK_D`` value columns), ``BLOCK_S`` selections at a time."""
    block_d = min(triton.next_power_of_2(value_dim), _BLOCK_D)
    constexprs = {
        "HAS_ROW_MAP": has_row_map,
        "HAS_GROUP_MAP": has_group_map,
        "POOLING": pooling,
        "BLOCK_S": min(triton.next_power_of_2(heads * k), _BLOCK_S),
        "BLOCK_G": triton.next_power_of_2(groups),
        "BLOCK_D": block_d,
        # a block within one core's chunk of columns reads one weight a selection
        "ONE_CORE": n_cores == 1 or (value_dim // n_cores) % block_d == 0,
    }
    return LaunchConfig(constexprs, _WARPS, programs_y=triton.cdiv(value_dim, block_d))


def aggregate_triton(
    values: Tensor,
    weights: Tensor,
    slots: Tensor,
    row_map: Tensor | None = None,
    group_map: Tensor | None = None,
    groups: int = 1,
    pooling: str = "add",
    *,
    check_indices: bool = True,
) -> Tensor:
    """``aggregate_reference`` as one Triton launch. Returns ``pooled [T, G, Dv]``.

    Raises ``ValueError`` on bad shapes or attributes, and, with ``check_indices``, on map
    entries out of range (a device sync the first time a map is seen, none after) and on
    slots out of range where they are CPU tensors (on a GPU the kernel masks them).
    """
    check_aggregate_inputs(values, weights, slots, row_map, group_map, groups, pooling)
    if check_indices:
        check_aggregate_indices(
            values, slots, row_map, group_map, groups, check_slots=slots.device.type == "cpu"
        )
    tokens = weights.shape[0]
    # constexprs and block sizes must be concrete: under torch.compile(dynamic=True) this
    # specializes every size but the token count, which only sizes the grid
    heads, k, n_cores = (int(d) for d in weights.shape[1:])
    value_rows, value_dim = (int(d) for d in values.shape)
    out = torch.empty((tokens, groups, value_dim), dtype=values.dtype, device=values.device)
    if tokens == 0:
        return out
    # weights, slots and the maps are read as flat arrays (no copy when they already are);
    # the value table keeps its strides: a copy would cost more than the lookup
    weights, slots = weights.contiguous(), slots.contiguous()
    row_map = row_map.contiguous() if row_map is not None else None
    group_map = group_map.contiguous() if group_map is not None else None
    count = slot_count(values, row_map, group_map)

    def head_stride(index_map: Tensor | None) -> int:
        return count if index_map is not None and index_map.shape[0] > 1 else 0

    config = aggregate_launch_config(
        heads, k, value_dim, n_cores, groups, pooling,
        has_row_map=row_map is not None, has_group_map=group_map is not None,
    )  # fmt: skip
    wrap_triton(_aggregate_kernel)[config.grid(tokens)](
        values, weights, slots,
        row_map if row_map is not None else slots, group_map if group_map is not None else slots,
        heads * k, k, value_rows, value_dim, value_dim // n_cores, n_cores, count, groups,
        head_stride(row_map), head_stride(group_map), *values.stride(),
        out,
        **config.constexprs,
        num_warps=config.num_warps,
    )  # fmt: skip
    return out


register_triton(
    AGGREGATE,
    aggregate_triton,
    _aggregate_kernel,
    traced_launcher=functools.partial(aggregate_triton, check_indices=False),
)
