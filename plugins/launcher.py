"""Launch bundled kernels through the CUDA driver API, as a TensorRT plugin's ``enqueue`` would.

No Triton at run time: the cubin is loaded with ``cuModuleLoadData``, the entry found with
``cuModuleGetFunction`` and launched with ``cuLaunchKernel`` on raw device pointers
(``tensor.data_ptr()``) on the caller's stream, the parameters packed from the bundle's
metadata alone (``pack_args``): pointers as 64-bit addresses, scalars by dtype, the scratch
pointers Triton appends as null when their size is 0, else a buffer of
``bytes_per_program`` per program. Scalars come from the metadata's expressions over the
dims read from the tensors' shapes, so tensors must be contiguous (TensorRT's linear
format). This is what runs on the GPU machine without TensorRT; the packing is checked on
CPU (``tests/plugins``).

Needs ``cuda-python`` (``cuda.bindings.driver``, or ``cuda.cuda`` before 12.6).
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import UnreadableFile, plain_name, read_small_file
from ..kernels import op_spec
from .metadata import BundleManifest, KernelMetadata, evaluate, load_bundle

CType = type[ctypes._SimpleCData]
_SCALAR_CTYPES: dict[str, tuple[CType, int | None, int | None]] = {
    "i8": (ctypes.c_int8, -(2**7), 2**7 - 1),
    "i16": (ctypes.c_int16, -(2**15), 2**15 - 1),
    "i32": (ctypes.c_int32, -(2**31), 2**31 - 1),
    "i64": (ctypes.c_int64, -(2**63), 2**63 - 1),
    "u8": (ctypes.c_uint8, 0, 2**8 - 1),
    "u16": (ctypes.c_uint16, 0, 2**16 - 1),
    "u32": (ctypes.c_uint32, 0, 2**32 - 1),
    "u64": (ctypes.c_uint64, 0, 2**64 - 1),
    "fp32": (ctypes.c_float, None, None),
    "fp64": (ctypes.c_double, None, None),
}
_TORCH_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}


def pack_args(
    metadata: KernelMetadata, values: Mapping[str, int | float]
) -> list[tuple[CType, Any]]:
    """``(ctype, value)`` per kernel parameter, in the kernel's order.

    ``values`` maps every argument name to a device address (pointers and scratch; 0 is
    a null pointer) or a scalar. Raises ``ValueError`` for a missing name, an unknown
    dtype, or a value that does not fit its parameter.
    """
    missing = [a.name for a in metadata.args if a.name not in values]
    if missing:
        raise ValueError(f"{metadata.name}: no value for {missing}")
    packed: list[tuple[CType, Any]] = []
    for arg in metadata.args:
        value = values[arg.name]
        if arg.kind in ("pointer", "scratch"):
            if not isinstance(value, int) or not 0 <= value < 2**64:
                raise ValueError(f"{metadata.name}: {arg.name} = {value!r} is not a device address")
            if value % arg.align:
                raise ValueError(
                    f"{metadata.name}: {arg.name} = {value:#x} is not {arg.align}-byte aligned, "
                    "which the kernel was compiled to assume: pass a fresh (contiguous) tensor"
                )
            packed.append((ctypes.c_uint64, value))
            continue
        if arg.dtype not in _SCALAR_CTYPES:
            raise ValueError(f"{metadata.name}: {arg.name} has unsupported dtype {arg.dtype!r}")
        ctype, low, high = _SCALAR_CTYPES[arg.dtype]
        integer = low is not None and high is not None
        if integer and (not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"{metadata.name}: {arg.name} = {value!r} does not fit {arg.dtype}")
        if integer and value % arg.divisibility:
            raise ValueError(
                f"{metadata.name}: {arg.name} = {value} is not a multiple of "
                f"{arg.divisibility}, which the kernel was compiled to assume"
            )
        packed.append((ctype, value))
    return packed


def resolve_dims(metadata: KernelMetadata, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Every named dim from the tensors' shapes (or its build-time value for attributes);
    ``ValueError`` when a shape differs from what the kernel was specialised for."""
    dims: dict[str, int] = {}
    for name, dim in metadata.dims.items():
        if dim.tensor is None or dim.axis is None:
            if dim.value is None:
                raise ValueError(f"{metadata.name}: dim {name} has neither a tensor nor a value")
            dims[name] = dim.value
            continue
        if dim.tensor not in shapes:
            raise ValueError(f"{metadata.name}: dim {name} needs tensor {dim.tensor!r}")
        got = int(shapes[dim.tensor][dim.axis])
        if dim.value is not None and got != dim.value:
            raise ValueError(
                f"{metadata.name} was built for {name} = {dim.value} ({dim.tensor}.shape"
                f"[{dim.axis}]), got {got}: build a bundle for this shape"
            )
        dims[name] = got
    return dims


