"""``retrieve_triton`` against ``retrieve_reference``, and the reference against a naive loop.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1``), which is slow: cases keep T·H small. Slots must be identical;
scores within the tolerance of their dtype (``TOLERANCES``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from ultramem.kernels import retrieve_reference, retrieve_triton, triton_on_cpu
from ultramem.tests.kernels.compare import assert_close
from ultramem.tests.kernels.implementations import implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = implementations(retrieve_triton, "retrieve")

# (dtype, atol, rtol) for the scores; fp16/bf16 outputs are one rounding of the same fp32
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]


@dataclass(frozen=True)
class Case:
    """One retrieval shape: ``inputs()`` draws its tensors, ``attributes`` its op attributes."""

    tokens: int
    heads: int
    n: int
    rank: int
    n_cores: int
    topm: int
    topk: int
    activation: str

    def inputs(self, **kwargs: Any) -> list[Tensor]:
        return make_inputs(self.tokens, self.heads, self.n, self.rank, self.n_cores, **kwargs)

    @property
    def attributes(self) -> tuple[int, int, str]:
        return self.topm, self.topk, self.activation


CASES = [
    pytest.param(Case(1, 1, 16, 2, 1, 4, 4, "none"), id="T1-k=m"),
    pytest.param(Case(7, 1, 13, 2, 2, 5, 3, "relu"), id="T7-n13-m5-k3"),
    pytest.param(Case(13, 1, 24, 1, 1, 6, 6, "softmax"), id="T13-r1-pkm-like"),
    pytest.param(Case(3, 4, 20, 2, 2, 6, 10, "none"), id="H4-k>m"),
    pytest.param(Case(5, 2, 33, 3, 2, 7, 7, "softmax"), id="r3-n33-m7"),
    pytest.param(Case(2, 2, 12, 2, 1, 3, 9, "relu"), id="k=m²"),
    pytest.param(Case(2, 1, 64, 2, 2, 16, 16, "none"), id="m16-pow2"),
    pytest.param(Case(4, 1, 5, 2, 2, 5, 11, "softmax"), id="m=n-nonpow2"),
]


def make_inputs(
    tokens: int,
    heads: int,
    n: int,
    rank: int,
    n_cores: int,
    *,
    dtype: torch.dtype = torch.float32,
    integer: bool = False,
) -> list[Tensor]:
    """Row/col scores, rank-1 vectors and cores; ``integer`` draws small integers, whose
    sums are exact in fp32 on every backend: many planted exact ties."""

    def draw(*shape: int) -> Tensor:
        x = torch.randint(-2, 3, shape).float() if integer else torch.randn(*shape)
        return x.to(dtype).to(DEVICE)

    return [
        draw(tokens, heads, n, rank),
        draw(tokens, heads, n, rank),
        draw(heads, rank),
        draw(heads, rank),
        draw(n_cores, heads, rank, rank),
    ]


def duplicate_keys(row_scores: Tensor, col_scores: Tensor) -> None:
    """Copy some key rows onto others, so candidates (and grid cells) tie exactly."""
    n = row_scores.shape[2]
    for src, dst in ((0, n - 1), (1, n // 2), (n // 3, 2)):
        row_scores[:, :, dst] = row_scores[:, :, src]
        col_scores[:, :, dst] = col_scores[:, :, src]


def assert_slots_equal(got: Tensor, want: Tensor) -> None:
    if not torch.equal(got.cpu(), want.cpu()):
        bad = (got.cpu() != want.cpu()).nonzero()[:5].tolist()
        pytest.fail(f"slots differ at {int((got.cpu() != want.cpu()).sum())} places, first {bad}")


def naive_retrieve(
    row_scores: Tensor,
    col_scores: Tensor,
    row_weight: Tensor,
    col_weight: Tensor,
    cores: Tensor,
    topm: int,
    topk: int,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """docs/ultramem.md steps 3-6 with Python loops over float64 scalars, written independently."""
    tokens, heads, n, rank = row_scores.shape
    n_cores = cores.shape[0]
    s_row, s_col = row_scores.double().tolist(), col_scores.double().tolist()
    u, v, c = row_weight.double().tolist(), col_weight.double().tolist(), cores.double().tolist()
    scores = torch.zeros(tokens, heads, topk, n_cores, dtype=torch.float64)
    slots = torch.zeros(tokens, heads, topk, dtype=torch.int64)

    def top(values: list[float], count: int) -> list[int]:
        return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]

    for t in range(tokens):
        for h in range(heads):
            a_row = [sum(s_row[t][h][i][p] * u[h][p] for p in range(rank)) for i in range(n)]
            a_col = [sum(s_col[t][h][i][p] * v[h][p] for p in range(rank)) for i in range(n)]
            i_row, i_col = top(a_row, topm), top(a_col, topm)
            cells = []  # (a, b, per-core scores)
            for a in range(topm):
                for b in range(topm):
                    per_core = [
                        sum(
                            s_row[t][h][i_row[a]][p] * c[cc][h][p][q] * s_col[t][h][i_col[b]][q]
                            for p in range(rank)
                            for q in range(rank)
                        )
                        for cc in range(n_cores)
                    ]
                    cells.append((a, b, per_core))
            best = top([sum(cell[2]) for cell in cells], topk)
            for j, pos in enumerate(best):
                a, b, per_core = cells[pos]
                slots[t, h, j] = i_row[a] * n + i_col[b]
                scores[t, h, j] = torch.tensor(per_core)
    if activation == "relu":
        scores = scores.relu()
    elif activation == "softmax":
        scores = scores.softmax(dim=2)
    return scores, slots


@pytest.mark.parametrize("integer", [False, True], ids=["randn", "integer-ties"])
@pytest.mark.parametrize(
    "case",
    [Case(3, 2, 9, 2, 2, 4, 5, "none"), Case(2, 1, 7, 1, 1, 3, 3, "softmax"),
     Case(2, 2, 6, 2, 2, 3, 4, "relu")],
)  # fmt: skip
def test_reference_matches_naive_loops(case: Case, integer: bool) -> None:
    inputs = [x.cpu() for x in case.inputs(integer=integer)]
    scores, slots = retrieve_reference(*inputs, *case.attributes)
    want_scores, want_slots = naive_retrieve(*inputs, *case.attributes)
    want_scores = want_scores.float()  # the naive loop sums in float64
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_matches_reference(impl: Callable[..., Any], case: Case) -> None:
    inputs = case.inputs()
    scores, slots = impl(*inputs, *case.attributes)
    want_scores, want_slots = retrieve_reference(*inputs, *case.attributes)
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


def random_case(seed: int) -> tuple[int, int, int, int, int, int, int, str]:
    """A shape drawn from the variant space: T·H kept small for the interpreter."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    heads = pick([1, 2, 4])
    tokens = pick([1, 2, 3, 5, 7, 13][: 6 if heads == 1 else 4 if heads == 2 else 2])
    n = int(torch.randint(3, 70, (1,), generator=gen))
    topm = int(torch.randint(1, min(n, 12) + 1, (1,), generator=gen))
    topk = int(torch.randint(1, min(topm * topm, 20) + 1, (1,), generator=gen))
    activation = pick(["none", "relu", "softmax"])
    return tokens, heads, n, pick([1, 2, 3]), pick([1, 2]), topm, topk, activation


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("impl", IMPLS)
def test_random_shapes(impl: Callable[..., Any], seed: int) -> None:
    tokens, heads, n, rank, n_cores, topm, topk, activation = random_case(seed)
    inputs = make_inputs(tokens, heads, n, rank, n_cores, integer=seed % 4 == 3)
    scores, slots = impl(*inputs, topm, topk, activation)
    want_scores, want_slots = retrieve_reference(*inputs, topm, topk, activation)
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["none", "relu", "softmax"])
@pytest.mark.parametrize("planting", ["integer", "duplicate-keys"])
@pytest.mark.parametrize("impl", IMPLS)
def test_ties_break_to_the_lower_index(
    impl: Callable[..., Any], activation: str, planting: str
) -> None:
    inputs = make_inputs(5, 2, 14, 2, 2, integer=planting == "integer")
    if planting == "duplicate-keys":
        duplicate_keys(inputs[0], inputs[1])
    scores, slots = impl(*inputs, 6, 8, activation)
    want_scores, want_slots = retrieve_reference(*inputs, 6, 8, activation)
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["none", "relu", "softmax"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_ranks_above_every_number(impl: Callable[..., Any], activation: str) -> None:
    """The contract's NaN order (torch.sort's): planted NaN keys are selected first, NaNs
    among themselves by index; a token whose scores are all -inf still selects distinct
    slots in index order."""
    row_scores, col_scores, u, v, cores = make_inputs(4, 2, 13, 2, 2)
    row_scores[0, 0, 3, 0] = float("nan")  # key 3's merged score and its grid cells
    row_scores[1, 1, [2, 9], :] = float("nan")
    col_scores[2, 0, 5, 1] = float("nan")
    row_scores[3] = float("-inf")
    col_scores[3] = float("-inf")
    inputs = [row_scores, col_scores, u, v, cores]
    scores, slots = impl(*inputs, 5, 7, activation)
    want_scores, want_slots = retrieve_reference(*inputs, 5, 7, activation)
    assert_slots_equal(slots, want_slots)
    assert torch.equal(scores.isnan(), want_scores.isnan())
    finite = ~want_scores.isnan()
    torch.testing.assert_close(scores[finite], want_scores[finite], atol=1e-5, rtol=1e-5)
    # the reference's order is torch.topk's: the NaN key's row is the first candidate
    a_row = (row_scores[0, 0] * u[0]).sum(-1)
    assert int(torch.topk(a_row, 5).indices[0]) == 3
    assert int(want_slots[0, 0, 0]) // 13 == 3
    for head in range(2):
        assert len(set(slots[3, head].tolist())) == 7  # distinct, though every score ties


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_inputs(
    impl: Callable[..., Any], dtype: torch.dtype, atol: float, rtol: float
) -> None:
    inputs = make_inputs(6, 2, 19, 2, 2, dtype=dtype)
    scores, slots = impl(*inputs, 5, 7, "softmax")
    want_scores, want_slots = retrieve_reference(*inputs, 5, 7, "softmax")
    assert scores.dtype == dtype and slots.dtype == torch.int64
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_score_inputs(
    impl: Callable[..., Any],
) -> None:
    """Score tensors viewed out of a wider layout (as the fusion pass binds them)."""
    row_wide, col_wide, u, v, cores = make_inputs(4, 2, 11, 4, 2)
    row_scores, col_scores = row_wide[..., ::2], col_wide.transpose(0, 1).contiguous()
    col_scores = col_scores.transpose(0, 1)[..., 1::2]
    inputs = [row_scores, col_scores, u[:, :2], v[:, :2], cores[..., :2, :2]]
    scores, slots = impl(*inputs, 4, 6, "none")
    want_scores, want_slots = retrieve_reference(*inputs, 4, 6, "none")
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


def test_op_dispatches_to_triton_on_cpu_when_asked() -> None:
    inputs = make_inputs(3, 2, 10, 2, 2)
    with triton_on_cpu():
        scores, slots = torch.ops.ultramem.retrieve(*inputs, 4, 5)
    want_scores, want_slots = retrieve_reference(*inputs, 4, 5, "none")
    assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


# AOTAutograd (torch.compile, AOTInductor) on fake CUDA tensors: needs no GPU, only a
# Triton that compiles (not the interpreter), hence a subprocess without TRITON_INTERPRET
AOT_TRACE = """
import torch
from functorch.compile import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
import ultramem.kernels

mode = FakeTensorMode()

def fake(device, *shape, dtype=torch.float32):
    meta = torch.empty(*shape, dtype=dtype, device="meta")
    return FakeTensor(mode, meta, torch.device(device))

def lookup(rs, cs, rw, cw, co, vals, smap):
    scores, slots = torch.ops.ultramem.retrieve(rs, cs, rw, cw, co, 8, 8, "softmax")
    return torch.ops.ultramem.aggregate(vals, scores, slots, smap, None, 4)

class Captured(Exception):
    pass

def capture(gm, _inputs):
    raise Captured([
        kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
        if "triton_kernel_wrapper" in str(node.target) else str(node.target)
        for node in gm.graph.nodes if node.op == "call_function"
    ])

for device in ("cuda:0", "cpu"):
    with mode:
        shapes = [(5, 2, 40, 2), (5, 2, 40, 2), (2, 2), (2, 2), (2, 2, 2, 2), (100, 16)]
        args = [fake(device, *s) for s in shapes] + [fake(device, 1, 400, dtype=torch.int64)]
        try:
            aot_function(lookup, fw_compiler=capture)(*args)
        except Captured as found:
            print(device.split(":")[0], " ".join(found.args[0]))
"""


def test_compile_path_inlines_the_kernels_for_cuda_only() -> None:
    """Under AOTAutograd the ops on CUDA tensors become the two Triton kernels (what
    Inductor compiles); on CPU tensors they stay opaque ops running the reference."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", AOT_TRACE], env=env, capture_output=True, text=True, timeout=300
    )
    graphs = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert set(graphs) == {"cuda", "cpu"}, run.stderr[-2000:]
    assert "_retrieve_kernel" in graphs["cuda"] and "_aggregate_kernel" in graphs["cuda"]
    assert "ultramem.retrieve" not in graphs["cuda"]
    assert "ultramem.retrieve.default" in graphs["cpu"]
    assert "ultramem.aggregate.default" in graphs["cpu"]
    assert "_retrieve_kernel" not in graphs["cpu"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"row_scores": (2, 1, 8, 2, 1)}, r"row_scores must be \[T, H, n, r\] \(4-D\)"),
        ({"col_scores": (2, 1, 9, 2)}, r"col_scores is \[T, H, n, r\] = \(2, 1, 9, 2\), but n = 8"),
        ({"row_weight": (3, 2)}, r"row_weight is \[H, r\] = \(3, 2\), but H = 1 elsewhere"),
        ({"cores": (1, 1, 2, 3)}, r"cores is \[M, H, r, r\] = \(1, 1, 2, 3\), but r = 2"),
        ({"topm": 9}, "topm = 9"),
        ({"topk": 17}, "topk = 17"),
        ({"activation": "gelu"}, "activation must be"),
    ],
)
def test_bad_inputs_raise_value_error(change: dict, message: str) -> None:
    args = {
        "row_scores": torch.randn(2, 1, 8, 2),
        "col_scores": torch.randn(2, 1, 8, 2),
        "row_weight": torch.randn(1, 2),
        "col_weight": torch.randn(1, 2),
        "cores": torch.randn(1, 1, 2, 2),
        "topm": 4,
        "topk": 4,
        "activation": "none",
    }
    for name, value in change.items():
        args[name] = torch.randn(*value) if isinstance(value, tuple) else value
    with pytest.raises(ValueError, match=message):
        retrieve_triton(**args)


@pytest.mark.gpu
class TestRetrieveCuda:
    """The registered op on CUDA tensors: Triton eagerly and under torch.compile."""

    @pytest.mark.parametrize("case", CASES)
    def test_op_matches_reference(self, case: Case) -> None:
        inputs = case.inputs()
        scores, slots = torch.ops.ultramem.retrieve(*inputs, *case.attributes)
        want_scores, want_slots = retrieve_reference(*[x.cpu() for x in inputs], *case.attributes)
        assert_slots_equal(slots, want_slots)
        assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES, ids=["fp32", "fp16", "bf16"])
    def test_paper_scale(self, dtype: torch.dtype, atol: float, rtol: float) -> None:
        inputs = make_inputs(64, 2, 1024, 2, 2, dtype=dtype)
        duplicate_keys(inputs[0], inputs[1])
        scores, slots = torch.ops.ultramem.retrieve(*inputs, 32, 32, "none")
        want_scores, want_slots = retrieve_reference(*[x.cpu() for x in inputs], 32, 32, "none")
        assert_slots_equal(slots, want_slots)
        assert_close("scores", scores, want_scores, atol=atol, rtol=rtol)

    @pytest.mark.parametrize("dynamic", [False, True])
    def test_compiled_runs_the_triton_kernel(self, dynamic: bool) -> None:
        from torch._inductor.utils import run_and_get_code

        def lookup(*xs: Tensor) -> tuple[Tensor, Tensor]:
            return torch.ops.ultramem.retrieve(*xs, 8, 8, "softmax")

        compiled = torch.compile(lookup, fullgraph=True, dynamic=dynamic)
        for tokens in (9, 17):  # with dynamic=True, one graph for both token counts
            inputs = make_inputs(tokens, 2, 40, 2, 2)
            (scores, slots), code = run_and_get_code(compiled, *inputs)
            if tokens == 9:
                assert "_retrieve_kernel" in "\n".join(code)
            want_scores, want_slots = retrieve_reference(*inputs, 8, 8, "softmax")
            assert_slots_equal(slots, want_slots)
            assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)
