"""TensorRT quickly-deployable AOT plugins for ``ultramem::Retrieve`` and ``ultramem::Aggregate``.

For ``tensorrt`` >= 10.7 (``tensorrt.plugin``). Each op gets a shape/type descriptor
(``trtp.register``) and an ``aot_impl`` that hands TensorRT the kernel bundle's own kernel:
its entry name and PTX for the build GPU (``launcher.pick_kernel``), its block and shared
memory, and its grid and int32 scalars as symbolic expressions of the input shapes, all
read from ``bundle.json``. The serialized engine carries the PTX and launches it without
Python; the plugin keeps no kernel of its own.

TensorRT's AOT calling convention is ``(inputs..., int32 scalars..., outputs...)``: the
kernels take their parameters in that order (``layout_problem`` checks every bundled
kernel). Triton appends two scratch pointers after them; the bundled kernels need no
scratch (``compile_spec`` records the sizes), so whatever TensorRT passes there is never
read. The ONNX parser picks a plugin for a node that carries ``plugin_namespace`` and
``aot`` and whose op has no function body: ``plugin_onnx`` prepares such a copy.

What ran where: nothing in this module has run against TensorRT. Full ``tensorrt`` is not
installable on the machines here, and ``tensorrt_rtx`` has no ``plugin`` module, so plugin
mode is refused there. CPU tests check what does not need TensorRT: the kernels' parameter
order, the launch expressions (evaluated with integers, against the launcher's), and the
ONNX handed to the parser; the ``trt``-marked test builds an engine where ``tensorrt``
>= 10.7 and a GPU are present.
"""

# No ``from __future__ import annotations``: ``tensorrt.plugin`` reads the registered
# functions' annotations with ``inspect.signature`` and needs them as classes, not strings.
import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ultramem.compiler.onnx_ops import DOMAIN, VERSION, node_attributes
from ultramem.plugins.bundle import aggregate_spec, retrieve_spec
from ultramem.plugins.launcher import pick_kernel
from ultramem.plugins.metadata import BundleManifest, KernelMetadata, evaluate

PLUGIN_NAMESPACE = DOMAIN
# bundle tensor names, in the op's input and output order
OP_TENSORS = {
    "retrieve": (
        ("row_scores", "col_scores", "row_weight", "col_weight", "cores"),
        ("scores", "slots"),
    ),
    "aggregate": (("values", "scores", "slots", "slot_map"), ("out",)),
}
HAS_SLOT_MAP = "has_slot_map"  # plugin-only attribute: Aggregate always gets 4 inputs
# TensorRT passes a plugin's attributes to aot_impl positionally, in the node's order
ATTRIBUTE_ORDER = {
    "Retrieve": ("topm", "topk", "activation"),
    "Aggregate": ("expansion", "mapping", "pooling", "row_offset", HAS_SLOT_MAP),
}
DEFAULTS = {"activation": "none", "mapping": "mod", "pooling": "add", "row_offset": 0}


def layout_problem(meta: KernelMetadata) -> str | None:
    """Why ``meta``'s parameters are not TensorRT's AOT order, or None when they are."""
    inputs, outputs = OP_TENSORS[meta.op]
    if meta.op == "aggregate" and not meta.constexprs.get("HAS_MAP"):
        inputs = (*inputs[:3], "slots")  # the unread slot_map parameter gets any pointer
    expected = (
        [("pointer", t) for t in inputs]
        + [("scalar", a.name) for a in meta.args if a.kind == "scalar"]
        + [("pointer", t) for t in outputs]
    )
    got = [(a.kind, a.tensor if a.kind == "pointer" else a.name) for a in meta.args]
    got_before_scratch = [g for g in got if g[0] != "scratch"]
    if got_before_scratch != expected or got[: len(expected)] != expected:
        return f"{meta.entry} takes {got}, TensorRT's AOT plugins pass {expected} (+ scratch)"
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


# ---- the ONNX the parser reads ------------------------------------------------------------


