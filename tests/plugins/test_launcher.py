"""Bundled kernels launched through the CUDA driver API, as a plugin's ``enqueue`` would.

On CPU: ``BundleLauncher`` against a fake driver that decodes the ``void**`` parameter
array it receives (what ``cuLaunchKernel`` would read). On GPU (``gpu``): parity of
``run_retrieve``/``run_aggregate`` with the plain-PyTorch references, selections exact,
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

from ultramem.kernels import aggregate_reference, retrieve_reference
from ultramem.plugins.bundle import build_bundle, specs_for_layer
from ultramem.plugins.launcher import BundleLauncher, import_driver, run_aggregate, run_retrieve
from ultramem.plugins.metadata import BundleManifest, KernelMetadata


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
        "row_scores": torch.randn(tokens, d["H"], d["N"], d["RANK"]).to(dt),
        "col_scores": torch.randn(tokens, d["H"], d["N"], d["RANK"]).to(dt),
        "row_weight": torch.randn(d["H"], d["RANK"]).to(dt),
        "col_weight": torch.randn(d["H"], d["RANK"]).to(dt),
        "cores": torch.randn(d["CORES"], d["H"], d["RANK"], d["RANK"]).to(dt),
        "scores": torch.empty(tokens, d["H"], d["TOPK"], d["CORES"], dtype=dt),
        "slots": torch.empty(tokens, d["H"], d["TOPK"], dtype=torch.int64),
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
        "n": d["N"], "m": d["TOPM"], "k": d["TOPK"], "heads": d["H"],
        **{f"{side}_stride_{axis}": s for side in ("row", "col") for axis, s in strides.items()},
        "global_scratch": 0, "profile_scratch": 0,
    }  # fmt: skip
    assert launch["args"] == expected
    assert list(launch["args"]) == [a.name for a in kernel.args]


def test_launch_refuses_what_the_kernel_was_not_built_for(bundle: BundleManifest) -> None:
    kernel = bundle.find(next(k.name for k in bundle.kernels if k.op == "aggregate"), 80)
    d = {n: dim.value for n, dim in kernel.dims.items()}
    dt = torch.float32 if "_fp32_" in kernel.name else torch.bfloat16
    tensors = {
        "values": torch.randn(10, d["D"]).to(dt),
        "scores": torch.randn(3, d["H"], d["K"], d["CORES"]).to(dt),
        "slots": torch.zeros(3, d["H"], d["K"], dtype=torch.int64),
        "slot_map": torch.zeros(10 * d["E"], dtype=torch.int64),
        "out": torch.empty(3, d["E"], d["D"], dtype=dt),
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
    with pytest.raises(KeyError, match="sm_91"):  # an sm_90a cubin runs on 9.0 only
        launcher.launch(kernel.name, tensors, device_index=0, sm=91, stream=0)


# ---------------------------------------------------------------------------------------
# GPU: parity with the references
# ---------------------------------------------------------------------------------------

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# binding, value_dim; each run at several token counts
LAYERS = [
    pytest.param(
        {"heads": 2, "n_keys": 64, "tucker_rank": 2, "cores": 2, "topm": 8, "topk": 8,
         "activation": "none", "expansion": 4, "mapping": "mod", "pooling": "add",
         "slot_map": True},
        64, id="builtin-model",
    ),
    pytest.param(
        {"heads": 1, "n_keys": 13, "tucker_rank": 3, "cores": 1, "topm": 5, "topk": 3,
         "activation": "relu", "expansion": 2, "mapping": "div", "pooling": "scatter",
         "slot_map": False},
        24, id="n13-r3-div-scatter",
    ),
    pytest.param(
        {"heads": 4, "n_keys": 33, "tucker_rank": 2, "cores": 2, "topm": 7, "topk": 10,
         "activation": "softmax", "expansion": 1, "mapping": "mod", "pooling": "add",
         "slot_map": False},
        40, id="H4-softmax-k>m",
    ),
]  # fmt: skip
TOKENS = (1, 7, 13, 1000)


@pytest.fixture(scope="module")
def device_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    try:
        import_driver()
    except ImportError as e:
        pytest.skip(str(e))
    major, minor = torch.cuda.get_device_capability()
    return tmp_path_factory.mktemp("device-bundle"), major * 10 + minor


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(("binding", "value_dim"), LAYERS)
def test_parity_with_reference(
    device_bundle: tuple[Path, int], binding: dict[str, Any], value_dim: int, dtype: torch.dtype
) -> None:
    root, sm = device_bundle
    retrieve_spec, aggregate_spec = specs_for_layer(binding, dtype, value_dim)
    bundle = build_bundle([retrieve_spec, aggregate_spec], [sm], root / retrieve_spec.name)
    h, n, r, c = (binding[k] for k in ("heads", "n_keys", "tucker_rank", "cores"))
    rows, expansion = 50, binding["expansion"]
    values = torch.randn(rows, value_dim, device="cuda").to(dtype)
    slot_map = torch.randperm(n * n, device="cuda") % (rows * expansion)
    slot_map = slot_map if binding["slot_map"] else None
    for tokens in TOKENS:

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, device="cuda").to(dtype)

        inputs = [draw(tokens, h, n, r), draw(tokens, h, n, r), draw(h, r), draw(h, r)]
        inputs.append(draw(c, h, r, r))
        ref_scores, ref_slots = retrieve_reference(
            *inputs, binding["topm"], binding["topk"], binding["activation"]
        )
        scores, slots = run_retrieve(bundle, retrieve_spec.name, *inputs)
        assert torch.equal(slots, ref_slots), f"T={tokens}: selections differ"
        _assert_close(scores, ref_scores, dtype, f"retrieve scores, T={tokens}")

        if slot_map is None:  # slots must address the R·E virtual rows
            ref_slots = ref_slots % (rows * expansion)
        ref_out = aggregate_reference(
            values, ref_scores, ref_slots, slot_map, expansion, binding["mapping"],
            binding["pooling"], 0,
        )  # fmt: skip
        out = run_aggregate(bundle, aggregate_spec.name, values, ref_scores, ref_slots, slot_map)
        _assert_close(out, ref_out, dtype, f"aggregate, T={tokens}")
        torch.cuda.synchronize()


def _assert_close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.isfinite(got).all(), f"{what}: NaN or Inf"
    tol = TOLERANCES[dtype]
    err = (got.float() - want.float()).abs().max().item()
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), f"{what}: {err}"
