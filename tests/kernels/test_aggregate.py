"""``aggregate_triton`` against ``aggregate_reference``, and the reference against a naive loop.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1``). Outputs within the tolerance of their dtype (``TOLERANCES``):
scatter pooling is exact, scatter-add may differ in the summation order.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ultramem.kernels import aggregate_reference, aggregate_triton, triton_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) of the pooled output: fp32 sums of up to H·k products, then one
# rounding to the values' dtype
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]

CASE_FIELDS = (
    "tokens", "heads", "k", "n_cores", "rows", "dim", "expansion", "mapping", "pooling",
    "slot_map", "row_offset",
)  # fmt: skip
CASES = [
    pytest.param(1, 1, 4, 1, 16, 32, 1, "mod", "add", "none", 0, id="T1-E1"),
    pytest.param(7, 2, 5, 2, 20, 12, 4, "mod", "add", "perm", 3, id="T7-shuffle-offset"),
    pytest.param(13, 1, 8, 1, 9, 5, 4, "div", "add", "none", 0, id="T13-Dv5-div"),
    pytest.param(3, 4, 8, 2, 10, 48, 4, "div", "scatter", "rows", 7, id="H4-scatter-row-ids"),
    pytest.param(5, 2, 7, 2, 12, 20, 1, "mod", "scatter", "perm", 0, id="scatter-E1"),
    pytest.param(2, 4, 16, 1, 64, 300, 4, "mod", "scatter", "none", 1, id="Dv300-multiblock"),
    pytest.param(6, 2, 3, 2, 7, 6, 3, "div", "add", "perm", 5, id="E3-nonpow2"),
    pytest.param(4, 4, 80, 1, 40, 8, 2, "mod", "add", "perm", 0, id="Hk320-chunked"),
]


def slot_map_for(kind: str, value_rows: int, expansion: int) -> Tensor | None:
    """``none``, a global shuffle (the authors' IVE) or a per-row permutation of the E
    projection ids (others' ``idx // E`` mapping)."""
    if kind == "none":
        return None
    if kind == "perm":
        return torch.randperm(value_rows * expansion)
    ids = torch.stack([torch.randperm(expansion) for _ in range(value_rows)])
    return (torch.arange(value_rows)[:, None] * expansion + ids).reshape(-1)


def make_inputs(
    tokens: int,
    heads: int,
    k: int,
    n_cores: int,
    value_rows: int,
    value_dim: int,
    expansion: int,
    slot_map: str,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    values = torch.randn(value_rows, value_dim)
    scores = torch.randn(tokens, heads, k, n_cores)
    slots = torch.randint(0, value_rows * expansion, (tokens, heads, k))
    # plant repeats: the same slot twice, and (mod mapping, no slot map) one row under two
    # groups; with H·k > E every token also has groups hit more than once
    slots[:, 0, -1] = slots[:, -1, 0]
    if heads * k > 2:
        slots[:, 0, min(1, k - 1)] = (slots[:, 0, 0] + value_rows) % (value_rows * expansion)
    smap = slot_map_for(slot_map, value_rows, expansion)
    return (
        values.to(dtype).to(DEVICE),
        scores.to(dtype).to(DEVICE),
        slots.to(DEVICE),
        None if smap is None else smap.to(DEVICE),
    )


def assert_close(name: str, got: Tensor, want: Tensor, atol: float, rtol: float) -> None:
    """allclose with a report: mismatch count, the first few indices with both values."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{name}: NaN/Inf differ"
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        pairs = [(i, float(got[tuple(i)]), float(want[tuple(i)])) for i in where]
        pytest.fail(f"{name}: {int(bad.sum())}/{bad.numel()} mismatched; first {pairs}")


def naive_aggregate(
    values: Tensor,
    scores: Tensor,
    slots: Tensor,
    slot_map: Tensor | None,
    expansion: int,
    mapping: str,
    pooling: str,
    row_offset: int,
) -> Tensor:
    """ULTRAMEM.md steps 7-8, one selection at a time in order, written independently."""
    tokens, heads, k, n_cores = scores.shape
    value_rows, value_dim = values.shape
    chunk = value_dim // n_cores
    pooled = torch.zeros(tokens, expansion, value_dim, dtype=torch.float64)
    for t in range(tokens):
        for h in range(heads):
            for j in range(k):
                slot = int(slots[t, h, j])
                virtual = int(slot_map[slot]) if slot_map is not None else slot
                if mapping == "mod":
                    row, group = virtual % value_rows, virtual // value_rows
                else:
                    row, group = virtual // expansion, virtual % expansion
                row = (row + row_offset) % value_rows
                weighted = values[row].double().clone()
                for c in range(n_cores):
                    weighted[c * chunk : (c + 1) * chunk] *= float(scores[t, h, j, c])
                if pooling == "add":
                    pooled[t, group] += weighted
                else:
                    pooled[t, group] = weighted
    return pooled


@pytest.mark.parametrize("pooling", ["add", "scatter"])
@pytest.mark.parametrize(
    ("mapping", "slot_map", "row_offset"), [("mod", "perm", 0), ("div", "rows", 2)]
)
def test_reference_matches_naive_loop(
    mapping: str, slot_map: str, row_offset: int, pooling: str
) -> None:
    args = [x.cpu() if x is not None else None for x in make_inputs(3, 2, 4, 2, 6, 8, 4, slot_map)]
    got = aggregate_reference(*args, 4, mapping, pooling, row_offset)
    want = naive_aggregate(*args, 4, mapping, pooling, row_offset)
    assert_close("pooled", got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    CASE_FIELDS,
    CASES,
)
def test_triton_matches_reference(
    tokens: int,
    heads: int,
    k: int,
    n_cores: int,
    rows: int,
    dim: int,
    expansion: int,
    mapping: str,
    pooling: str,
    slot_map: str,
    row_offset: int,
) -> None:
    args = make_inputs(tokens, heads, k, n_cores, rows, dim, expansion, slot_map)
    got = aggregate_triton(*args, expansion, mapping, pooling, row_offset)
    want = aggregate_reference(*args, expansion, mapping, pooling, row_offset)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(16))
def test_random_shapes(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n_cores, expansion = draw(1, 2), [1, 2, 3, 4][draw(0, 3)]
    mapping, pooling = ["mod", "div"][seed % 2], ["add", "scatter"][(seed // 2) % 2]
    slot_map = ["none", "perm", "rows"][seed % 3]
    dim = n_cores * draw(1, 70)
    args = make_inputs(draw(1, 13), draw(1, 4), draw(1, 20), n_cores, draw(1, 30), dim,
                       expansion, slot_map)  # fmt: skip
    offset = draw(0, 40)
    got = aggregate_triton(*args, expansion, mapping, pooling, offset)
    want = aggregate_reference(*args, expansion, mapping, pooling, offset)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pooling", ["add", "scatter"])
def test_half_precision(dtype: torch.dtype, atol: float, rtol: float, pooling: str) -> None:
    args = make_inputs(5, 2, 6, 2, 12, 24, 4, "perm", dtype=dtype)
    got = aggregate_triton(*args, 4, "mod", pooling, 1)
    want = aggregate_reference(*args, 4, "mod", pooling, 1)
    assert_close("pooled", got, want, atol=atol, rtol=rtol)


def test_int32_slots_strided_values_and_slot_map() -> None:
    values, scores, slots, smap = make_inputs(4, 2, 5, 2, 10, 16, 4, "perm")
    wide = torch.randn(16, 10, device=DEVICE)
    wide.t()[:] = values  # the table as a transposed view: strides (1, 10)
    strided_map = torch.stack([smap, smap]).t()[:, 1]  # stride 2
    args = (wide.t(), scores, slots.int(), strided_map)
    got = aggregate_triton(*args, 4, "mod", "add", 2)
    want = aggregate_reference(values, scores, slots, smap, 4, "mod", "add", 2)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


def test_op_dispatches_to_triton_on_cpu_when_asked() -> None:
    args = make_inputs(3, 2, 4, 2, 8, 16, 2, "none")
    with triton_on_cpu():
        got = torch.ops.ultramem.aggregate(*args, 2)
    want = aggregate_reference(*args, 2)
    assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)


def _bad(change: dict) -> dict:
    args = {
        "values": torch.randn(8, 4),
        "scores": torch.randn(2, 1, 3, 2),
        "slots": torch.zeros(2, 1, 3, dtype=torch.int64),
        "slot_map": None,
        "expansion": 2,
        "mapping": "mod",
        "pooling": "add",
        "row_offset": 0,
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slots": torch.full((2, 1, 3), 16)}, r"slots must lie in \[0, 16\)"),
        ({"slots": torch.full((2, 1, 3), -1)}, "slots must lie in"),
        (
            {"slot_map": torch.tensor([0, 1, 99] + [0] * 13), "slots": torch.full((2, 1, 3), 2)},
            "slot_map entries must lie in",
        ),
        ({"slot_map": torch.arange(4), "slots": torch.full((2, 1, 3), 5)}, r"\[0, 4\)"),
        ({"values": torch.randn(8)}, "values must be"),
        ({"scores": torch.randn(2, 1, 4, 2)}, "same T, H, k"),
        ({"scores": torch.randn(2, 1, 3, 3)}, "equal chunks"),
        ({"slots": torch.zeros(2, 1, 3)}, "int32 or int64"),
        ({"mapping": "xor"}, "mapping must be"),
        ({"pooling": "max"}, "pooling must be"),
        ({"row_offset": -1}, "row_offset"),
        ({"expansion": 0}, "expansion"),
    ],
)
def test_bad_inputs_raise_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_triton(**_bad(change))


def test_unchecked_out_of_range_slots_read_nothing() -> None:
    """The compiled path cannot raise on data: a bad slot must contribute nothing."""
    args = _bad({"slots": torch.tensor([[[0, 16, -3]], [[1, 2, 1 << 40]]])})
    got = aggregate_triton(**args, check_indices=False)
    args["slots"] = torch.tensor([[[0, 0, 0]], [[1, 2, 0]]])
    args["scores"][0, 0, 1:] = 0.0
    args["scores"][1, 0, 2] = 0.0
    assert_close("pooled", got, aggregate_reference(**args), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
class TestAggregateCuda:
    """The registered op on CUDA tensors: Triton eagerly and under torch.compile."""

    @pytest.mark.parametrize(
        CASE_FIELDS,
        CASES,
    )
    def test_op_matches_reference(
        self,
        tokens: int,
        heads: int,
        k: int,
        n_cores: int,
        rows: int,
        dim: int,
        expansion: int,
        mapping: str,
        pooling: str,
        slot_map: str,
        row_offset: int,
    ) -> None:
        args = make_inputs(tokens, heads, k, n_cores, rows, dim, expansion, slot_map)
        got = torch.ops.ultramem.aggregate(*args, expansion, mapping, pooling, row_offset)
        cpu = [a.cpu() if a is not None else None for a in args]
        want = aggregate_reference(*cpu, expansion, mapping, pooling, row_offset)
        assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES, ids=["fp32", "fp16", "bf16"])
    def test_paper_scale(self, dtype: torch.dtype, atol: float, rtol: float) -> None:
        args = make_inputs(64, 2, 32, 2, 1 << 18, 256, 4, "perm", dtype=dtype)
        got = torch.ops.ultramem.aggregate(*args, 4)
        want = aggregate_reference(*[a.cpu() for a in args], 4)
        assert_close("pooled", got, want, atol=atol, rtol=rtol)

    def test_compiled_runs_the_triton_kernel(self) -> None:
        from torch._inductor.utils import run_and_get_code

        args = make_inputs(9, 2, 8, 2, 32, 64, 4, "perm")

        def pool(*xs: Tensor) -> Tensor:
            return torch.ops.ultramem.aggregate(*xs, 4, "mod", "scatter", 3)

        got, code = run_and_get_code(torch.compile(pool, fullgraph=True), *args)
        assert "_aggregate_kernel" in "\n".join(code)
        want = aggregate_reference(*args, 4, "mod", "scatter", 3)
        assert_close("pooled", got, want, atol=1e-5, rtol=1e-5)
