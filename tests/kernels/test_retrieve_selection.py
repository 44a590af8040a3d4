"""Selection exactness of ``retrieve``: the kernels against a plain-PyTorch reference that
selects with ``torch.topk`` on packed integer keys, written here independently of
``retrieve_reference`` (which selects with a stable sort).

The contract's order (``kernels/retrieve.py``): larger score first, NaN above every number,
equal scores (``-0.0`` equals ``0.0``) toward the lower index, at both top-k stages.
``torch.topk`` alone leaves ties in no particular order (on CPU it returns equal values
out of index order), so the reference packs the rank of the score into the high 32 bits of
an int64 and the inverted index into the low 32: every key distinct, ``torch.topk`` on
them gives the contract's selection and order.

Inputs are small integers (or special values) wherever selections are compared with
weights exactly: sums and products of them are exact in fp32 and in fp64, whichever
order a kernel adds in, so the planted ties are exact ties on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import triton
import triton.language as tl
from torch import Tensor

from ultramem.kernels import retrieve_reference, retrieve_triton
from ultramem.kernels.retrieve_triton import _sort_keys
from ultramem.tests.kernels.implementations import implementations

IMPLS = implementations(retrieve_triton, "retrieve")
NAN, INF = float("nan"), float("inf")


def packed_keys(x: Tensor) -> Tensor:
    """int64 keys over the last dim of fp32 ``x`` in the contract's order (descending)."""
    x = torch.where(x == 0, torch.zeros_like(x), x).contiguous()  # -0.0 ranks as 0.0
    bits = x.view(torch.int32).long()
    rank = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone as a signed int
    rank = torch.where(x.isnan(), torch.full_like(rank, 0x7FFFFFFF), rank)
    index = torch.arange(x.shape[-1], device=x.device)
    return rank * 2**32 + (2**31 - 1 - index)


def topk_indices(x: Tensor, k: int) -> Tensor:
    return torch.topk(packed_keys(x.float()), k, dim=-1).indices


