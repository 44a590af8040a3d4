"""``aggregate_triton`` against ``aggregate_reference``, and the reference against a naive loop.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1``). Outputs within the tolerance of their dtype (``TOLERANCES``):
scatter pooling is exact, scatter-add may differ in the summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from ultramem.kernels import aggregate_reference, aggregate_triton, triton_on_cpu
from ultramem.tests.kernels.compare import assert_close
from ultramem.tests.kernels.implementations import implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = implementations(aggregate_triton, "aggregate")

# (dtype, atol, rtol) of the pooled output: fp32 sums of up to H·k products, then one
# rounding to the values' dtype
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]


@dataclass(frozen=True)
class Case:
    """One aggregation: ``inputs()`` draws its tensors (maps of kind ``maps``), ``attributes``
    its op attributes."""

    tokens: int
    heads: int
    k: int
    n_cores: int
    rows: int
    dim: int
    maps: str
    groups: int
    pooling: str

    def inputs(self, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        return make_inputs(self.tokens, self.heads, self.k, self.n_cores, self.rows, self.dim,
                           self.maps, self.groups, **kwargs)  # fmt: skip

    @property
    def attributes(self) -> tuple[int, str]:
        return self.groups, self.pooling


CASES = [
    pytest.param(Case(1, 1, 4, 1, 16, 32, "none", 1, "add"), id="T1-no-maps"),
    pytest.param(Case(7, 2, 5, 2, 20, 12, "shuffle", 4, "add"), id="T7-authors-shuffle"),
    pytest.param(Case(13, 1, 8, 1, 9, 5, "rows", 1, "add"), id="T13-Dv5-row-map"),
    pytest.param(Case(3, 4, 8, 2, 10, 48, "per-head", 16, "scatter"), id="H4-per-head-scatter"),
    pytest.param(Case(5, 2, 7, 2, 12, 20, "shuffle", 1, "scatter"), id="scatter-G1"),
    pytest.param(Case(2, 4, 16, 1, 64, 300, "shuffle", 4, "scatter"), id="Dv300-multiblock"),
    pytest.param(Case(6, 2, 3, 2, 7, 6, "per-head-int32", 6, "add"), id="G6-int32-maps"),
    pytest.param(Case(4, 4, 80, 1, 40, 8, "rows", 2, "add"), id="Hk320-chunked"),
    # column blocks of 64 inside each core's chunk of 128: one weight a selection and block
    pytest.param(Case(3, 2, 40, 2, 30, 256, "shuffle", 4, "add"), id="Dv256-block-per-core"),
    pytest.param(Case(2, 3, 30, 4, 24, 512, "rows", 1, "scatter"), id="Dv512-M4-scatter"),
]


def maps_for(
    kind: str, heads: int, rows: int, groups: int
) -> tuple[int, Tensor | None, Tensor | None]:
    """(slot count S, row_map, group_map) of one kind of lookup:

    ``none`` slots are rows; ``rows`` a [1, S] row map (three slots per row, no groups);
    ``shuffle`` the authors' IVE (a global permutation p of S = R·G slots, row p mod R,
    group p div R); ``per-head`` PyPI ultra-mem (a table per head: row h·R + s // E, group
    h·E + a per-row permutation of E ids, E = G / H), ``-int32`` the same maps as int32.
    """
    if kind == "none":
        return rows, None, None
    if kind == "rows":
        slots = 3 * rows
        return slots, torch.randint(0, rows, (1, slots)), None
    if kind == "shuffle":
        perm = torch.randperm(rows * groups).view(1, -1)
        return rows * groups, perm % rows, (perm // rows if groups > 1 else None)
    expansion = groups // heads
    per_row = rows // heads  # the table holds H tables of per_row rows each
    slots = per_row * expansion
    ids = torch.stack([torch.randperm(expansion) for _ in range(per_row)]).reshape(1, -1)
    head = torch.arange(heads).view(-1, 1)
    row_map = head * per_row + torch.arange(slots).view(1, -1) // expansion
    group_map = head * expansion + ids
    if kind.endswith("int32"):
        return slots, row_map.int(), group_map.int()
    return slots, row_map, group_map


def make_inputs(
    tokens: int,
    heads: int,
    k: int,
    n_cores: int,
    value_rows: int,
    value_dim: int,
    maps: str,
    groups: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    values = torch.randn(value_rows, value_dim)
    weights = torch.randn(tokens, heads, k, n_cores)
    slot_ids, row_map, group_map = maps_for(maps, heads, value_rows, groups)
    slots = torch.randint(0, slot_ids, (tokens, heads, k))
    # plant repeats: the same slot twice, and one row under two slots; with H·k > G every
    # token also has groups hit more than once
    slots[:, 0, -1] = slots[:, -1, 0]
    if heads * k > 2:
        slots[:, 0, min(1, k - 1)] = (slots[:, 0, 0] + value_rows) % slot_ids

    def device(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(DEVICE)

    return (
        values.to(dtype).to(DEVICE),
        weights.to(dtype).to(DEVICE),
        slots.to(DEVICE),
        device(row_map),
        device(group_map),
    )


def naive_aggregate(
    values: Tensor,
    weights: Tensor,
    slots: Tensor,
    row_map: Tensor | None,
    group_map: Tensor | None,
    groups: int,
    pooling: str,
    *,
    skip_out_of_range: bool = False,
) -> Tensor:
    """docs/ultramem.md, steps 7-8, one selection at a time in order, written independently.
    With ``skip_out_of_range``, a selection whose slot, row or group is out of range is left
    out (what the kernel does where nothing checked the indices)."""
    tokens, heads, k, n_cores = weights.shape
    value_dim = values.shape[1]
    chunk = value_dim // n_cores
    pooled = torch.zeros(tokens, groups, value_dim, dtype=torch.float64)

    def look_up(index_map: Tensor | None, h: int, slot: int, default: int) -> int:
        if index_map is None:
            return default
        return int(index_map[h if index_map.shape[0] > 1 else 0, slot])

    for t in range(tokens):
        for h in range(heads):
            for j in range(k):
                slot = int(slots[t, h, j])
                if skip_out_of_range and not 0 <= slot < (
                    values.shape[0] if row_map is None else row_map.shape[1]
                ):
                    continue
                row = look_up(row_map, h, slot, slot)
                group = look_up(group_map, h, slot, 0)
                if skip_out_of_range and not (0 <= row < values.shape[0] and 0 <= group < groups):
                    continue
                weighted = values[row].double().clone()
                for c in range(n_cores):
                    weighted[c * chunk : (c + 1) * chunk] *= float(weights[t, h, j, c])
                if pooling == "add":
                    pooled[t, group] += weighted
                else:
                    pooled[t, group] = weighted
    return pooled


def cpu(args: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    return [x.cpu() if x is not None else None for x in args]


@pytest.mark.parametrize("pooling", ["add", "scatter"])
@pytest.mark.parametrize(("maps", "groups"), [("shuffle", 4), ("per-head", 4), ("none", 3)])
def test_reference_matches_naive_loop(maps: str, groups: int, pooling: str) -> None:
    args = cpu(make_inputs(3, 2, 4, 2, 6, 8, maps, groups))
    got = aggregate_reference(*args, groups, pooling)
    want = naive_aggregate(*args, groups, pooling)
    assert_close("pooled", got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_matches_reference(impl: Callable[..., Any], case: Case) -> None:
    args = case.inputs()
    got = impl(*args, *case.attributes)
    want = aggregate_reference(*args, *case.attributes)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("impl", IMPLS)
def test_random_shapes(impl: Callable[..., Any], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    heads, n_cores = draw(1, 4), draw(1, 2)
    maps = ["none", "rows", "shuffle", "per-head"][seed % 4]
    pooling = ["add", "scatter"][(seed // 2) % 2]
    groups = heads * draw(1, 3) if maps == "per-head" else draw(1, 4)
    rows = heads * draw(1, 10)
    args = make_inputs(draw(1, 13), heads, draw(1, 20), n_cores, rows, n_cores * draw(1, 70),
                       maps, groups)  # fmt: skip
    got = impl(*args, groups, pooling)
    want = aggregate_reference(*args, groups, pooling)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pooling", ["add", "scatter"])
@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision(
    impl: Callable[..., Any], dtype: torch.dtype, atol: float, rtol: float, pooling: str
) -> None:
    args = make_inputs(5, 2, 6, 2, 12, 24, "shuffle", 4, dtype=dtype)
    got = impl(*args, 4, pooling)
    want = aggregate_reference(*args, 4, pooling)
    assert_close("pooled", got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("pooling", ["add", "scatter"])
@pytest.mark.parametrize("impl", IMPLS)
def test_int32_slots_strided_values_and_maps(impl: Callable[..., Any], pooling: str) -> None:
    values, weights, slots, row_map, group_map = make_inputs(4, 2, 5, 2, 10, 16, "shuffle", 4)
    wide = torch.randn(16, 10, device=DEVICE)
    wide.t()[:] = values  # the table as a transposed view: strides (1, 10), read in place
    strided_map = torch.stack([row_map, row_map], -1)[..., 1]  # stride 2
    got = impl(wide.t(), weights, slots.int(), strided_map, group_map, 4, pooling)
    want = aggregate_reference(values, weights, slots, row_map, group_map, 4, pooling)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


def test_op_dispatches_to_triton_on_cpu_when_asked() -> None:
    args = make_inputs(3, 2, 4, 2, 8, 16, "shuffle", 2)
    with triton_on_cpu():
        got = torch.ops.ultramem.aggregate(*args, 2)
    want = aggregate_reference(*args, 2)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


def _bad(change: dict) -> dict:
    args = {
        "values": torch.randn(8, 4),
        "weights": torch.randn(2, 1, 3, 2),
        "slots": torch.zeros(2, 1, 3, dtype=torch.int64),
        "row_map": None,
        "group_map": None,
        "groups": 2,
        "pooling": "add",
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slots": torch.full((2, 1, 3), 8)}, r"slots must lie in \[0, 8\)"),
        ({"slots": torch.full((2, 1, 3), -1)}, "slots must lie in"),
        ({"row_map": torch.tensor([[0, 1, 99] + [0] * 13]), "slots": torch.full((2, 1, 3), 2)},
         "row_map entries must lie in"),
        ({"group_map": torch.tensor([[0, 2, 1, 1]])}, r"group_map entries must lie in \[0, 2\)"),
        ({"row_map": torch.arange(4).view(1, 4), "slots": torch.full((2, 1, 3), 5)}, r"\[0, 4\)"),
        ({"row_map": torch.zeros(3, 4, dtype=torch.int64)}, r"\[1, S\]"),
        ({"row_map": torch.zeros(1, 4), "slots": torch.full((2, 1, 3), 1)}, "row_map must be"),
        ({"values": torch.randn(8)}, "values must be"),
        ({"weights": torch.randn(2, 1, 4, 2)}, "k = 4 elsewhere"),
        ({"weights": torch.randn(2, 1, 3, 3)}, "equal chunks"),
        ({"slots": torch.zeros(2, 1, 3)}, "slots must be int64, int32"),
        ({"pooling": "max"}, "pooling must be"),
        ({"groups": 0}, "groups must be >= 1"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_triton(**_bad(change))


def test_unchecked_out_of_range_slots_read_nothing() -> None:
    """The compiled path cannot raise on data: a bad slot must contribute nothing."""
    args = _bad({"slots": torch.tensor([[[0, 8, -3]], [[1, 2, 1 << 40]]])})
    got = aggregate_triton(**args, check_indices=False)
    args["slots"] = torch.tensor([[[0, 0, 0]], [[1, 2, 0]]])
    args["weights"][0, 0, 1:] = 0.0
    args["weights"][1, 0, 2] = 0.0
    assert_close("pooled", got, aggregate_reference(**args), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pooling", ["add", "scatter"])
def test_unchecked_bad_slots_and_map_entries_read_nothing(pooling: str) -> None:
    """Dv 128 over 2 cores (a weight a selection per block of 64), 80 selections (two
    chunks): a slot, a row or a group out of range leaves its selection out, in add and in
    scatter (where it must not be the last of its group either)."""
    values, weights, slots, row_map, group_map = cpu(make_inputs(3, 2, 40, 2, 30, 128,
                                                                 "shuffle", 4))  # fmt: skip
    assert row_map is not None and group_map is not None
    row_map, group_map = row_map.clone(), group_map.clone()
    slots[0, 0, 3], slots[1, 1, 5] = -1, row_map.shape[1] + 7
    row_map[0, slots[2, 0, 1]] = values.shape[0] + 3
    group_map[0, slots[2, 1, 39]] = 4  # the last selection of token 2
    group_map[0, slots[0, 1, 7]] = -2
    got = aggregate_triton(values, weights, slots, row_map, group_map, 4, pooling,
                           check_indices=False)  # fmt: skip
    want = naive_aggregate(values, weights, slots, row_map, group_map, 4, pooling,
                           skip_out_of_range=True)  # fmt: skip
    assert_close("pooled", got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
class TestAggregateCuda:
    """The registered op on CUDA tensors: Triton eagerly and under torch.compile."""

    @pytest.mark.parametrize("case", CASES)
    def test_op_matches_reference(self, case: Case) -> None:
        args = case.inputs()
        got = torch.ops.ultramem.aggregate(*args, *case.attributes)
        want = aggregate_reference(*cpu(args), *case.attributes)
        assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES, ids=["fp32", "fp16", "bf16"])
    def test_paper_scale(self, dtype: torch.dtype, atol: float, rtol: float) -> None:
        args = make_inputs(64, 2, 32, 2, 1 << 18, 256, "shuffle", 4, dtype=dtype)
        got = torch.ops.ultramem.aggregate(*args, 4)
        want = aggregate_reference(*cpu(args), 4)
        assert_close("pooled", got, want, atol=atol, rtol=rtol)

    def test_compiled_runs_the_triton_kernel(self) -> None:
        from torch._inductor.utils import run_and_get_code

        args = make_inputs(9, 2, 8, 2, 32, 64, "shuffle", 4)

        def pool(*xs: Tensor) -> Tensor:
            return torch.ops.ultramem.aggregate(*xs, 4, "scatter")

        got, code = run_and_get_code(torch.compile(pool, fullgraph=True), *args)
        assert "_aggregate_kernel" in "\n".join(code)
        want = aggregate_reference(*args, 4, "scatter")
        assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def map_measurements(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Every map whose range is measured on the device (a reduction and a sync), in order."""
    from ultramem.kernels import aggregate as module

    measured: list[Tensor] = []
    measure = module._measure_range

    def counting(index_map: Tensor) -> tuple[int, int]:
        measured.append(index_map)
        return measure(index_map)

    monkeypatch.setattr(module, "_measure_range", counting)
    return measured


