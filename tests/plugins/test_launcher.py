"""Bundled kernels launched through the CUDA driver API, as a plugin's ``enqueue`` would.

On CPU: ``BundleLauncher`` against a fake driver that decodes the ``void**`` parameter
array it receives (what ``cuLaunchKernel`` would read). On GPU (``gpu``): parity of
``run_op`` (arguments by the contract's names) with the plain-PyTorch references, selections exact,
for a bundle compiled for the device's own architecture.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from ultramem.kernels import AGGREGATE, RETRIEVE, aggregate_reference, retrieve_reference
from ultramem.plugins.bundle import build_bundle
from ultramem.plugins.launcher import BundleLauncher, import_driver, run_op
from ultramem.plugins.metadata import BundleManifest, KernelMetadata
from ultramem.plugins.specs import spec_for_call


class FakeDriver:
    """Just enough of ``cuda.bindings.driver`` to watch one launch."""

    CUresult = SimpleNamespace(CUDA_SUCCESS=0)

    def __init__(self, launch_error: int = 0) -> None:
        self.launches: list[dict[str, Any]] = []
        self.images: list[bytes] = []
        self.kernel: KernelMetadata | None = None
        self.launch_error = launch_error

    def CUstream(self, handle: int) -> int:
        return handle

    def cuInit(self, flags: int) -> tuple[int]:
        return (0,)

    def cuCtxGetCurrent(self) -> tuple[int, int]:
        return 0, 1

    def cuModuleLoadData(self, image: bytes) -> tuple[int, str]:
        self.images.append(image)
        return 0, "module"

    def cuModuleGetFunction(self, module: str, name: bytes) -> tuple[int, str]:
        return 0, f"{module}:{name.decode()}"

    def cuGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"CUDA_ERROR_LAUNCH_FAILED"

    def cuLaunchKernel(self, f: str, *args: Any) -> tuple[int]:
        gx, gy, gz, bx, by, bz, shared, stream, params, extra = args
        assert self.kernel is not None
        pointers = (ctypes.c_void_p * len(self.kernel.args)).from_address(params)
        decoded = {}
        for a, address in zip(self.kernel.args, pointers, strict=True):
            ctype = ctypes.c_int32 if a.kind == "scalar" else ctypes.c_uint64
            decoded[a.name] = ctype.from_address(address).value
        self.launches.append(
            {"function": f, "grid": (gx, gy, gz), "block": (bx, by, bz), "shared": shared,
             "stream": stream, "extra": extra, "args": decoded}
        )  # fmt: skip
        return (self.launch_error,)


def test_launch_packs_the_parameter_array(bundle: BundleManifest) -> None:
    kernel = bundle.find(next(k.name for k in bundle.kernels if k.op == "retrieve"), 90)
    d = {n: dim.value for n, dim in kernel.dims.items()}
    tokens = 7
    dt = torch.float32 if "_fp32_" in kernel.name else torch.bfloat16
    tensors = {
        "row_scores": torch.randn(tokens, d["H"], d["n"], d["r"]).to(dt),
        "col_scores": torch.randn(tokens, d["H"], d["n"], d["r"]).to(dt),
        "row_weight": torch.randn(d["H"], d["r"]).to(dt),
        "col_weight": torch.randn(d["H"], d["r"]).to(dt),
        "cores": torch.randn(d["M"], d["H"], d["r"], d["r"]).to(dt),
        "scores": torch.empty(tokens, d["H"], d["topk"], d["M"], dtype=dt),
        "slots": torch.empty(tokens, d["H"], d["topk"], dtype=torch.int64),
    }
    driver = FakeDriver()
    driver.kernel = kernel
    launcher = BundleLauncher(bundle, driver=driver)
    launcher.launch(kernel.name, tensors, device_index=0, sm=90, stream=1234)
    launcher.launch(kernel.name, tensors, device_index=0, sm=90, stream=1234)

    assert len(driver.images) == 1  # the module is loaded once
    assert driver.images[0] == (bundle.root / kernel.cubin).read_bytes()
    launch = driver.launches[0]
    assert launch["function"] == f"module:{kernel.entry}"
    assert launch["grid"] == (tokens, d["H"], 1)
    assert launch["block"] == (32 * kernel.num_warps, 1, 1)
    assert (launch["shared"], launch["stream"], launch["extra"]) == (kernel.shared_bytes, 1234, 0)
    strides = dict(zip("thnr", tensors["row_scores"].stride(), strict=True))
    expected = {
        **{a.name: tensors[a.tensor or ""].data_ptr() for a in kernel.args if a.kind == "pointer"},
        "n": d["n"], "m": d["topm"], "k": d["topk"], "heads": d["H"],
        **{f"{side}_stride_{axis}": s for side in ("row", "col") for axis, s in strides.items()},
        "global_scratch": 0, "profile_scratch": 0,
    }  # fmt: skip
    for fixed in kernel.fixed:  # compiled in (a stride of 1): no parameter
        assert expected.pop(fixed.name) == fixed.value
    assert launch["args"] == expected
    assert list(launch["args"]) == [a.name for a in kernel.args]


def test_launch_refuses_what_the_kernel_was_not_built_for(bundle: BundleManifest) -> None:
    kernel = bundle.find(
        next(k.name for k in bundle.kernels if k.op == "aggregate" and "row" in k.name), 80
    )
    d = {n: dim.value for n, dim in kernel.dims.items()}
    dt = torch.float32 if "_fp32_" in kernel.name else torch.bfloat16
    tensors = {
        "values": torch.randn(10, d["Dv"]).to(dt),
        "weights": torch.randn(3, d["H"], d["k"], d["M"]).to(dt),
        "slots": torch.zeros(3, d["H"], d["k"], dtype=torch.int64),
        "row_map": torch.zeros(d["Hr"], d["S"], dtype=torch.int32),
        "group_map": torch.zeros(d["Hg"], d["S"], dtype=torch.int32),
        "pooled": torch.empty(3, d["groups"], d["Dv"], dtype=dt),
    }
    driver = FakeDriver(launch_error=719)
    driver.kernel = kernel
    launcher = BundleLauncher(bundle, driver=driver)
    with pytest.raises(RuntimeError, match="CUDA_ERROR_LAUNCH_FAILED"):
        launcher.launch(kernel.name, tensors, device_index=0, sm=86, stream=0)  # sm_80 cubin
    with pytest.raises(ValueError, match="contiguous"):
        bad = {**tensors, "values": tensors["values"].t().contiguous().t()}
        launcher.launch(kernel.name, bad, device_index=0, sm=80, stream=0)
    with pytest.raises(ValueError, match="contiguous i64"):
        launcher.launch(
            kernel.name, {**tensors, "slots": tensors["slots"].int()}, device_index=0, sm=80,
            stream=0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="contiguous i32"):
        launcher.launch(
            kernel.name, {**tensors, "row_map": tensors["row_map"].long()}, device_index=0,
            sm=80, stream=0,
        )  # fmt: skip
    with pytest.raises(KeyError, match="sm_91"):  # an sm_90a cubin runs on 9.0 only
        launcher.launch(kernel.name, tensors, device_index=0, sm=91, stream=0)


# ---------------------------------------------------------------------------------------
# GPU: parity with the references
# ---------------------------------------------------------------------------------------

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (H, n, r, M, topm, topk, activation), (Dv, maps, groups, pooling); each at several T
LAYERS = [
    pytest.param((2, 64, 2, 2, 8, 8, "none"), (64, "shuffle", 4, "add"), id="builtin-model"),
    pytest.param((1, 13, 3, 1, 5, 3, "relu"), (24, "none", 1, "scatter"), id="n13-r3-scatter"),
    pytest.param((4, 33, 2, 2, 7, 10, "softmax"), (40, "per-head", 8, "add"), id="H4-per-head"),
]
TOKENS = (1, 7, 13, 1000)


@pytest.fixture(scope="module")
def device_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    try:
        import_driver()
    except ImportError as e:
        pytest.skip(str(e))
    major, minor = torch.cuda.get_device_capability()
    return tmp_path_factory.mktemp("device-bundle"), major * 10 + minor


def _maps(kind: str, heads: int, slots: int, rows: int, groups: int) -> dict[str, Tensor]:
    if kind == "none":
        return {}
    if kind == "shuffle":  # the authors' IVE: row p mod R, group p div R
        perm = torch.randperm(slots, device="cuda").view(1, -1) % (rows * groups)
        return {"row_map": perm % rows, "group_map": perm // rows}
    head = torch.arange(heads, device="cuda").view(-1, 1)  # PyPI: a table and E groups a head
    return {
        "row_map": torch.randint(0, rows, (heads, slots), device="cuda"),
        "group_map": head * (groups // heads) + torch.randint(0, groups // heads, (1, slots),
                                                             device="cuda"),
    }  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(("selection", "pooling"), LAYERS)
def test_parity_with_reference(
    device_bundle: tuple[Path, int],
    selection: tuple[Any, ...],
    pooling: tuple[Any, ...],
    dtype: torch.dtype,
) -> None:
    root, sm = device_bundle
    h, n, r, c, topm, topk, activation = selection
    value_dim, kind, groups, mode = pooling
    rows = 50
    values = torch.randn(rows, value_dim, device="cuda").to(dtype)
    maps = _maps(kind, h, n * n, rows, groups)
    bundle = None
    for tokens in TOKENS:

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, device="cuda").to(dtype)

        inputs = [draw(tokens, h, n, r), draw(tokens, h, n, r), draw(h, r), draw(h, r)]
        inputs.append(draw(c, h, r, r))
        ref_scores, ref_slots = retrieve_reference(*inputs, topm, topk, activation)
        pooled_slots = ref_slots if maps else ref_slots % rows  # no maps: slots are rows
        retrieve = RETRIEVE.bind(*inputs, topm, topk, activation)
        aggregate = AGGREGATE.bind(
            values, ref_scores, pooled_slots, maps.get("row_map"), maps.get("group_map"), groups,
            mode,
        )  # fmt: skip
        specs = [spec_for_call(RETRIEVE, retrieve), spec_for_call(AGGREGATE, aggregate)]
        if bundle is None:  # the token count is not part of a specialisation
            bundle = build_bundle(specs, [sm], root / f"{specs[0].name}-{specs[1].name}")
        scores, slots = run_op(
            bundle, specs[0].name, **{k: retrieve[k] for k in RETRIEVE.input_names}
        )
        assert torch.equal(slots, ref_slots), f"T={tokens}: selections differ"
        _assert_close(scores, ref_scores, dtype, f"retrieve scores, T={tokens}")

        out = run_op(bundle, specs[1].name, **{k: aggregate[k] for k in AGGREGATE.input_names})
        _assert_close(out, aggregate_reference(**aggregate), dtype, f"aggregate, T={tokens}")
        torch.cuda.synchronize()


def _assert_close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.isfinite(got).all(), f"{what}: NaN or Inf"
    tol = TOLERANCES[dtype]
    err = (got.float() - want.float()).abs().max().item()
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), f"{what}: {err}"
