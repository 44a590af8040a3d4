"""Adversarial tests of ``aggregate_triton``, written from the op's specification only.

Every test calls the Triton launcher (on a CPU it runs under Triton's interpreter:
tests/conftest.py sets ``TRITON_INTERPRET=1``) and compares it with ``aggregate_reference``,
and where the expected output can be written down in closed form (integer-valued tables and
weights), with that too, exactly. The cases are the ones the specification allows and a
kernel easily gets wrong: value dims that are neither powers of two nor multiples of 64, the
core of column ``d`` being ``d // (Dv // M)``, H·k selections spanning several chunks, groups
and maps of every kind (shared ``[1, S]`` and per-head ``[H, S]``, int32 and int64), the
"last of the H·k wins" rule of scatter pooling, non-finite values that must stay in the
groups that read them, and strided (non-contiguous) inputs.

Tolerances (``check``): fp32 scatter-add ``atol = rtol = 1e-5`` (the summation order may
differ), fp32 scatter exact; fp16/bf16, both sides in that dtype, at most one unit in the last
place of the reference (plus ``1e-5`` for scatter-add); NaN where the reference has NaN and
the same infinities everywhere. The closed-form cases are exact. (Half-precision scatter is
not held to bit equality: Triton 3.9's interpreter rounds fp32 -> bf16 toward zero, not to
nearest even, so on a CPU about half of all bf16 outputs sit one ulp closer to zero than the
reference.)
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ultramem.kernels.aggregate import aggregate_reference
from ultramem.kernels.aggregate_triton import aggregate_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POOLINGS = ["add", "scatter"]
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def ulp(x: Tensor) -> Tensor:
    """The spacing of ``x``'s dtype at ``|x|`` (finite x), in fp64."""
    up = torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype))
    return up.double() - x.abs().double()