def test_maps_are_measured_once(map_measurements: list[Tensor]) -> None:
    """The maps are the same buffers every call: the second call reads no map again."""
    args = make_inputs(3, 2, 4, 2, 20, 8, "shuffle", 4)
    first = aggregate_triton(*args, 4)
    assert [m is args[3] or m is args[4] for m in map_measurements] == [True, True]
    second = aggregate_triton(*args, 4)
    assert len(map_measurements) == 2
    assert torch.equal(first, second)


def test_a_map_not_seen_before_is_still_refused(map_measurements: list[Tensor]) -> None:
    values, weights, slots, row_map, group_map = make_inputs(3, 2, 4, 2, 20, 8, "shuffle", 4)
    aggregate_triton(values, weights, slots, row_map, group_map, 4)
    bad = row_map.clone()
    bad[0, -1] = 20
    with pytest.raises(ValueError, match=r"row_map entries must lie in \[0, 20\), got \[0, 20\]"):
        aggregate_triton(values, weights, slots, bad, group_map, 4)
    # the known map is measured against each call's bounds: 4 groups fit, 3 do not
    with pytest.raises(ValueError, match=r"group_map entries must lie in \[0, 3\)"):
        aggregate_triton(values, weights[:, :, :, :1], slots, row_map, group_map, 3)
    assert len(map_measurements) == 3


def test_a_map_written_in_place_is_measured_again(map_measurements: list[Tensor]) -> None:
    values, weights, slots, row_map, group_map = make_inputs(2, 1, 3, 1, 16, 4, "shuffle", 2)
    aggregate_triton(values, weights, slots, row_map, group_map, 2)
    group_map[0, 0] = -1
    with pytest.raises(ValueError, match=r"group_map entries must lie in \[0, 2\), got \[-1, "):
        aggregate_triton(values, weights, slots, row_map, group_map, 2)
    assert len(map_measurements) == 3