def topk_retrieve(
    row_scores: Tensor,
    col_scores: Tensor,
    row_weight: Tensor,
    col_weight: Tensor,
    cores: Tensor,
    topm: int,
    topk: int,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """docs/ultramem.md, steps 3-6, in float64 (exact for the small integers drawn here),
    selections by ``topk_indices`` on the scores rounded to fp32."""
    s_row, s_col = row_scores.double(), col_scores.double()
    u, v, c = row_weight.double(), col_weight.double(), cores.double()
    n = s_row.shape[2]
    a_row = torch.einsum("thnp,hp->thn", s_row, u)
    a_col = torch.einsum("thnp,hp->thn", s_col, v)
    i_row, i_col = topk_indices(a_row, topm), topk_indices(a_col, topm)  # [T, H, m]
    rows = torch.stack([s_row[t, h, i_row[t, h]] for t, h in _pairs(s_row)])  # [T·H, m, r]
    cols = torch.stack([s_col[t, h, i_col[t, h]] for t, h in _pairs(s_col)])
    heads = torch.tensor([h for _, h in _pairs(s_row)])
    # G[c, a, b] = (Σ_p row[a, p] · C[c, p, q]) then Σ_q · col[b, q], as the kernels group it
    projected = torch.einsum("xap,cxpq->xcaq", rows, c[:, heads])
    grid = torch.einsum("xcaq,xbq->xcab", projected, cols).flatten(2)  # [T·H, M, m²]
    pos = topk_indices(grid.sum(1), topk)  # [T·H, k]
    flat_row, flat_col = i_row.flatten(0, 1), i_col.flatten(0, 1)
    slots = flat_row.gather(1, pos // topm) * n + flat_col.gather(1, pos % topm)
    scores = grid.gather(2, pos[:, None].expand(-1, grid.shape[1], -1)).transpose(1, 2)
    if activation == "relu":
        scores = scores.relu()
    elif activation == "softmax":
        scores = scores.softmax(dim=1)
    shape = (*row_scores.shape[:2], topk)
    return scores.reshape(*shape, -1).to(row_scores.dtype), slots.reshape(shape)


def _pairs(x: Tensor) -> list[tuple[int, int]]:
    return [(t, h) for t in range(x.shape[0]) for h in range(x.shape[1])]


def integer_inputs(
    tokens: int, heads: int, n: int, rank: int, n_cores: int, *, low: int = -2, high: int = 3
) -> list[Tensor]:
    def draw(*shape: int) -> Tensor:
        return torch.randint(low, high, shape).float()

    return [
        draw(tokens, heads, n, rank),
        draw(tokens, heads, n, rank),
        draw(heads, rank),
        draw(heads, rank),
        draw(n_cores, heads, rank, rank),
    ]


def check_exact(impl: Callable[..., Any], inputs: list[Tensor], *attributes: Any) -> None:
    """Slots equal to both references'; scores equal to the float64 reference rounded to
    the output dtype (softmax within fp32 rounding: exp differs by backend), NaN where it
    has NaN."""
    scores, slots = impl(*inputs, *attributes)
    want_scores, want_slots = topk_retrieve(*inputs, *attributes)
    _, ref_slots = retrieve_reference(*inputs, *attributes)
    assert torch.equal(want_slots, ref_slots), "the two references disagree"
    if not torch.equal(slots.cpu(), want_slots):
        where = (slots.cpu() != want_slots).nonzero()[:5].tolist()
        pytest.fail(f"slots differ at {where}: got {slots.cpu().tolist()}, want {want_slots}")
    assert scores.dtype == want_scores.dtype
    tolerance = 1e-6 if attributes[-1] == "softmax" else 0.0
    torch.testing.assert_close(
        scores.cpu(), want_scores, atol=tolerance, rtol=tolerance, equal_nan=True
    )


@triton.jit
def _keys_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _sort_keys(x, offs, offs < n), mask=offs < n)


def test_kernel_keys_are_the_packed_keys() -> None:
    """The kernel's key transform on every kind of float: NaN of either sign and any
    payload one key, above +inf; -0.0 the key of 0.0; denormals and extremes in order."""
    tiny = torch.finfo(torch.float32).tiny
    special = [NAN, -NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, tiny, -tiny, tiny / 8, -tiny / 8,
               3.4e38, -3.4e38, 2.5, -2.5, 1.0, 0.0]  # fmt: skip
    x = torch.tensor(special, dtype=torch.float32)
    payload = torch.tensor([0x7FC00123, -0x0000_0001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, payload])  # a NaN with a payload, a negative NaN (all bits set)
    out = torch.empty(len(x), dtype=torch.int64)
    _keys_kernel[(1,)](x, out, len(x), BLOCK=32)
    assert torch.equal(out, packed_keys(x))
    order = torch.topk(out, len(x)).indices.tolist()
    assert order[:4] == [0, 1, 18, 19]  # every NaN first, by index
    assert order.index(4) < order.index(5) < order.index(17)  # 0.0, -0.0, 0.0 tie by index


@pytest.mark.parametrize("impl", IMPLS)
def test_every_score_equal(impl: Callable[..., Any]) -> None:
    """One value everywhere: candidates 0..m-1, and every grid cell ties, so the slots are
    the first k cells in flat order (a * m + b)."""
    inputs = [torch.ones(2, 2, 10, 2), torch.ones(2, 2, 10, 2), torch.ones(2, 2),
              torch.ones(2, 2), torch.ones(1, 2, 2, 2)]  # fmt: skip
    check_exact(impl, inputs, 4, 11, "none")
    _, slots = impl(*inputs, 4, 11, "none")
    cells = torch.arange(11)
    assert slots[0, 0].tolist() == ((cells // 4) * 10 + cells % 4).tolist()


@pytest.mark.parametrize("activation", ["none", "relu", "softmax"])
@pytest.mark.parametrize("impl", IMPLS)
def test_many_equal_scores(impl: Callable[..., Any], activation: str) -> None:
    """Scores from {-1, 0, 1}: hundreds of exact ties on each side and on the grid, and
    signed zeros (0 · -1 is -0.0, which ties with 0.0)."""
    check_exact(impl, integer_inputs(3, 2, 40, 2, 2, low=-1, high=2), 8, 20, activation)


@pytest.mark.parametrize("impl", IMPLS)
def test_signed_zeros_tie(impl: Callable[..., Any]) -> None:
    """Row keys 0.0 and -0.0 alternately: the reference's merged scores are 0.0 and -0.0
    (the kernels' fma with +0.0 gives 0.0 for both), all ties, lower index first."""
    row = torch.zeros(1, 1, 8, 1)
    row[..., 1::2, :] = -0.0
    col = torch.arange(8.0).view(1, 1, 8, 1)
    inputs = [row, col, torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1, 1, 1)]
    check_exact(impl, inputs, 5, 6, "none")
    _, slots = impl(*inputs, 5, 6, "none")
    assert (slots[0, 0] // 8).tolist() == [0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_infinities(impl: Callable[..., Any], activation: str) -> None:
    """NaN of either sign above +inf, +inf above every number, -inf below; NaN grid cells
    (inf · 0, inf - inf) first by flat index."""
    inputs = integer_inputs(4, 2, 12, 2, 2)
    row, col = inputs[0], inputs[1]
    row[0, 0, 3] = NAN
    row[0, 1, 7, 1] = -NAN
    col[1, 0, [2, 9], 0] = INF
    row[1, 1, 4] = -INF
    col[2, 0, 5] = INF
    row[2, 0, 6, 0] = NAN
    row[3] = -INF  # every row key -inf: grid cells ±inf and NaN
    check_exact(impl, inputs, 5, 9, activation)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_weight_makes_a_whole_side_nan(impl: Callable[..., Any]) -> None:
    """Every merged score NaN on one side: candidates 0..m-1 in index order."""
    inputs = integer_inputs(2, 2, 9, 2, 1)
    inputs[3][1, 0] = NAN
    check_exact(impl, inputs, 4, 6, "none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_inputs_select_exactly(impl: Callable[..., Any], dtype: torch.dtype) -> None:
    """fp16/bf16 inputs are computed in fp32: small integers stay exact, the scores are
    the fp32 values rounded once."""
    inputs = [x.to(dtype) for x in integer_inputs(3, 2, 23, 2, 2)]
    check_exact(impl, inputs, 6, 9, "none")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_select_exactly(impl: Callable[..., Any]) -> None:
    """Scores as non-contiguous views (every stride differs from the packed layout) and
    weights/cores as strided slices."""
    row_wide, col_wide, u, v, cores = integer_inputs(6, 3, 14, 4, 2)
    row = row_wide.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2, :, 1::2]
    col = col_wide.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)[:, 1:, :, ::2]
    assert not row.is_contiguous() and not col.is_contiguous()
    inputs = [row, col, u[::2, :2], v[1:, 1:3], cores[:, ::2, 1:3, :2]]
    check_exact(impl, inputs, 5, 12, "none")


@pytest.mark.parametrize(
    ("shape", "topm", "topk"),
    [
        ((1, 1, 9, 2, 2), 4, 4),  # k = m, one token, one head
        ((2, 1, 6, 2, 1), 6, 36),  # m = n, k = m²: every slot, in score order
        ((1, 2, 5, 3, 2), 5, 7),  # m = n, not a power of two
        ((3, 1, 1, 1, 1), 1, 1),  # n = m = k = 1
        ((1, 1, 17, 2, 2), 1, 1),  # one candidate a side, one slot
        ((2, 2, 33, 2, 2), 2, 4),  # m = 2: the smallest selection network
    ],
    ids=["k=m-T1-H1", "m=n-exhaustive", "m=n-odd", "n=1", "m=1", "m=2"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_edge_sizes(impl: Callable[..., Any], shape: tuple[int, ...], topm: int, topk: int) -> None:
    check_exact(impl, integer_inputs(*shape), topm, topk, "none")


@pytest.mark.parametrize("impl", IMPLS)
def test_exhaustive_grid_selects_every_slot_once(impl: Callable[..., Any]) -> None:
    inputs = integer_inputs(2, 1, 6, 2, 1)
    _, slots = impl(*inputs, 6, 36, "none")
    for t in range(2):
        assert sorted(slots[t, 0].tolist()) == list(range(36))


@pytest.mark.parametrize("impl", IMPLS)
def test_paper_sizes_one_token(impl: Callable[..., Any]) -> None:
    """n = 1024, m = k = 32, 2 heads, 2 cores, bf16 inputs: the block sizes of the paper's
    layer, with planted ties (small integers) and duplicated keys."""
    inputs = [x.to(torch.bfloat16) for x in integer_inputs(1, 2, 1024, 2, 2)]
    for x in inputs[:2]:
        x[:, :, 512:] = x[:, :, :512]
    check_exact(impl, inputs, 32, 32, "none")


def near_ties(n: int, group: int) -> Tensor:
    """Scores whose first ``group`` (1 + j ulp at index j) differ only in their last bits,
    rising with the index, the rest well below and falling: a kernel that ranked them by
    their high bits and the index (a short key) would get the group backwards."""
    x = 0.5 - torch.arange(n, dtype=torch.float32) / (4 * n)
    x[:group] = 1.0 + torch.arange(group, dtype=torch.float32) * torch.finfo(torch.float32).eps
    return x


def split_rank_inputs(
    row_merge: Tensor, row_grid: Tensor, col_merge: Tensor, col_grid: Tensor
) -> list[Tensor]:
    """r = 2 with u = v = (1, 0) and the core [[0, 0], [0, 1]]: candidates rank by the
    first rank's scores, grid cells are ``row_grid[a] · col_grid[b]`` (exact here)."""
    row = torch.stack([row_merge, row_grid], -1).view(1, 1, -1, 2)
    col = torch.stack([col_merge, col_grid], -1).view(1, 1, -1, 2)
    first = torch.tensor([[1.0, 0.0]])
    return [row, col, first, first.clone(), torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])]


N = 16
FALLING = 1.0 - torch.arange(N, dtype=torch.float32) / N


@pytest.mark.parametrize(
    ("topm", "topk", "want"),
    [(6, 4, [5, 4, 3, 2]), (4, 4, [5, 4, 3, 2]), (6, 8, [5, 4, 3, 2, 1, 0, 5 + N, 4 + N])],
    ids=["group-inside-m", "m-th-inside-group", "k>m"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_candidates_apart_in_the_last_bits(
    impl: Callable[..., Any], topm: int, topk: int, want: list[int]
) -> None:
    """Six row scores a few ulps apart, inside the m selected (their order needs the last
    bits: the grid ties across rows, so the candidates' order decides) or across the m-th
    (the set needs them)."""
    inputs = split_rank_inputs(near_ties(N, 6), torch.ones(N), FALLING, FALLING)
    check_exact(impl, inputs, topm, topk, "none")
    _, slots = impl(*inputs, topm, topk, "none")
    rows, cols = slots[0, 0] // N, slots[0, 0] % N
    assert [int(r) + N * int(c) for r, c in zip(rows, cols, strict=True)] == want


@pytest.mark.parametrize(
    ("topm", "topk", "want"),
    [(6, 6, [5, 4, 3, 2, 1, 0]), (6, 4, [5, 4, 3, 2]), (8, 7, [5, 4, 3, 2, 1, 0, N + 5])],
    ids=["group-inside-k", "k-th-inside-group", "group-then-next-row"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_grid_cells_apart_in_the_last_bits(
    impl: Callable[..., Any], topm: int, topk: int, want: list[int]
) -> None:
    """Six grid cells of row 0 a few ulps apart (column scores), against the candidates'
    order: inside the k selected or across the k-th."""
    row_grid = torch.full((N,), 0.25)
    row_grid[0] = 1.0
    row_grid[1] = 0.5 if topk == 7 else 0.25
    inputs = split_rank_inputs(FALLING, row_grid, FALLING, near_ties(N, 6))
    check_exact(impl, inputs, topm, topk, "none")
    _, slots = impl(*inputs, topm, topk, "none")
    assert slots[0, 0].tolist() == want


@pytest.mark.parametrize(
    ("tokens", "warps"), [(1, 8), (64, 8), (4096, 1), (None, 4)], ids=["T1", "T64", "T4096", "T?"]
)
def test_warps_follow_the_programs(tokens: int | None, warps: int) -> None:
    """Paper sizes: a few programs get many warps (latency), many get one (issue rate), an
    unknown count (the ahead-of-time bundle) the middle."""
    from ultramem.kernels import retrieve_launch_config

    config = retrieve_launch_config(2, 1024, 2, 2, 32, 32, "none", tokens=tokens, sms=132)
    assert config.num_warps == warps
    assert config.grid(5) == (5, 2, 1)
