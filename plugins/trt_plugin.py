"""TensorRT quickly-deployable AOT plugins for ``ultramem::Retrieve`` and ``ultramem::Aggregate``.

For ``tensorrt`` >= 10.7 (``tensorrt.plugin``). Each op gets a shape/type descriptor
(``trtp.register``) and an ``aot_impl`` that hands TensorRT the kernel bundle's own kernel:
its entry name and PTX for the build GPU (``launcher.pick_kernel``), its block and shared
memory, and its grid and int32 scalars as symbolic expressions of the input shapes, all
read from ``bundle.json``. The serialized engine carries the PTX and launches it without
Python; the plugin keeps no kernel of its own.

Both functions' signatures are generated from the op contract (``kernels/contract.py``):
the op's inputs as ``TensorDesc``s, then its attributes in order, then one ``has_<input>``
int per optional input (a plugin always gets every input: the ONNX prepared for plugin mode,
``compiler/tensorrt/plugin_onnx.py``, passes a one-element stand-in for an absent one, and
the kernel, specialised on its absence, never reads it). Output shapes and dtypes come
from the contract's named dims.

TensorRT's AOT calling convention is ``(inputs..., int32 scalars..., outputs...)``: the
kernels take their parameters in that order (``layout_problem`` checks every bundled
kernel). Triton appends two scratch pointers after them; the bundled kernels need no
scratch (``compile_spec`` records the sizes), so whatever TensorRT passes there is never
read.

What ran where: nothing in this module has run against TensorRT. Full ``tensorrt`` is not
installable on the machines here, and ``tensorrt_rtx`` has no ``plugin`` module, so plugin
mode is refused there. CPU tests check what does not need TensorRT: the kernels' parameter
order, the generated signatures, the launch expressions (evaluated with integers, against
the launcher's), and the ONNX handed to the parser; the ``trt``-marked test builds an
engine where ``tensorrt`` >= 10.7 and a GPU are present.
"""

# No ``from __future__ import annotations``: ``tensorrt.plugin`` reads the registered
# functions' annotations with ``inspect.signature`` and needs them as classes, not strings.
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..kernels import DOMAIN, OPS, OpSpec, op_spec
from .launcher import pick_kernel
from .metadata import BundleManifest, KernelMetadata, evaluate
from .specs import kernel_spec

PLUGIN_NAMESPACE = DOMAIN


def presence_flags(op: OpSpec) -> tuple[str, ...]:
    """Plugin-only int attributes, one per optional input: whether the node really has it."""
    return tuple(f"has_{t.name}" for t in op.inputs if t.optional)


def attribute_order(op: OpSpec) -> tuple[str, ...]:
    """The order TensorRT passes a plugin's attributes to ``aot_impl``: the node's order."""
    return (*op.attribute_names, *presence_flags(op))


def layout_problem(meta: KernelMetadata) -> str | None:
    """Why ``meta``'s parameters are not TensorRT's AOT order, or None when they are."""
    op = op_spec(meta.op)
    stand_ins = {a.name: a.tensor for a in meta.args if a.kind == "pointer"}
    expected = (
        [("pointer", stand_ins.get(f"{t}_ptr", t)) for t in op.input_names]
        + [("scalar", a.name) for a in meta.args if a.kind == "scalar"]
        + [("pointer", t) for t in op.output_names]
    )
    got = [(a.kind, a.tensor if a.kind == "pointer" else a.name) for a in meta.args]
    if got[: len(expected)] != expected or any(g[0] != "scratch" for g in got[len(expected) :]):
        return f"{meta.entry} takes {got}, TensorRT's AOT plugins pass {expected} (+ scratch)"
    names = [a.name for a in meta.args if a.kind == "pointer"]
    if names != [f"{t}_ptr" for t in (*op.input_names, *op.output_names)]:
        return f"{meta.entry}: pointer parameters {names} are not the contract's tensors"
    if any(a.kind == "scalar" and a.dtype != "i32" for a in meta.args):
        return f"{meta.entry}: TensorRT passes int32 scalars only"
    if any(a.kind == "scratch" and a.bytes_per_program for a in meta.args):
        return f"{meta.entry} needs Triton scratch memory, which TensorRT does not allocate"
    return None


def launch_expressions(
    meta: KernelMetadata, shape_of: Callable[[str, int], Any]
) -> tuple[tuple[Any, Any, Any], list[Any]]:
    """The grid and the scalar arguments over ``shape_of(tensor, axis)``.

    Fixed dims are the bundle's integers; dynamic ones (tokens, the table's rows) come from
    ``shape_of``: TensorRT's shape expressions in the plugin, integers in tests.
    """
    env: dict[str, Any] = dict(meta.constexprs)
    for name, dim in meta.dims.items():
        dynamic = dim.value is None and dim.tensor is not None and dim.axis is not None
        env[name] = shape_of(dim.tensor, dim.axis) if dynamic else dim.value  # type: ignore[arg-type]
    grid = tuple(evaluate(meta.grid[axis], env, symbolic=True) for axis in ("x", "y", "z"))
    scalars = [evaluate(a.expr or "", env, symbolic=True) for a in meta.args if a.kind == "scalar"]
    return grid, scalars  # type: ignore[return-value]