def check(got: Tensor, want: Tensor, pooling: str = "add") -> None:
    """``got`` equals ``want`` within the tolerance of its dtype and pooling, with NaN where
    the reference has NaN and the same infinities: fp32 scatter exact, fp32 add
    ``atol = rtol = 1e-5``; fp16/bf16 (both already in that dtype) at most one unit in the
    last place of ``want`` (plus ``1e-5`` for add, where fp32 sums in another order can
    cancel to values whose ulp is smaller than their rounding error)."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
    got, want = got.cpu(), want.cpu()
    if want.dtype == torch.float32:
        tol = 0.0 if pooling == "scatter" else 1e-5
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
        return
    finite = torch.isfinite(want)
    # non-finite entries: the same NaN / the same infinity, and finite where want is
    torch.testing.assert_close(
        got[~finite], want[~finite], atol=0.0, rtol=0.0, equal_nan=True, check_dtype=True
    )
    assert torch.isfinite(got[finite]).all(), "non-finite where the reference is finite"
    diff = (got[finite].double() - want[finite].double()).abs()
    limit = ulp(want[finite]) + (1e-5 if pooling == "add" else 0.0)
    over = diff > limit
    if over.any():
        idx = finite.nonzero()[over.nonzero()[:5, 0]].tolist()
        pytest.fail(
            f"{int(over.sum())}/{finite.sum()} entries off by more than one ulp of "
            f"{want.dtype}; max abs diff {float(diff.max())}; first (t, g, d): {idx}, "
            f"got {[float(got[tuple(i)]) for i in idx]}, want "
            f"{[float(want[tuple(i)]) for i in idx]}"
        )


def dev(*xs: Tensor | None) -> list[Tensor | None]:
    """The tensors on the test device (None stays None)."""
    return [None if x is None else x.to(DEVICE) for x in xs]


def run_both(
    values: Tensor,
    weights: Tensor,
    slots: Tensor,
    row_map: Tensor | None,
    group_map: Tensor | None,
    groups: int,
    pooling: str,
) -> tuple[Tensor, Tensor]:
    """(Triton, reference) on the same inputs; the reference reads contiguous copies."""
    got = aggregate_triton(values, weights, slots, row_map, group_map, groups, pooling)

    def dense(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.contiguous()

    want = aggregate_reference(
        dense(values), dense(weights), dense(slots), dense(row_map), dense(group_map),
        groups, pooling,
    )  # fmt: skip
    return got, want


def selections(
    slots: Tensor, row_map: Tensor | None, group_map: Tensor | None
) -> list[list[tuple[int, int, int, int]]]:
    """Per token, its (h, j, row, group) in the order the spec pools them (head-major),
    derived here with plain indexing."""
    tokens, heads, k = slots.shape

    def look_up(index_map: Tensor | None, h: int, s: int, default: int) -> int:
        if index_map is None:
            return default
        return int(index_map[h if index_map.shape[0] > 1 else 0, s])

    out = []
    for t in range(tokens):
        picks = []
        for h in range(heads):
            for j in range(k):
                s = int(slots[t, h, j])
                picks.append((h, j, look_up(row_map, h, s, s), look_up(group_map, h, s, 0)))
        out.append(picks)
    return out


def random_inputs(
    tokens: int,
    heads: int,
    k: int,
    n_cores: int,
    rows: int,
    dim: int,
    groups: int,
    *,
    slot_ids: int | None = None,
    map_heads: int | None = 1,
    row_map: bool = True,
    group_map: bool = True,
    index_dtype: torch.dtype = torch.int64,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Random values/weights and slots; maps ``[map_heads, S]`` when asked (S = 2R, or R
    without a row map: a slot is then its row)."""
    slot_ids = (slot_ids or 2 * rows) if row_map else rows
    values = torch.randn(rows, dim).to(dtype)
    weights = torch.randn(tokens, heads, k, n_cores).to(dtype)
    slots = torch.randint(0, slot_ids, (tokens, heads, k)).to(index_dtype)
    shape = (map_heads or 1, slot_ids)
    rmap = torch.randint(0, rows, shape).to(index_dtype) if row_map else None
    gmap = torch.randint(0, groups, shape).to(index_dtype) if group_map else None
    return (
        values.to(DEVICE),
        weights.to(DEVICE),
        slots.to(DEVICE),
        None if rmap is None else rmap.to(DEVICE),
        None if gmap is None else gmap.to(DEVICE),
    )


