"""Triton kernel for ``ultramem::retrieve`` (see ``retrieve.py`` for the semantics).

One program per (token, head) does the whole retrieval in registers: the rank-1 merge of
both sides over all n keys, top-m on each side, the m × m Tucker grid of every core, top-k
over the summed grid and the per-core scores at the selected positions. Nothing but the
k scores and slots goes back to memory, so a lookup is one launch instead of the dozen
kernels (and the [T, M, H, m²] grid round trip) of the eager reference.

Selection: each score becomes an int64 key (``_sort_keys``: the float's bits made monotone,
NaN above +inf, the inverted index in the low 32 bits) and ``tl.topk``, a bitonic top-k
network, selects on the keys; every key is distinct, so the network's output is exactly
the reference's stable descending order, ties and NaN included. Its work is
O(n log² m) compare-exchanges in log² m + log(n/m) steps whatever m is, where k rounds
of (max, lowest index) took 3 block reductions each: at the paper's sizes (n = 1024,
m = k = 32, bf16, sm_90, Triton 3.6) 94 K warp-instructions a program became 26 K
(4 warps; 113 registers became 64, no spills).

Exactness: selections must equal the reference's, ties included, so the kernel repeats its
arithmetic in fp32 in the same order:
- ``a = Σ_p s_p · w_p`` with each product rounded before the add (the reference multiplies
  elementwise, then sums), p in order;
- the grid as the reference's two einsums compute it on MKL and cuBLAS: ``proj_q =
  Σ_p Sr_p · C[p, q]`` then ``G = Σ_q proj_q · Sc_q``, each an fma chain from the first
  product, then the cores summed in order. (At tiny sizes PyTorch's CPU bmm skips BLAS and
  rounds every product, so there the two may differ in the last bit: only a near-tie
  within one ulp could flip a selection, and exact ties stay exact.)
- Products are formed as ``fma(x, y, +0.0)``: the value of ``x * y``, but an op LLVM may
  not contract with the following add (Triton fuses ``a * b + c`` by default, which
  would round once where the reference rounds twice);
- a NaN ranks above every number, as in ``torch.sort`` (NaNs among themselves by index),
  and relu keeps it NaN.

``kernels/registry.py`` makes the op run this kernel for CUDA tensors, eagerly and under
``torch.compile``/AOTInductor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .contract import RETRIEVE
from .launch import LaunchConfig
from .registry import register_triton
from .retrieve import check_retrieve_inputs


@triton.jit
def _mul(x, y):
    # x * y rounded once, but never fused into a following add (see the module docstring)
    return tl.fma(x, y, 0.0)


@triton.jit
def _projected(row_base, key_row, mask_row, stride_n, stride_r, core_base, q, R: tl.constexpr):
    """``Σ_p Sr_p[key_row] · C[p, q]``: the reference's first einsum, p in order."""
    sr = tl.load(row_base + key_row * stride_n, mask=mask_row, other=0.0).to(tl.float32)
    proj = _mul(sr, tl.load(core_base + q).to(tl.float32))
    for p in tl.static_range(1, R):
        sr = tl.load(row_base + key_row * stride_n + p * stride_r, mask=mask_row, other=0.0)
        proj = tl.fma(sr.to(tl.float32), tl.load(core_base + p * R + q).to(tl.float32), proj)
    return proj


@triton.jit
def _tucker(
    row_base, col_base, key_row, key_col, mask_row, mask_col, row_stride_n, row_stride_r,
    col_stride_n, col_stride_r, core_base, R: tl.constexpr,
):  # fmt: skip
    """``Σ_q proj_q[key_row] · Sc_q[key_col]`` for one core: the reference's second einsum,
    q in order. The key indices broadcast: [m, 1] against [1, m] gives the grid, [k]
    against [k] the k selected entries, bit for bit the same values."""
    proj = _projected(row_base, key_row, mask_row, row_stride_n, row_stride_r, core_base, 0, R)
    sc = tl.load(col_base + key_col * col_stride_n, mask=mask_col, other=0.0).to(tl.float32)
    out = _mul(proj, sc)
    for q in tl.static_range(1, R):
        proj = _projected(row_base, key_row, mask_row, row_stride_n, row_stride_r, core_base, q, R)
        sc = tl.load(col_base + key_col * col_stride_n + q * col_stride_r, mask=mask_col, other=0.0)
        out = tl.fma(proj, sc.to(tl.float32), out)
    return out