def plugin_signature(op: OpSpec, trtp: Any, *, aot: bool) -> inspect.Signature:
    """The descriptor's (or, with ``aot``, the aot_impl's) signature, from the contract."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, kind, annotation=trtp.TensorDesc) for name in op.input_names]
    params += [inspect.Parameter(a.name, kind, annotation=a.kind) for a in op.attributes]
    params += [inspect.Parameter(flag, kind, annotation=int) for flag in presence_flags(op)]
    if aot:
        params += [
            inspect.Parameter("outputs", kind, annotation=tuple[trtp.TensorDesc]),
            inspect.Parameter("tactic", kind, annotation=int),
        ]
        returns: Any = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]
    else:
        returns = (
            trtp.TensorDesc if len(op.outputs) == 1 else tuple(trtp.TensorDesc for _ in op.outputs)
        )
    return inspect.Signature(params, return_annotation=returns)


def _with_signature(fn: Callable[..., Any], name: str, signature: inspect.Signature) -> Any:
    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = signature  # type: ignore[attr-defined]
    fn.__annotations__ = {
        **{p.name: p.annotation for p in signature.parameters.values()},
        "return": signature.return_annotation,
    }
    return fn


# ---- registration (needs tensorrt >= 10.7) ----------------------------------------------

_registered: set[str] = set()
# what the registered functions read: the bundle and SM of the latest register_plugins call
# (TensorRT keeps the first registration for the process, so they must not capture them)
_active: dict[str, Any] = {}


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    if dtype not in table:
        raise ValueError(f"ultramem plugins take fp32, fp16, bf16, int32 or int64, got {dtype}")
    return table[dtype]


def _static(desc: Any, axis: int, what: str) -> int:
    expr = desc.shape_expr[axis]
    if not expr.is_constant():
        raise ValueError(f"{what} (axis {axis}) must be fixed at build time for the AOT kernel")
    return int(expr.constant_value())


def _bind(op: OpSpec, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = [*op.input_names, *op.attribute_names, *presence_flags(op)]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _present(op: OpSpec, bound: dict[str, Any]) -> list[str]:
    return [t.name for t in op.inputs if not t.optional or bound[f"has_{t.name}"]]


def _descriptor(op: OpSpec, trt: Any) -> Callable[..., Any]:
    def describe(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(op, args, kwargs)
        present = _present(op, bound)

        def size(dim: str) -> Any:
            if dim in op.attribute_names:
                return bound[dim]
            tensor = next(t for t in op.inputs if t.name in present and dim in t.dims)
            return bound[tensor.name].shape_expr[tensor.dims.index(dim)]

        outs = []
        for out in op.outputs:
            source = bound[op.inputs[0].name]
            if out.dtype.startswith("like:"):
                source = bound[out.dtype.removeprefix("like:")]
            desc = source.like()
            if out.dtype == "int64":
                desc.dtype = trt.int64
            desc.shape_expr = _active["trtp"].ShapeExprs.from_tuple(
                tuple(size(d) for d in out.dims)
            )
            outs.append(desc)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return describe


def _aot_impl(op: OpSpec, trt: Any) -> Callable[..., Any]:
    def implement(*args: Any, **kwargs: Any) -> Any:
        trtp = _active["trtp"]
        bound = _bind(op, args, kwargs)
        present = _present(op, bound)
        sizes: dict[str, Any] = {a: bound[a] for a in op.attribute_names}
        for t in op.inputs:
            if t.name in present:
                for axis, dim in enumerate(t.dims):
                    if dim not in sizes and dim not in ("T", "R"):
                        sizes[dim] = _static(bound[t.name], axis, f"{t.name} {dim}")
        dtypes = {name: _torch_dtype(trt, bound[name].dtype) for name in present}
        like = dtypes[op.inputs[0].name]
        for out in op.outputs:
            source = out.dtype.removeprefix("like:")
            dtypes[out.name] = dtypes.get(source, torch.int64 if out.dtype == "int64" else like)
        attributes = {a: bound[a] for a in op.attribute_names}
        spec = kernel_spec(op.name, sizes, attributes, dtypes)
        meta = pick_kernel(_active["bundle"], spec.name, _active["sm"])
        if problem := layout_problem(meta):
            raise ValueError(problem)
        (gx, gy, gz), scalars = launch_expressions(
            meta, lambda tensor, axis: bound[tensor].shape_expr[axis]
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = gx, gy, gz
        launch.block_x = meta.threads_per_block
        launch.shared_mem = meta.shared_bytes
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])
        ptx = (_active["bundle"].root / meta.ptx).read_text()
        return meta.entry, ptx, launch, extra

    return implement


def register_plugins(bundle: BundleManifest, sm: int) -> None:
    """Register both ops with ``tensorrt.plugin``; kernels come from ``bundle`` for ``sm``
    (for the builds that follow: a later call switches both)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    _active.update(bundle=bundle, sm=sm, trtp=trtp)
    for op in OPS:
        if op.onnx_name in _registered:
            continue
        name = f"{PLUGIN_NAMESPACE}::{op.onnx_name}"
        describe = _with_signature(
            _descriptor(op, trt), f"{op.name}_desc", plugin_signature(op, trtp, aot=False)
        )
        implement = _with_signature(
            _aot_impl(op, trt), f"{op.name}_aot", plugin_signature(op, trtp, aot=True)
        )
        trtp.register(name)(describe)
        trtp.aot_impl(name)(implement)
        _registered.add(op.onnx_name)