# (Dv, M): Dv / M is 64 or 128 exactly, smaller than 64, and neither power of two nor a
# multiple of 64
DIMS_AND_CORES = [
    (1, 1),
    (3, 3),
    (12, 4),
    (65, 1),
    (130, 1),
    (130, 2),
    (128, 2),
    (192, 3),
    (256, 4),
    (320, 2),
    (384, 3),
]
DIMS_AND_CORES_IDS = [f"Dv{d}-M{m}-chunk{d // m}" for d, m in DIMS_AND_CORES]


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("dim", "n_cores"), DIMS_AND_CORES, ids=DIMS_AND_CORES_IDS)
def test_value_dims_and_cores(dim: int, n_cores: int, pooling: str) -> None:
    args = random_inputs(3, 2, 5, n_cores, 9, dim, 3)
    got, want = run_both(*args, 3, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(
    ("dim", "n_cores"),
    [dm for dm in DIMS_AND_CORES if dm[1] > 1],
    ids=[i for i, dm in zip(DIMS_AND_CORES_IDS, DIMS_AND_CORES, strict=True) if dm[1] > 1],
)
def test_core_of_each_column_is_d_div_chunk(dim: int, n_cores: int, pooling: str) -> None:
    """A table of ones and weights ``c + 1`` at core c: column d pools ``d // (Dv / M) + 1``
    per selection, exactly (closed form, no reference)."""
    tokens, heads, k = 2, 2, 3
    values = torch.ones(5, dim, device=DEVICE)
    cores = torch.arange(1, n_cores + 1, dtype=torch.float32, device=DEVICE)
    weights = cores.expand(tokens, heads, k, n_cores).contiguous()
    slots = torch.randint(0, 5, (tokens, heads, k), device=DEVICE)
    got = aggregate_triton(values, weights, slots, None, None, 1, pooling).cpu()
    per_column = (torch.arange(dim) // (dim // n_cores) + 1).float()
    times = heads * k if pooling == "add" else 1
    want = (times * per_column).expand(tokens, 1, dim)
    torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)


# H·k = 1, 63, 64, 65, 129 selections per token
SELECTIONS = [(1, 1), (1, 63), (4, 16), (1, 65), (5, 13), (1, 129)]
SELECTIONS_IDS = [f"H{h}-k{k}-Hk{h * k}" for h, k in SELECTIONS]


@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("heads", "k"), SELECTIONS, ids=SELECTIONS_IDS)
def test_selection_counts_closed_form(heads: int, k: int, pooling: str, groups: int) -> None:
    """Selection i (head-major) reads a row of ones with weight i + 1 into group i mod G:
    add pools the sum of its weights, scatter the last one; groups no selection hits stay 0.
    A dropped chunk of selections, or one pooled twice, changes the integer."""
    tokens, dim, n_cores = 2, 70, 2
    count = heads * k
    slot_ids = 8 * groups  # a multiple of G: slot i mod S lies in group i mod G
    values = torch.ones(slot_ids, dim, device=DEVICE)
    index = torch.arange(count, dtype=torch.float32)
    weights = (index + 1).view(1, heads, k, 1).expand(tokens, heads, k, n_cores)
    slots = (torch.arange(count) % slot_ids).view(1, heads, k).expand(tokens, heads, k)
    group_map = (torch.arange(slot_ids) % groups).view(1, -1)
    got = aggregate_triton(
        values, weights.contiguous().to(DEVICE), slots.contiguous().to(DEVICE),
        None, group_map.to(DEVICE), groups, pooling,
    ).cpu()  # fmt: skip
    want = torch.zeros(tokens, groups, dim)
    for g in range(groups):
        members = index[index.long() % groups == g] + 1
        if members.numel():
            want[:, g] = members.sum() if pooling == "add" else members[-1]
    torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("heads", "k"), SELECTIONS, ids=SELECTIONS_IDS)
