"""Triton kernel for ``ultramem::retrieve`` (see ``retrieve.py`` for the semantics).

One program per (token, head) does the whole retrieval in registers: the rank-1 merge of
both sides over all n keys, top-m on each side, the m × m Tucker grid of every core, top-k
over the summed grid and the per-core scores at the selected positions. Nothing but the
k scores and slots goes back to memory, so a lookup is one launch instead of the dozen
kernels (and the [T, M, H, m²] grid round trip) of the eager reference.

Selection, at both stages, without serial rounds: each score becomes an integer key
(``_score_key``: the float's bits made monotone, every NaN one key above +inf, -0.0 the key
of 0.0) and ``tl.topk``, a bitonic top-k network (O(n log² m) compare-exchanges in
log² m + log(n/m) steps), selects on the keys. First on int32 *short* keys, the score's low
b bits replaced by the inverted index (2^b = the block): distinct, half the work of int64
keys, and the right set unless an element left out shares the high bits of the m-th
(``_short_top`` counts them: one reduction). Then, when the set is right, the m selected
are sorted on *full* int64 keys (score key above the inverted index, as ``_full_keys``),
recomputed from their scores; else (ties or near-ties at the edge: 0.7 % of the stages on
random fp32 or bf16 inputs at the paper's sizes, most on tie-heavy ones) that stage's
whole selection runs on full keys. Either way the
result is exactly the reference's stable descending order, ties and NaN included.

Where k rounds of (max, lowest index) took 3 block reductions each, at the paper's sizes
(n = 1024, m = k = 32, bf16; sm_90) a program ran 94 K warp-instructions in 3 loops of 32
rounds, 113 registers (Triton 3.6); it now runs 10-22 K straight-line on its common path
(1-8 warps, see ``retrieve_launch_config``; Triton 3.9), no spills. The full-key path of a stage
(``_full_top``) is as long again where it runs: in 0.6 % of the stages on inputs drawn as
the benchmark's (``scripts/branch_rates.py``), which ``scripts/kernel_report.py`` counts at
that rate.

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

import functools

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
def _score_key(x, valid):
    """int32 keys whose order is the reference's order of the scores ``x`` (fp32): the
    float's bits made monotone as a signed int (negative floats have their magnitude bits
    flipped), every NaN one key above +inf, -0.0 the key of +0.0 (``torch.sort`` compares
    them equal). Padding (``valid`` false) takes INT32_MIN, below -inf."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    return tl.where(valid, key, tl.full(key.shape, -(2**31), tl.int32))


@triton.jit
def _full_keys(key, index):
    """int64 keys: ``_score_key`` above ``2³¹ - 1 - index``, so that of two equal scores
    the lower index ranks higher. Every key is distinct: ``tl.topk`` on them selects, in
    order, exactly what ``torch.sort(descending=True, stable=True)`` selects."""
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _sort_keys(x, index, valid):
    """``_full_keys`` of the scores ``x``."""
    return _full_keys(_score_key(x, valid), index)


@triton.jit
def _key_index(keys):
    """The index packed into ``_full_keys``' low bits."""
    return 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _full_top(key, index, K: tl.constexpr):
    """Indices of the top ``K`` of ``_score_key``s on full keys: the path for a stage whose
    short keys did not settle its set (``RARE_HELPERS``)."""
    return _key_index(tl.topk(_full_keys(key, index), K))


@triton.jit
def _short_top(key, index, valid, count, K: tl.constexpr, LOW: tl.constexpr):
    """The top ``K`` of int32 keys whose low bits (``LOW``, 2^b - 1) hold the inverted
    index instead of the score's last bits, and whether their first ``count`` are the
    exact top ``count`` as a set: they are unless an element left out shares the high bits
    of the ``count``-th (only there could the lost bits have ranked another first)."""
    tl.static_assert(LOW < 2**22)  # -inf keeps a high part above the padding's
    top = tl.topk((key & ~LOW) | (LOW - index), K)
    offs = tl.arange(0, K)
    edge = tl.max(tl.where(offs == count - 1, top, tl.full(top.shape, -(2**31), tl.int32)))
    tied = tl.sum(((key & ~LOW) >= (edge & ~LOW)) & valid)
    return LOW - (top & LOW), tied == count


@triton.jit
def _merged(base, weight_ptr, index, mask, stride_n, stride_r, R: tl.constexpr):
    """``Σ_p s_p · w_p`` of the keys at ``index``: the rank-1 merge, p in order."""
    s = tl.load(base + index * stride_n, mask=mask, other=0.0).to(tl.float32)
    merged = _mul(s, tl.load(weight_ptr).to(tl.float32))
    for p in tl.static_range(1, R):
        s = tl.load(base + index * stride_n + p * stride_r, mask=mask, other=0.0)
        merged = merged + _mul(s.to(tl.float32), tl.load(weight_ptr + p).to(tl.float32))
    return merged