def scalar_values(metadata: KernelMetadata, dims: Mapping[str, int]) -> dict[str, int]:
    """The scalar parameters' values: their expressions over ``dims``. ``ValueError`` when
    these dims break what the kernel was compiled to assume: a scalar compiled in as a
    constant (``fixed``) with another value, or one hinted divisible that is not."""
    for a in metadata.fixed:
        got = evaluate(a.expr or "", dims)
        if got != a.value:
            raise ValueError(
                f"{metadata.name} was compiled with {a.name} = {a.value} ({a.expr}); these "
                f"shapes give {got}: build a bundle for them"
            )
    values = {a.name: evaluate(a.expr or "", dims) for a in metadata.args if a.kind == "scalar"}
    for a in metadata.args:
        if a.kind == "scalar" and values[a.name] % a.divisibility:
            raise ValueError(
                f"{metadata.name} was compiled for {a.name} ({a.expr}) a multiple of "
                f"{a.divisibility}; these shapes give {values[a.name]}: build a bundle for them"
            )
    return values


def pick_kernel(manifest: BundleManifest, name: str, sm: int) -> KernelMetadata:
    """The build of ``name`` for a device of compute capability ``sm``: the exact one, else
    the newest earlier minor of the same major whose target is not arch-specific (a cubin
    for ``sm_80`` runs on 8.6 and 8.9; one for ``sm_90a`` only on 9.0)."""
    try:
        return manifest.find(name, sm)
    except KeyError:
        compatible = [
            k
            for k in manifest.kernels
            if k.name == name and k.sm // 10 == sm // 10 and k.sm < sm and not k.arch.endswith("a")
        ]
        if compatible:
            return max(compatible, key=lambda k: k.sm)
        raise


CUBIN_MAX_BYTES = 256 << 20  # a Triton kernel's cubin is kilobytes to a few megabytes


def read_cubin(root: Path, kernel: KernelMetadata) -> bytes:
    """The bytes of ``kernel``'s cubin, read from a plain file beside ``bundle.json`` and
    checked against the sha256 it records, before anything hands them to the driver: a
    cubin is native code, and a bundle is data from elsewhere. ``ValueError`` otherwise."""
    if not plain_name(kernel.cubin):
        raise ValueError(f"{kernel.name}: cubin {kernel.cubin!r} is not a file name in {root}")
    path = root / kernel.cubin
    try:  # a link (out of the folder or not) is refused, not followed
        image = read_small_file(path, CUBIN_MAX_BYTES)
    except UnreadableFile as exc:
        raise ValueError(f"{kernel.name}: cubin {exc}") from None
    digest = hashlib.sha256(image).hexdigest()
    if digest != kernel.cubin_sha256:
        raise ValueError(
            f"{kernel.name}: cubin {path} has sha256 {digest}, not the "
            f"{kernel.cubin_sha256} bundle.json records; refusing to load it"
        )
    return image