def test_selection_counts_random(heads: int, k: int, pooling: str) -> None:
    args = random_inputs(2, heads, k, 2, 30, 66, 3, map_heads=heads)
    got, want = run_both(*args, 3, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("map_heads", [1, 3], ids=["shared-map", "per-head-map"])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("groups", [1, 5, 8])
def test_groups_and_maps(
    groups: int, pooling: str, map_heads: int, index_dtype: torch.dtype
) -> None:
    args = random_inputs(7, 3, 7, 2, 11, 130, groups, map_heads=map_heads,
                         index_dtype=index_dtype)  # fmt: skip
    got, want = run_both(*args, groups, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_per_head_maps_use_the_head_row(pooling: str) -> None:
    """Per-head maps whose rows differ everywhere: reading row 0 of the map for every head
    (as for a shared map) pools other rows into other groups."""
    heads, slot_ids, rows, groups = 3, 6, 18, 6
    s = torch.arange(slot_ids)
    h = torch.arange(heads).view(-1, 1)
    row_map = h * slot_ids + s  # [H, S]: head h reads rows h·S + s
    group_map = (h * 2 + s) % groups  # [H, S]
    values = torch.randn(rows, 96)
    weights = torch.randn(4, heads, 4, 3)
    slots = torch.randint(0, slot_ids, (4, heads, 4))
    args = dev(values, weights, slots, row_map, group_map)
    got, want = run_both(*args, groups, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(
    ("slot_dtype", "map_dtype"),
    [(torch.int32, torch.int64), (torch.int64, torch.int32)],
    ids=["int32-slots-int64-maps", "int64-slots-int32-maps"],
)
def test_mixed_index_dtypes(slot_dtype: torch.dtype, map_dtype: torch.dtype, pooling: str) -> None:
    values, weights, slots, row_map, group_map = random_inputs(5, 2, 9, 3, 13, 192, 5,
                                                               map_heads=2)  # fmt: skip
    assert row_map is not None and group_map is not None
    got, want = run_both(values, weights, slots.to(slot_dtype), row_map.to(map_dtype),
                         group_map.to(map_dtype), 5, pooling)  # fmt: skip
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(
    ("row_map", "group_map"),
    [(False, False), (True, False), (False, True)],
    ids=["no-maps", "row-map-only", "group-map-only"],
)
def test_one_or_no_map(row_map: bool, group_map: bool, pooling: str) -> None:
    """Without a group map every selection pools into group 0: groups 1..G-1 stay 0."""
    args = random_inputs(7, 2, 6, 3, 10, 195, 3, row_map=row_map, group_map=group_map)
    got, want = run_both(*args, 3, pooling)
    check(got, want, pooling)
    if not group_map:
        assert torch.equal(got[:, 1:].cpu(), torch.zeros_like(got[:, 1:].cpu()))


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("groups", [3, 8])
def test_scatter_last_head_major_selection_wins(tokens: int, groups: int) -> None:
    """Group of a slot = slot mod G. Selection (h=2, j=0) and (h=1, j=4) share group 0:
    head-major the first comes later and wins (k-major the second would); other groups are
    hit by random slots or not at all, and those not hit must be exactly 0."""
    heads, k, slot_ids = 3, 5, 4 * groups
    values = torch.randn(slot_ids, 72)
    weights = torch.randn(tokens, heads, k, 2)
    # random slots that avoid group 0 and group G - 1 (left unhit)
    free = torch.tensor([s for s in range(slot_ids) if 0 < s % groups < groups - 1])
    slots = free[torch.randint(0, free.numel(), (tokens, heads, k))]
    slots[:, 2, 0] = 0
    slots[:, 1, 4] = groups  # group 0 too, a different row
    group_map = (torch.arange(slot_ids) % groups).view(1, -1)
    args = dev(values, weights, slots, None, group_map)
    got, want = run_both(*args, groups, "scatter")
    check(got, want, "scatter")
    got = got.cpu()
    expected_0 = (values[0].view(2, 36) * weights[:, 2, 0].unsqueeze(-1)).reshape(tokens, 72)
    torch.testing.assert_close(got[:, 0], expected_0, atol=0.0, rtol=0.0)
    assert torch.equal(got[:, -1], torch.zeros(tokens, 72)), "an unhit group is not 0"
    # every other group holds its last selection, head-major
    for t, picks in enumerate(selections(slots, None, group_map)):
        last = {g: (h, j, r) for h, j, r, g in picks}
        for g in range(groups):
            if g not in last:
                assert torch.equal(got[t, g], torch.zeros(72)), f"token {t} group {g} not 0"
                continue
            h, j, r = last[g]
            w = (values[r].view(2, 36) * weights[t, h, j].unsqueeze(-1)).reshape(72)
            torch.testing.assert_close(got[t, g], w, atol=0.0, rtol=0.0)


@pytest.mark.parametrize(("heads", "k"), [(1, 129), (3, 43)])
def test_scatter_many_selections_two_groups(heads: int, k: int) -> None:
    """129 selections into two groups, spanning chunks: the very last one of each group wins."""
    values = torch.randn(40, 80)
    weights = torch.randn(3, heads, k, 4)
    slots = torch.randint(0, 40, (3, heads, k))
    group_map = (torch.arange(40) % 2).view(1, -1)
    args = dev(values, weights, slots, None, group_map)
    got, want = run_both(*args, 2, "scatter")
    check(got, want, "scatter")


# ---- non-finite values -------------------------------------------------------------------

NAN_ROW, INF_ROW, NEG_INF_ROW, NEG_ZERO_ROW = 0, 1, 2, 3


def nonfinite_case(
    tokens: int, groups: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """values [R, 130] (M = 2, chunks of 65) with NaN at columns 0, 64, 129 of row 0, +inf in
    core 1's chunk of row 1, -inf at column 63 of row 2, -0.0 across row 3; group of a row =
    row mod G, so group G - 1 reads only finite rows. Zero weights on the inf chunk of half
    the selections reading row 1 (0 · inf = NaN). Scatter: group 0's last selection reads a
    finite row (its NaN is overwritten); group 1's last reads row 1."""
    heads, k, rows, dim = 2, 9, 3 * groups, 130
    values = torch.randn(rows, dim)
    values[NAN_ROW, [0, 64, 129]] = float("nan")
    values[INF_ROW, 65:] = float("inf")
    values[NEG_INF_ROW, 63] = float("-inf")
    values[NEG_ZERO_ROW] = -0.0
    slots = torch.randint(0, rows, (tokens, heads, k))
    slots[:, 0, 0] = NAN_ROW
    slots[:, 0, 1] = INF_ROW
    slots[:, 0, 2] = NEG_INF_ROW
    slots[:, 0, 3] = NEG_ZERO_ROW
    slots[:, 0, 4] = groups - 1  # the finite-only group is hit
    slots[:, 1, 0] = 2 * groups - 1
    slots[:, -1, -2] = INF_ROW
    slots[:, -1, -1] = groups  # group 0, a finite row
    weights = torch.randn(tokens, heads, k, 2)
    zero = (slots == INF_ROW) & (torch.arange(k) % 2 == 1)
    weights[..., 1][zero] = 0.0
    group_map = (torch.arange(rows) % groups).view(1, -1)
    return values.to(dtype), weights.to(dtype), slots, group_map


# the interpreter's numpy reductions warn on inf + -inf = NaN, which is the expected result
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), *HALF])
@pytest.mark.parametrize(("tokens", "groups"), [(1, 8), (7, 5)])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_nonfinite_values_stay_in_their_groups(
    pooling: str, groups: int, tokens: int, dtype: torch.dtype
) -> None:
    values, weights, slots, group_map = nonfinite_case(tokens, groups, dtype)
    args = dev(values, weights, slots, None, group_map)
    got, want = run_both(*args, groups, pooling)
    check(got, want, pooling)
    # independent of the reference: which entries are non-finite, column by column
    bad = ~torch.isfinite(values.float())
    expected = torch.zeros(tokens, groups, values.shape[1], dtype=torch.bool)
    for t, picks in enumerate(selections(slots, None, group_map)):
        for _, _, row, group in picks:
            if pooling == "add":
                expected[t, group] |= bad[row]
            else:
                expected[t, group] = bad[row]
    nonfinite = ~torch.isfinite(got.cpu().float())
    leaked = nonfinite & ~expected
    assert not leaked.any(), f"non-finite leaked to (t, g, d) {leaked.nonzero()[:5].tolist()}"
    assert torch.equal(nonfinite, expected), "a NaN/inf went missing"
    assert torch.isfinite(got[:, -1].cpu().float()).all(), "the finite-only group is not finite"
    if pooling == "scatter":
        assert torch.isfinite(got[:, 0].cpu().float()).all(), "group 0's NaN was not overwritten"
        zeroed = weights[:, -1, -2, 1] == 0  # the last read of group 1: 0 · inf
        assert got[:, 1, 65:].cpu()[zeroed].isnan().all()


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), *HALF])
def test_scatter_keeps_negative_zero(dtype: torch.dtype) -> None:
    """Scatter assigns w: a row of -0.0 times a positive weight stays -0.0 (the reference's
    bits); a group never hit is +0.0."""
    values = torch.randn(4, 96).to(dtype)
    values[1] = -0.0
    weights = torch.rand(2, 1, 3, 2).add(0.5).to(dtype)
    slots = torch.tensor([[[0, 2, 1]], [[1, 3, 1]]])
    got, want = run_both(*dev(values, weights, slots), None, None, 2,
                         "scatter")  # fmt: skip
    check(got, want, "scatter")
    got, want = got.cpu(), want.cpu()
    assert want[:, 0].signbit().all(), "the reference keeps -0.0 (the test's premise)"
    assert torch.equal(got[:, 0].signbit(), want[:, 0].signbit()), "-0.0 lost its sign"
    assert not got[:, 1].signbit().any() and not got[:, 1].any(), "unhit group is not +0.0"


