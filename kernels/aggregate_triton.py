"""Triton kernel for ``ultramem::aggregate`` (see ``aggregate.py`` for the semantics).

One program per (token, block of value columns). It loads the token's H·k slots at once,
maps them to (physical row, expansion group) in registers, gathers the [H·k, BLOCK_D] value
tile in one go (every row load in flight together: at decode sizes the lookup is bound by
memory latency, and a loop over the selections would serialise a slot → map → row chain
of dependent loads per selection), weights each chunk of a row by its core's score, and
pools per group into a [E, BLOCK_D] fp32 tile written once.

Numerics: products are rounded once as in the reference, accumulated in fp32. Scatter
pooling is exact ("the last of the H·k wins": the highest selection index per group).
Scatter-add sums each group as a tree within a chunk of selections and in order across
chunks, so it may differ from the reference's sequential sum in the last bits (the
reference's own order is unspecified on CUDA, where scatter_add uses atomics).

An out-of-range slot or slot_map entry contributes nothing in the kernel (masked loads),
so even the compiled path, which cannot raise on data, never reads out of bounds; eager
calls raise ``ValueError`` first (``check_aggregate_indices``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ultramem.kernels.aggregate import (
    aggregate,
    aggregate_reference,
    check_aggregate_indices,
    check_aggregate_inputs,
)
from ultramem.kernels.retrieve_triton import LaunchConfig, register_triton_impl

# elements of the gathered [selections, BLOCK_D] tile a program holds. With their 64-bit
# gather addresses, 4096 cost 116 registers a thread at 8 warps (172 at 4; sm_90 build,
# cuobjdump -res-usage), no spills: room for two programs per SM. Not yet timed.
_TILE = 4096


# Parameters come in TensorRT's order for quickly-deployable AOT plugins: the op's inputs,
# the int32 scalars, then the op's outputs. The plugin (plugins/trt_plugin.py) launches
# this very kernel from the bundle, so the order is part of its contract.
@triton.jit
def _aggregate_kernel(
    values_ptr, scores_ptr, slots_ptr, slot_map_ptr,
    selections, value_rows, value_dim, chunk, n_cores, expansion, slot_count, row_offset,
    values_stride_row, values_stride_col,
    out_ptr,
    HAS_MAP: tl.constexpr, MAPPING: tl.constexpr, POOLING: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < value_dim
    core = offs_d // chunk  # which core's score weights this column
    offs_e = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    for start in range(0, selections, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        valid = offs_s < selections
        slot = tl.load(slots_ptr + t * selections + offs_s, mask=valid, other=0).to(tl.int64)
        valid = valid & (slot >= 0) & (slot < slot_count)
        virtual = tl.load(slot_map_ptr + slot, mask=valid, other=0) if HAS_MAP else slot
        valid = valid & (virtual >= 0) & (virtual < value_rows * expansion)
        if MAPPING == "mod":
            row = virtual % value_rows
            group = virtual // value_rows
        else:
            row = virtual // expansion
            group = virtual % expansion
        row = (row + row_offset) % value_rows
        tile_mask = valid[:, None] & mask_d[None, :]
        v = tl.load(
            values_ptr + row[:, None] * values_stride_row + offs_d[None, :] * values_stride_col,
            mask=tile_mask,
            other=0.0,
        ).to(tl.float32)
        s = tl.load(
            scores_ptr + (t * selections + offs_s)[:, None] * n_cores + core[None, :],
            mask=tile_mask,
            other=0.0,
        ).to(tl.float32)
        # rounded once, never fused into the sum below (fma with +0 is not contracted)
        w = tl.fma(v, s, 0.0)
        for e in range(expansion):
            in_group = valid & (group == e)
            if POOLING == "add":
                part = tl.sum(tl.where(in_group[:, None], w, 0.0), axis=0)
                acc = tl.where(offs_e[:, None] == e, acc + part[None, :], acc)
            else:
                last = tl.max(tl.where(in_group, offs_s, -1), axis=0)
                part = tl.sum(tl.where(offs_s[:, None] == last, w, 0.0), axis=0)
                acc = tl.where((offs_e[:, None] == e) & (last >= 0), part[None, :], acc)
    out = out_ptr + (t * expansion + offs_e[:, None]) * value_dim + offs_d[None, :]
    out_mask = (offs_e[:, None] < expansion) & mask_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def aggregate_launch_config(
    heads: int,
    k: int,
    value_dim: int,
    expansion: int,
    mapping: str,
    pooling: str,
    *,
    has_map: bool,
) -> LaunchConfig:
    """Constexprs, warps and grid of ``_aggregate_kernel``: one program per (token, block
    of ``BLOCK_D`` value columns)."""
    block_s = min(triton.next_power_of_2(heads * k), _TILE // 16)
    block_d = min(triton.next_power_of_2(value_dim), max(16, _TILE // block_s))
    constexprs = {
        "HAS_MAP": has_map,
        "MAPPING": mapping,
        "POOLING": pooling,
        "BLOCK_S": block_s,
        "BLOCK_E": triton.next_power_of_2(expansion),
        "BLOCK_D": block_d,
    }
    # 8 warps: see _TILE
    return LaunchConfig(constexprs, num_warps=8, programs_y=triton.cdiv(value_dim, block_d))


def aggregate_triton(
    values: Tensor,
    scores: Tensor,
    slots: Tensor,
    slot_map: Tensor | None,
    expansion: int,
    mapping: str = "mod",
    pooling: str = "add",
    row_offset: int = 0,
    *,
    check_indices: bool = True,
) -> Tensor:
    """``aggregate_reference`` as one Triton launch. Returns ``pooled [T, E, Dv]``.

    Raises ``ValueError`` on bad shapes or attributes, and, with ``check_indices`` (one
    device sync), on slots or slot_map entries out of range.
    """
    check_aggregate_inputs(values, scores, slots, slot_map, expansion, mapping, pooling, row_offset)
    if check_indices:
        check_aggregate_indices(values, slots, slot_map, expansion)
    tokens = scores.shape[0]
    # constexprs and block sizes must be concrete: under torch.compile(dynamic=True) this
    # specializes every size but the token count, which only sizes the grid
    heads, k, n_cores = (int(d) for d in scores.shape[1:])
    value_rows, value_dim = (int(d) for d in values.shape)
    selections = heads * k
    slot_count = int(slot_map.shape[0]) if slot_map is not None else value_rows * expansion
    out = torch.empty((tokens, expansion, value_dim), dtype=values.dtype, device=values.device)
    if tokens == 0:
        return out
    # scores, slots and the slot map are read as flat arrays (no copy when they already
    # are); the value table keeps its strides: a copy would cost more than the lookup
    scores, slots = scores.contiguous(), slots.contiguous()
    slot_map = slot_map.contiguous() if slot_map is not None else None
    config = aggregate_launch_config(
        heads, k, value_dim, expansion, mapping, pooling, has_map=slot_map is not None
    )
    wrap_triton(_aggregate_kernel)[config.grid(tokens)](
        values, scores, slots, slot_map if slot_map is not None else slots,
        selections, value_rows, value_dim, value_dim // n_cores, n_cores, expansion,
        slot_count, row_offset, *values.stride(),
        out,
        **config.constexprs,
        num_warps=config.num_warps,
    )  # fmt: skip
    return out


register_triton_impl(
    aggregate,
    aggregate_triton,
    aggregate_reference,
    _aggregate_kernel,
    traced_launcher=functools.partial(aggregate_triton, check_indices=False),
)