def plugin_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose ``ultramem`` nodes the parser maps to our AOT plugins; and their count.

    The function bodies go (the parser would inline a node that has one), each node gets
    its attributes in the registered order (defaults spelled out), ``plugin_namespace``,
    ``plugin_version`` and ``aot``; an Aggregate without a slot map gets a one-element
    stand-in (its kernel, specialised on ``has_slot_map = 0``, never reads it) so that
    every Aggregate plugin has the same four inputs.
    """
    out = copy.deepcopy(model)
    del out.functions[:]
    count = 0
    for node in out.graph.node:
        if node.domain != DOMAIN:
            continue
        count += 1
        node.overload = ""
        if node.op_type == "Aggregate":
            has_map = len(node.input) > 3 and bool(node.input[3])
            if not has_map:
                stand_in = f"{node.name or node.output[0]}__no_slot_map"
                out.graph.initializer.append(
                    numpy_helper.from_array(np.zeros(1, dtype=np.int64), stand_in)
                )
                del node.input[3:]
                node.input.append(stand_in)
            node.attribute.append(helper.make_attribute(HAS_SLOT_MAP, int(has_map)))
        given = node_attributes(node)
        del node.attribute[:]
        node.attribute.extend(
            [
                *(
                    helper.make_attribute(name, given.get(name, DEFAULTS.get(name)))
                    for name in ATTRIBUTE_ORDER[node.op_type]
                ),
                helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                helper.make_attribute("plugin_version", str(VERSION)),
                helper.make_attribute("aot", 1),
            ]
        )
    return out, count


# ---- registration (needs tensorrt >= 10.7) ----------------------------------------------

_registered: set[str] = set()
# what the registered functions read: the bundle and SM of the latest register_plugins call
# (TensorRT keeps the first registration for the process, so they must not capture them)
_active: dict[str, Any] = {}


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"ultramem plugins take fp32, fp16 or bf16, got {dtype}")
    return table[dtype]


def _static(desc: Any, axis: int, what: str) -> int:
    expr = desc.shape_expr[axis]
    if not expr.is_constant():
        raise ValueError(f"{what} (axis {axis}) must be fixed at build time for the AOT kernel")
    return int(expr.constant_value())


def register_plugins(bundle: BundleManifest, sm: int) -> None:
    """Register both ops with ``tensorrt.plugin``; kernels come from ``bundle`` for ``sm``
    (for the builds that follow: a later call switches both)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    _active.update(bundle=bundle, sm=sm)

    def aot(meta: KernelMetadata, descs: Sequence[Any]) -> tuple[str, str, Any, Any]:
        names = OP_TENSORS[meta.op][0]
        by_name = dict(zip(names, descs, strict=True))
        (gx, gy, gz), scalars = launch_expressions(
            meta, lambda tensor, axis: by_name[tensor].shape_expr[axis]
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = gx, gy, gz
        launch.block_x = meta.threads_per_block
        launch.shared_mem = meta.shared_bytes
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])
        ptx = (_active["bundle"].root / meta.ptx).read_text()
        return meta.entry, ptx, launch, extra

    def kernel(name: str) -> KernelMetadata:
        meta = pick_kernel(_active["bundle"], name, _active["sm"])
        if problem := layout_problem(meta):
            raise ValueError(problem)
        return meta

    # tensorrt.plugin checks each function's own signature (annotations included) against
    # the registered one, so the descriptor and the aot_impl both spell out every argument
    if "Retrieve" not in _registered:

        @trtp.register(f"{PLUGIN_NAMESPACE}::Retrieve")
        def retrieve_desc(
            row_scores: trtp.TensorDesc,
            col_scores: trtp.TensorDesc,
            row_weight: trtp.TensorDesc,
            col_weight: trtp.TensorDesc,
            cores: trtp.TensorDesc,
            topm: int,
            topk: int,
            activation: str,
        ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
            t, h = row_scores.shape_expr[0], row_scores.shape_expr[1]
            scores, slots = row_scores.like(), row_scores.like()
            scores.shape_expr = trtp.ShapeExprs.from_tuple((t, h, topk, cores.shape_expr[0]))
            slots.dtype = trt.int64
            slots.shape_expr = trtp.ShapeExprs.from_tuple((t, h, topk))
            return scores, slots

        @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::Retrieve")
        def retrieve_aot(
            row_scores: trtp.TensorDesc,
            col_scores: trtp.TensorDesc,
            row_weight: trtp.TensorDesc,
            col_weight: trtp.TensorDesc,
            cores: trtp.TensorDesc,
            topm: int,
            topk: int,
            activation: str,
            outputs: tuple[trtp.TensorDesc],
            tactic: int,
        ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
            spec = retrieve_spec(
                _torch_dtype(trt, row_scores.dtype),
                _static(row_scores, 1, "heads"),
                _static(row_scores, 2, "keys"),
                _static(row_scores, 3, "rank"),
                _static(cores, 0, "cores"),
                topm,
                topk,
                activation,
            )
            descs = (row_scores, col_scores, row_weight, col_weight, cores)
            return aot(kernel(spec.name), descs)

        _registered.add("Retrieve")

    if "Aggregate" not in _registered:

        @trtp.register(f"{PLUGIN_NAMESPACE}::Aggregate")
        def aggregate_desc(
            values: trtp.TensorDesc,
            scores: trtp.TensorDesc,
            slots: trtp.TensorDesc,
            slot_map: trtp.TensorDesc,
            expansion: int,
            mapping: str,
            pooling: str,
            row_offset: int,
            has_slot_map: int,
        ) -> trtp.TensorDesc:
            pooled = values.like()
            pooled.shape_expr = trtp.ShapeExprs.from_tuple(
                (scores.shape_expr[0], expansion, values.shape_expr[1])
            )
            return pooled

        @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::Aggregate")
        def aggregate_aot(
            values: trtp.TensorDesc,
            scores: trtp.TensorDesc,
            slots: trtp.TensorDesc,
            slot_map: trtp.TensorDesc,
            expansion: int,
            mapping: str,
            pooling: str,
            row_offset: int,
            has_slot_map: int,
            outputs: tuple[trtp.TensorDesc],
            tactic: int,
        ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
            spec = aggregate_spec(
                _torch_dtype(trt, values.dtype),
                _static(scores, 1, "heads"),
                _static(scores, 2, "topk"),
                _static(scores, 3, "cores"),
                _static(values, 1, "value_dim"),
                expansion,
                mapping,
                pooling,
                has_map=bool(has_slot_map),
                row_offset=row_offset,
            )
            return aot(kernel(spec.name), (values, scores, slots, slot_map))

        _registered.add("Aggregate")