def import_driver() -> Any:
    """cuda-python's driver module, new layout first."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError as e:
            raise ImportError(
                "launching bundled kernels needs cuda-python: pip install cuda-python"
            ) from e
    return driver


class BundleLauncher:
    """Loads a bundle's cubins once per device and launches its kernels."""

    def __init__(self, manifest: BundleManifest, driver: Any | None = None) -> None:
        self.manifest = manifest
        self.driver = driver if driver is not None else import_driver()
        self._functions: dict[tuple[int, str], Any] = {}  # modules stay loaded
        self._check(self.driver.cuInit(0), "cuInit")

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != int(self.driver.CUresult.CUDA_SUCCESS):
            _, name = self.driver.cuGetErrorName(err)
            raise RuntimeError(f"{what} failed: {name.decode() if name else int(err)}")
        return rest[0] if len(rest) == 1 else rest

    def function(self, kernel: KernelMetadata, device_index: int) -> Any:
        """The ``CUfunction`` of ``kernel`` in the current context of ``device_index``."""
        key = (device_index, kernel.cubin)
        if key not in self._functions:
            image = read_cubin(self.manifest.root, kernel)  # checked before any driver call
            ctx = self._check(self.driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
            if ctx is None or int(ctx) == 0:  # nothing made a context current on this thread
                device = self._check(self.driver.cuDeviceGet(device_index), "cuDeviceGet")
                ctx = self._check(self.driver.cuDevicePrimaryCtxRetain(device), "retain ctx")
                self._check(self.driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            module = self._check(self.driver.cuModuleLoadData(image), f"loading {kernel.cubin}")
            fn = self._check(
                self.driver.cuModuleGetFunction(module, kernel.entry.encode()),
                f"finding {kernel.entry} in {kernel.cubin}",
            )
            if kernel.shared_bytes > 48 * 1024:  # above the default limit: opt in
                attr = self.driver.CUfunction_attribute
                self._check(
                    self.driver.cuFuncSetAttribute(
                        fn,
                        attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        kernel.shared_bytes,
                    ),
                    "cuFuncSetAttribute",
                )
            self._functions[key] = fn
        return self._functions[key]

    def launch(
        self,
        name: str,
        tensors: Mapping[str, Tensor],
        *,
        device_index: int,
        sm: int,
        stream: int,
    ) -> None:
        """Launch specialisation ``name`` on ``tensors`` (by the names the metadata uses)."""
        kernel = pick_kernel(self.manifest, name, sm)
        dims = resolve_dims(kernel, {k: tuple(t.shape) for k, t in tensors.items()})
        grid = kernel.launch_grid(dims)
        if 0 in grid:
            return
        values: dict[str, int | float] = dict(scalar_values(kernel, dims))
        scratch: list[Tensor] = []  # alive until the launch is queued
        for arg in kernel.args:
            if arg.kind == "pointer":
                if arg.tensor not in tensors:
                    raise ValueError(
                        f"{kernel.name} needs tensor {arg.tensor!r}, got {list(tensors)}"
                    )
                t = tensors[arg.tensor]
                if _TORCH_DTYPES.get(t.dtype) != arg.dtype or not t.is_contiguous():
                    raise ValueError(
                        f"{kernel.name}: {arg.tensor} must be a contiguous {arg.dtype} tensor, "
                        f"got {t.dtype} with strides {t.stride()}"
                    )
                values[arg.name] = t.data_ptr()
            elif arg.kind == "scratch":
                size = arg.bytes_per_program * grid[0] * grid[1] * grid[2] * kernel.num_ctas
                if size:
                    device = torch.device("cuda", device_index)
                    scratch.append(torch.empty(size, dtype=torch.uint8, device=device))
                values[arg.name] = scratch[-1].data_ptr() if size else 0
        packed = pack_args(kernel, values)
        storage = [ctype(value) for ctype, value in packed]
        params = (ctypes.c_void_p * len(storage))(*(ctypes.addressof(s) for s in storage))
        self._check(
            self.driver.cuLaunchKernel(
                self.function(kernel, device_index),
                grid[0] * kernel.num_ctas, grid[1], grid[2],
                kernel.threads_per_block, 1, 1,
                kernel.shared_bytes,
                self.driver.CUstream(stream),
                ctypes.addressof(params),
                0,
            ),
            f"launching {kernel.name}",
        )  # fmt: skip
        # the scratch buffers may go back to torch's caching allocator now: they were
        # allocated on the current stream, the one the launch was queued on, so any reuse
        # is ordered after the kernel


_launchers: dict[tuple[Path, int], BundleLauncher] = {}


def _launcher(bundle: BundleManifest | str | Path) -> BundleLauncher:
    """One launcher (loaded modules) per bundle folder and version of its manifest."""
    manifest = bundle if isinstance(bundle, BundleManifest) else None
    root = (manifest.root if manifest is not None else Path(bundle)).resolve()
    key = (root, (root / "bundle.json").stat().st_mtime_ns)
    if key not in _launchers:
        _launchers[key] = BundleLauncher(manifest if manifest is not None else load_bundle(root))
    return _launchers[key]


def _device(t: Tensor) -> tuple[int, int, int]:
    if not t.is_cuda:
        raise ValueError(f"bundled kernels run on CUDA tensors, got one on {t.device}")
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return index, major * 10 + minor, torch.cuda.current_stream(index).cuda_stream


def run_op(bundle: BundleManifest | str | Path, name: str, **arguments: Any) -> Any:
    """One fused-op call through bundled kernel ``name``: the op's inputs by the contract's
    names (optional ones may be None), outputs allocated here and returned as the op does.

    The attributes are the specialisation's (the name carries them). Indices are not
    checked, as in a plugin: out-of-range entries contribute nothing."""
    launcher = _launcher(bundle)
    first = next(x for x in arguments.values() if isinstance(x, Tensor))
    index, sm, stream = _device(first)
    kernel = pick_kernel(launcher.manifest, name, sm)
    op = op_spec(kernel.op)
    missing = [t.name for t in op.inputs if not t.optional and arguments.get(t.name) is None]
    if missing:
        raise ValueError(f"{name} needs tensors {missing}")
    tensors = {
        t.name: arguments[t.name].contiguous()
        for t in op.inputs
        if arguments.get(t.name) is not None
    }
    for t in op.inputs:
        built_with = any(a.tensor == t.name for a in kernel.args if a.kind == "pointer")
        if t.optional and built_with != (t.name in tensors):
            raise ValueError(
                f"{name} was built {'with' if built_with else 'without'} {t.name}, "
                f"got {'one' if t.name in tensors else 'none'}"
            )
    sizes = resolve_dims(kernel, {k: tuple(t.shape) for k, t in tensors.items()})
    outputs = [
        torch.empty(shape, dtype=dtype, device=first.device)
        for shape, dtype in zip(op.output_shapes(sizes), op.output_dtypes(tensors), strict=True)
    ]
    tensors.update(zip(op.output_names, outputs, strict=True))
    with torch.cuda.device(index):  # the device's primary context is the current one
        launcher.launch(name, tensors, device_index=index, sm=sm, stream=stream)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