@triton.jit
def _sort_keys(x, index, valid):
    """int64 keys, one per element of ``x`` (fp32), whose descending order is the
    reference's: ``torch.sort(descending=True, stable=True)`` on ``x``, then ``index``.

    High 32 bits: the float's bits made monotone as a signed int (negative floats have
    their magnitude bits flipped), every NaN one key above +inf, -0.0 the key of +0.0
    (``torch.sort`` compares them equal, so the stable order keeps their indices' order).
    Low 32 bits: ``2³¹ - 1 - index``, so that of two equal scores the lower index ranks
    higher. Padding (``valid`` false) takes INT32_MIN, below -inf. Every key is distinct,
    so one ``tl.topk`` on them selects, in order, exactly what the reference selects.
    """
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    key = tl.where(valid, key, tl.full(key.shape, -(2**31), tl.int32))
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _key_index(keys):
    """The index packed into ``_sort_keys``' low bits."""
    return 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _candidates(
    base, weight_ptr, n, stride_n, stride_r, R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Indices [BLOCK_M] of the ``BLOCK_M`` largest ``Σ_p s_p · w_p`` over the n keys, in
    the reference's order (its first m are the candidates; later ones may be padding)."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    s = tl.load(base + offs_n * stride_n, mask=mask_n, other=0.0).to(tl.float32)
    merged = _mul(s, tl.load(weight_ptr).to(tl.float32))
    for p in tl.static_range(1, R):
        s = tl.load(base + offs_n * stride_n + p * stride_r, mask=mask_n, other=0.0)
        merged = merged + _mul(s.to(tl.float32), tl.load(weight_ptr + p).to(tl.float32))
    return _key_index(tl.topk(_sort_keys(merged, offs_n, mask_n), BLOCK_M))


# Parameters come in TensorRT's order for quickly-deployable AOT plugins: the op's inputs
# (the contract's order), the int32 scalars, then the op's outputs. The plugin
# (plugins/trt_plugin.py) launches this very kernel from the bundle, so the order is part of
# its contract (tests/kernels/test_contract.py checks it).
@triton.jit
def _retrieve_kernel(
    row_scores_ptr, col_scores_ptr, row_weight_ptr, col_weight_ptr, cores_ptr,
    n, m, k, heads,
    row_stride_t, row_stride_h, row_stride_n, row_stride_r,
    col_stride_t, col_stride_h, col_stride_n, col_stride_r,
    scores_ptr, slots_ptr,
    R: tl.constexpr, M: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row_base = row_scores_ptr + t * row_stride_t + h * row_stride_h
    col_base = col_scores_ptr + t * col_stride_t + h * col_stride_h

    cand_row = _candidates(
        row_base, row_weight_ptr + h * R, n, row_stride_n, row_stride_r, R, BLOCK_N, BLOCK_M
    )
    cand_col = _candidates(
        col_base, col_weight_ptr + h * R, n, col_stride_n, col_stride_r, R, BLOCK_N, BLOCK_M
    )

    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    core_base = cores_ptr + h * R * R
    core_stride = heads * R * R
    # the m × m grid summed over cores, in core order
    total = _tucker(
        row_base, col_base, cand_row[:, None], cand_col[None, :], mask_m[:, None],
        mask_m[None, :], row_stride_n, row_stride_r, col_stride_n, col_stride_r, core_base, R,
    )  # fmt: skip
    for c in tl.static_range(1, M):
        total = total + _tucker(
            row_base, col_base, cand_row[:, None], cand_col[None, :], mask_m[:, None],
            mask_m[None, :], row_stride_n, row_stride_r, col_stride_n, col_stride_r,
            core_base + c * core_stride, R,
        )  # fmt: skip

    # top-k over the flattened grid; position a * BLOCK_M + b orders as the reference's
    # a * m + b does
    flat = offs_m[:, None] * BLOCK_M + offs_m[None, :]
    keys = _sort_keys(total, flat, mask_m[:, None] & mask_m[None, :])
    picked = _key_index(tl.topk(tl.reshape(keys, [BLOCK_M * BLOCK_M]), BLOCK_K))
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < k

    # grid position -> key indices (a one-hot pick: the candidates live in registers)
    at_a = (picked // BLOCK_M)[:, None] == offs_m[None, :]
    at_b = (picked % BLOCK_M)[:, None] == offs_m[None, :]
    key_row = tl.sum(tl.where(at_a, cand_row[None, :], 0), axis=1)
    key_col = tl.sum(tl.where(at_b, cand_col[None, :], 0), axis=1)
    out_row = (t * heads + h) * k + offs_k
    tl.store(slots_ptr + out_row, key_row.to(tl.int64) * n + key_col.to(tl.int64), mask=mask_k)

    # per-core scores at the k positions, recomputed rather than kept as M live grids
    for c in tl.static_range(M):
        score = _tucker(
            row_base, col_base, key_row, key_col, mask_k, mask_k, row_stride_n, row_stride_r,
            col_stride_n, col_stride_r, core_base + c * core_stride, R,
        )  # fmt: skip
        if ACTIVATION == "relu":
            score = tl.where(score != score, score, tl.maximum(score, 0.0))  # NaN stays NaN
        elif ACTIVATION == "softmax":
            score = tl.where(mask_k, score, float("-inf"))
            e = tl.exp(score - tl.max(score, axis=0))
            score = e / tl.sum(e, axis=0)
        tl.store(scores_ptr + out_row * M + c, score.to(scores_ptr.dtype.element_ty), mask=mask_k)


def retrieve_launch_config(
    heads: int, n: int, rank: int, n_cores: int, topm: int, topk: int, activation: str
) -> LaunchConfig:
    """Constexprs, warps and grid of ``_retrieve_kernel``: one program per (token, head)."""
    # at least 2: tl.topk needs a power of two, and Triton 3.6's cannot select 1 of 1
    block_n, block_m, block_k = (max(2, triton.next_power_of_2(d)) for d in (n, topm, topk))
    # 256 keys a warp of the widest selection (the n keys or the m × m grid), 1 to 8 warps.
    # sm_90, Triton 3.6, paper sizes (n = 1024, m = k = 32), warps: registers, SASS
    # instructions (= per warp: straight-line code), warp-instructions per program:
    # 1: 222, 17.2 K, 17 K · 2: 96, 11.1 K, 22 K · 4: 64, 6.6 K, 26 K · 8: 64, 4.0 K, 32 K.
    # A program's latency (decode: 2 programs) falls with the instructions per warp, the
    # throughput at 4096 tokens with the warp-instructions per program; 4 is between.
    num_warps = min(8, max(1, max(block_n, block_m * block_m) // 256))
    constexprs = {
        "R": rank,
        "M": n_cores,
        "ACTIVATION": activation,
        "BLOCK_N": block_n,
        "BLOCK_M": block_m,
        "BLOCK_K": block_k,
    }
    return LaunchConfig(constexprs, num_warps, programs_y=heads)


def retrieve_triton(
    row_scores: Tensor,
    col_scores: Tensor,
    row_weight: Tensor,
    col_weight: Tensor,
    cores: Tensor,
    topm: int,
    topk: int,
    activation: str = "none",
) -> tuple[Tensor, Tensor]:
    """``retrieve_reference`` as one Triton launch. Returns ``(scores [T,H,k,M], slots [T,H,k])``.

    Raises ``ValueError`` for inputs that cannot form a lookup (``check_retrieve_inputs``).
    """
    check_retrieve_inputs(
        row_scores, col_scores, row_weight, col_weight, cores, topm, topk, activation
    )
    tokens = row_scores.shape[0]
    # constexprs and block sizes must be concrete: under torch.compile(dynamic=True) this
    # specializes every size but the token count, which only sizes the grid
    heads, n, rank = (int(d) for d in row_scores.shape[1:])
    n_cores = int(cores.shape[0])
    # the small weights are read as flat [H, r] / [M, H, r, r] arrays
    row_weight, col_weight, cores = (
        row_weight.contiguous(),
        col_weight.contiguous(),
        cores.contiguous(),
    )
    scores = torch.empty(
        (tokens, heads, topk, n_cores), dtype=row_scores.dtype, device=row_scores.device
    )
    slots = torch.empty((tokens, heads, topk), dtype=torch.int64, device=row_scores.device)
    if tokens == 0:
        return scores, slots
    config = retrieve_launch_config(heads, n, rank, n_cores, topm, topk, activation)
    wrap_triton(_retrieve_kernel)[config.grid(tokens)](
        row_scores, col_scores, row_weight, col_weight, cores,
        n, topm, topk, heads,
        *row_scores.stride(), *col_scores.stride(),
        scores, slots,
        **config.constexprs,
        num_warps=config.num_warps,
    )  # fmt: skip
    return scores, slots


register_triton(RETRIEVE, retrieve_triton, _retrieve_kernel)