# ---- strides -----------------------------------------------------------------------------


def strided(x: Tensor, how: str) -> Tensor:
    """The same tensor, as a non-contiguous view: ``pad`` slices the last dim out of a wider
    buffer (and skips a leading row), ``every2`` takes every other element of the last dim,
    ``transposed`` stores it transposed (last two dims)."""
    if how == "pad":
        wide = torch.full((x.shape[0] + 1, *x.shape[1:-1], x.shape[-1] + 5), 7.0 if
                          x.is_floating_point() else 0, dtype=x.dtype)  # fmt: skip
        wide[1:, ..., 2 : 2 + x.shape[-1]] = x
        view = wide[1:, ..., 2 : 2 + x.shape[-1]]
    elif how == "every2":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., 1::2] = x
        view = wide[..., 1::2]
    else:
        view = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(view, x) and not view.is_contiguous()
    return view.to(DEVICE)


LAYOUTS = [
    ("values", "pad"),
    ("values", "transposed"),
    ("values", "every2"),
    ("weights", "transposed"),
    ("weights", "every2"),
    ("slots", "every2"),
    ("slots", "transposed"),
    ("row_map", "every2"),
    ("group_map", "every2"),
    ("all", "every2"),
]


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("which", "how"), LAYOUTS, ids=[f"{w}-{h}" for w, h in LAYOUTS])
def test_noncontiguous_inputs(which: str, how: str, pooling: str) -> None:
    names = ["values", "weights", "slots", "row_map", "group_map"]
    args = [x for x in random_inputs(7, 2, 6, 2, 12, 130, 5, map_heads=2) if x is not None]
    args = [x.cpu() for x in args]
    views = [
        strided(x, how) if which in (name, "all") else x.to(DEVICE)
        for name, x in zip(names, args, strict=True)
    ]
    got, want = run_both(*views, 5, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_broadcast_weights_and_offset_values(pooling: str) -> None:
    """Weights expanded along the core dim (stride 0) and a table that starts mid-storage
    with a row stride wider than Dv."""
    base = torch.randn(20, 200)
    values = base[3:15, 10:140]  # [12, 130], storage offset 610, row stride 200
    weights = torch.randn(5, 2, 7, 1).expand(5, 2, 7, 2)
    slots = torch.randint(0, 12, (5, 2, 7))
    group_map = torch.randint(0, 4, (1, 12))
    args = dev(values, weights, slots, None, group_map)
    got, want = run_both(*args, 4, pooling)
    check(got, want, pooling)


# ---- tokens and half precision -----------------------------------------------------------


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("tokens", [1, 7])
def test_tokens(tokens: int, pooling: str) -> None:
    args = random_inputs(tokens, 4, 17, 4, 16, 320, 8, map_heads=4)
    got, want = run_both(*args, 8, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("dim", "n_cores"), [(130, 2), (320, 4), (3, 1)])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision(dtype: torch.dtype, dim: int, n_cores: int, pooling: str) -> None:
    args = random_inputs(7, 3, 22, n_cores, 14, dim, 5, map_heads=3, dtype=dtype)
    got, want = run_both(*args, 5, pooling)
    check(got, want, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(
    ("value_dtype", "weight_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
    ids=["fp16-values-fp32-weights", "bf16-values-fp32-weights", "fp32-values-bf16-weights"],
)
def test_weights_of_another_float_dtype(
    value_dtype: torch.dtype, weight_dtype: torch.dtype, pooling: str
) -> None:
    """The weights may be any float dtype: the output takes the values' dtype."""
    values, weights, slots, row_map, group_map = random_inputs(5, 2, 9, 2, 12, 130, 4,
                                                               dtype=value_dtype)  # fmt: skip
    got, want = run_both(values, weights.to(weight_dtype), slots, row_map, group_map, 4, pooling)
    check(got, want, pooling)