@triton.jit
def _candidates(
    base, weight_ptr, n, m, stride_n, stride_r, R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Indices [BLOCK_M] of the m largest ``Σ_p s_p · w_p`` over the n keys, in the
    reference's order (then padding)."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    key = _score_key(_merged(base, weight_ptr, offs_n, mask_n, stride_n, stride_r, R), mask_n)
    short, exact_set = _short_top(key, offs_n, mask_n, m, BLOCK_M, BLOCK_N - 1)
    if exact_set:
        # the m are right; their order only where high bits tie: sort them on full keys
        valid = tl.arange(0, BLOCK_M) < m
        again = _merged(base, weight_ptr, short, valid, stride_n, stride_r, R)
        picked = _key_index(tl.topk(_sort_keys(again, short, valid), BLOCK_M))
    else:
        picked = _full_top(key, offs_n, BLOCK_M)
    return picked


@triton.jit
def _grid_keys(position, cand_row, cand_col, BLOCK_M: tl.constexpr):
    """Grid positions a * BLOCK_M + b -> (row key, column key), gathered from the
    candidates in registers."""
    key_row = tl.gather(cand_row, position // BLOCK_M, 0)
    key_col = tl.gather(cand_col, position % BLOCK_M, 0)
    return key_row, key_col


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
        row_base, row_weight_ptr + h * R, n, m, row_stride_n, row_stride_r, R, BLOCK_N, BLOCK_M
    )
    cand_col = _candidates(
        col_base, col_weight_ptr + h * R, n, m, col_stride_n, col_stride_r, R, BLOCK_N, BLOCK_M
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
    flat = tl.reshape(offs_m[:, None] * BLOCK_M + offs_m[None, :], [BLOCK_M * BLOCK_M])
    valid = tl.reshape(mask_m[:, None] & mask_m[None, :], [BLOCK_M * BLOCK_M])
    key = _score_key(tl.reshape(total, [BLOCK_M * BLOCK_M]), valid)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    short, exact_set = _short_top(key, flat, valid, k, BLOCK_K, BLOCK_M * BLOCK_M - 1)
    if exact_set:
        key_row, key_col = _grid_keys(short, cand_row, cand_col, BLOCK_M)
        again = _tucker(
            row_base, col_base, key_row, key_col, mask_k, mask_k, row_stride_n, row_stride_r,
            col_stride_n, col_stride_r, core_base, R,
        )  # fmt: skip
        for c in tl.static_range(1, M):
            again = again + _tucker(
                row_base, col_base, key_row, key_col, mask_k, mask_k, row_stride_n,
                row_stride_r, col_stride_n, col_stride_r, core_base + c * core_stride, R,
            )  # fmt: skip
        picked = _key_index(tl.topk(_sort_keys(again, short, mask_k), BLOCK_K))
    else:
        picked = _full_top(key, flat, BLOCK_K)
    key_row, key_col = _grid_keys(picked, cand_row, cand_col, BLOCK_M)
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


# For scripts/kernel_report.py's instruction counts: helpers a program calls only on a
# rare branch. scripts/branch_rates.py measures how often, on the benchmark's inputs.
RARE_HELPERS = ("_full_top",)

# the H100's SMs: what the warps choice assumes when the device does not say
_DEFAULT_SMS = 132


def retrieve_launch_config(
    heads: int,
    n: int,
    rank: int,
    n_cores: int,
    topm: int,
    topk: int,
    activation: str,
    *,
    tokens: int | None = None,
    sms: int | None = None,
) -> LaunchConfig:
    """Constexprs, warps and grid of ``_retrieve_kernel``: one program per (token, head).

    ``tokens`` (when known: the JIT launcher's concrete token count; the ahead-of-time
    bundle and ``torch.compile(dynamic=True)`` leave it out) picks the warps: many for a
    few programs (their latency is the lookup's), few for many (the GPU's issue rate is).
    """
    # at least 2: tl.topk needs a power of two, and Triton 3.6's cannot select 1 of 1
    block_n, block_m, block_k = (max(2, triton.next_power_of_2(d)) for d in (n, topm, topk))
    # Keys per warp of the widest selection (the n keys or the m × m grid). sm_90, paper
    # sizes (n = 1024, m = k = 32, bf16), the exact-set path: warps -> registers (both
    # paths), SASS instructions a warp runs, warp-instructions a program runs. Triton 3.6,
    # before _grid_keys gathered: 1 -> 168, 12.2 K, 12 K · 2 -> 168, 8.2 K, 16 K · 4 ->
    # 114, 5.1 K, 20 K · 8 -> 115, 3.3 K, 26 K · 16 -> 110, 2.3 K, 36 K. Triton 3.9, now
    # (scripts/kernel_report.py): 1 -> 144, 10.4 K, 10.4 K · 8 -> 76, 2.7 K, 22 K. No
    # spills. A decode step (2 programs on 132 SMs) waits for one program: 8 warps. 4096
    # tokens (8192 programs) wait for the issue rate: 1 warp. A split of each (token, head)
    # over programs would need a second launch to merge (about as long as the candidate
    # stage it splits), where more warps split it within the program.
    keys = max(block_n, block_m * block_m)
    programs = None if tokens is None else tokens * heads
    if programs is None:
        per_warp = 256
    elif programs < 4 * (sms or _DEFAULT_SMS):
        per_warp = 128
    else:
        per_warp = 1024
    num_warps = min(8, max(1, keys // per_warp))
    constexprs = {
        "R": rank,
        "M": n_cores,
        "ACTIVATION": activation,
        "BLOCK_N": block_n,
        "BLOCK_M": block_m,
        "BLOCK_K": block_k,
    }
    return LaunchConfig(constexprs, num_warps, programs_y=heads)


@functools.cache
def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None  # e.g. fake CUDA tensors traced on a machine without a GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    # the token count picks the warps only when concrete (not a symbolic size to guard on)
    config = retrieve_launch_config(
        heads, n, rank, n_cores, topm, topk, activation,
        tokens=tokens if isinstance(tokens, int) else None, sms=_sm_count(row_scores.device),
    )  # fmt: skip
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
