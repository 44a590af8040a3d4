"""The ONNX graph as TensorRT's parser will read it: limits checked, scatter-add lowered,
precision converted. Pure ONNX rewrites, no TensorRT needed (``export_tensorrt`` runs them
before parsing).

- ``check_limits``: what TensorRT would refuse, found first and said in one line naming
  the node and the limit (TopK K <= 3840; Einsum equations in lower-case letters over
  float types).
- ``lower_scatter_add``: ``tensorrt_rtx``'s parser rejects ScatterElements with a reduction
  and full ``tensorrt`` would hand it to its ScatterElements plugin, so ``reduction="add"``
  (unfused value pooling) becomes Equal/Where/ReduceSum over a one-hot axis; it holds
  indices' size × the data's scatter-axis length elements.
- ``convert_precision``: for strongly typed TensorRT (11.x, RTX), float weights, Casts and
  constants go to fp16/bf16 while graph I/O stays fp32.
"""

from __future__ import annotations

from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..inputs.errors import TensorRTLimitError
from ..onnx.domain import node_attributes

TOPK_MAX_K = 3840  # ITopKLayer; tensorrt_rtx 1.7 builds K = 3840 and refuses 3841
EINSUM_CHARS = set("abcdefghijklmnopqrstuvwxyz,->. ")  # the parser refuses "IJ,JK->IK"
EINSUM_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
FP16_MAX = 65504.0
Precision = Literal["fp32", "fp16", "bf16"]
_LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """Element type and dims (ints or symbolic names) of every tensor shape inference knows."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    known = {t.name: (t.data_type, list(t.dims)) for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        tensor = info.type.tensor_type
        known[info.name] = (
            tensor.elem_type,
            [d.dim_param or d.dim_value for d in tensor.shape.dim],
        )
    return known


def _small_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute if node.op_type == "Constant" else ():
            if attr.name == "value":
                tensors[node.output[0]] = attr.t
    return {
        name: numpy_helper.to_array(t)
        for name, t in tensors.items()
        if t.data_location != TensorProto.EXTERNAL and np.prod(t.dims) <= 16
    }


def check_limits(model: onnx.ModelProto) -> None:
    """Raise ``TensorRTLimitError`` naming each node that breaks a known limit, on one line.

    Confirmed with ``tensorrt_rtx`` 1.7 and onnx-tensorrt's operator notes: TopK's K <= 3840
    (any axis works, so the axis is not checked; a K computed at run time is left to the
    builder); Einsum takes fp32/fp16/bf16 inputs and lower-case labels (diagonals, ellipsis
    and three inputs parse); ScatterElements has no reduction (``add`` is lowered when the
    shapes allow). GatherElements showed no limit beyond ONNX's (any axis, smaller indices).
    """
    constants, types = _small_constants(model), _tensor_types(model)
    problems: list[str] = []
    for node in model.graph.node:
        where, attrs = f"{node.name or node.output[0]} ({node.op_type})", node_attributes(node)
        if node.op_type == "TopK":
            k = attrs.get("k") if len(node.input) < 2 else constants.get(node.input[1])
            if k is not None and int(np.max(k)) > TOPK_MAX_K:
                problems.append(
                    f"{where}: K = {int(np.max(k))} exceeds TensorRT's TopK limit K <= {TOPK_MAX_K}"
                )
        elif node.op_type == "Einsum":
            equation = attrs["equation"]
            if set(equation) - EINSUM_CHARS:
                problems.append(
                    f"{where}: equation {equation!r} has labels outside a-z, "
                    "which TensorRT's Einsum refuses"
                )
            if any(types.get(i, (0,))[0] not in {0, *EINSUM_TYPES} for i in node.input):
                problems.append(f"{where}: TensorRT's Einsum takes fp32/fp16/bf16 inputs only")
        elif node.op_type == "ScatterElements" and attrs.get("reduction", "none") != "none":
            reduction = attrs["reduction"]
            why = _scatter_mismatch(node, types) if reduction == "add" else f"{reduction!r}"
            if why:
                problems.append(
                    f"{where}: TensorRT has no ScatterElements reduction and "
                    f"{why} cannot be lowered (only 'add' with matching shapes)"
                )
    if problems:
        raise TensorRTLimitError("; ".join(problems))


def _scatter_mismatch(node: onnx.NodeProto, types: dict[str, Any]) -> str | None:
    """Why ScatterElements(add) cannot become a one-hot sum: shapes differ off its axis."""
    data, indices, updates = (types.get(name, (0, []))[1] for name in node.input)
    if not data or len(data) != len(indices) or indices != updates:
        return "'add' with unknown or unequal shapes of data, indices and updates"
    axis = node_attributes(node).get("axis", 0) % len(data)
    off_axis = [(d, i) for n, (d, i) in enumerate(zip(data, indices, strict=True)) if n != axis]
    if any(d != i or d in (0, "") for d, i in off_axis):  # 0: a dim shape inference left open
        return f"'add' with indices {indices} not provably like data {data} off axis {axis}"
    return None


def lower_scatter_add(model: onnx.ModelProto) -> list[str]:
    """ScatterElements(data, idx, upd, axis=a, reduction=add) ->
    data + ReduceSum_j Where(idx[.., j, ..] == e, upd[.., j, ..], 0), e along axis a."""
    notes: list[str] = []
    nodes: list[onnx.NodeProto] = []
    types: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type != "ScatterElements" or node_attributes(node).get("reduction") != "add":
            nodes.append(node)
            continue
        types = types or _tensor_types(model)
        if why := _scatter_mismatch(node, types):
            raise TensorRTLimitError(f"{node.name} (ScatterElements): {why} cannot be lowered")
        rank = len(types[node.input[0]][1])
        axis = node_attributes(node).get("axis", 0) % rank
        nodes.extend(_one_hot_sum(model, node, axis, rank))
        notes.append(f"{node.name}: ScatterElements(add) -> Equal/Where/ReduceSum on axis {axis}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return notes


def _one_hot_sum(
    model: onnx.ModelProto, node: onnx.NodeProto, axis: int, rank: int
) -> list[onnx.NodeProto]:
    p = f"{node.name or node.output[0]}/lower"
    data, idx, upd = node.input
    grid = [1] * (rank + 1)
    grid[axis] = -1
    for key, value in {"zero": 0, "one": 1, "grid": grid, "axis": [axis], "j": [axis + 1]}.items():
        model.graph.initializer.append(
            numpy_helper.from_array(np.array(value, np.int64), f"{p}/{key}")
        )

    def make(op: str, inputs: list[str], out: str, **kw: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=out, **kw)

    return [
        make("Shape", [data], f"{p}/n1", start=axis, end=axis + 1),
        make("Squeeze", [f"{p}/n1"], f"{p}/n"),
        make("Range", [f"{p}/zero", f"{p}/n", f"{p}/one"], f"{p}/range"),
        make("Reshape", [f"{p}/range", f"{p}/grid"], f"{p}/slots"),
        make("Cast", [idx], f"{p}/idx64", to=TensorProto.INT64),
        make("Less", [f"{p}/idx64", f"{p}/zero"], f"{p}/negative"),  # ONNX allows idx < 0
        make("Add", [f"{p}/idx64", f"{p}/n"], f"{p}/wrapped"),
        make("Where", [f"{p}/negative", f"{p}/wrapped", f"{p}/idx64"], f"{p}/idx"),
        make("Unsqueeze", [f"{p}/idx", f"{p}/axis"], f"{p}/idx_u"),
        make("Equal", [f"{p}/idx_u", f"{p}/slots"], f"{p}/hit"),
        make("Unsqueeze", [upd, f"{p}/axis"], f"{p}/upd_u"),
        make("CastLike", [f"{p}/zero", upd], f"{p}/zero_t"),
        make("Where", [f"{p}/hit", f"{p}/upd_u", f"{p}/zero_t"], f"{p}/picked"),
        make("ReduceSum", [f"{p}/picked", f"{p}/j"], f"{p}/summed", keepdims=0),
        helper.make_node("Add", [data, f"{p}/summed"], [node.output[0]], name=f"{p}/add"),
    ]


def convert_precision(model: onnx.ModelProto, precision: Precision) -> list[str]:
    """fp32 weights, Casts, constants and value infos to fp16/bf16; graph I/O stays fp32.

    fp16 saturates finite values at ±65504 (a -3.4e38 mask fill stays finite). Einsum in
    bf16 is outside ONNX's type list (the full checker refuses it), but TensorRT takes it.
    """
    low, graph = _LOW[precision], model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(_lower(numpy_helper.to_array(tensor), low, tensor.name))
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        if node.op_type == "ConstantOfShape" and not node.attribute:  # default: fp32 zeros
            node.attribute.append(helper.make_attribute("value", _lower(np.zeros(1), low)))
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = low
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_lower(numpy_helper.to_array(attr.t), low, attr.t.name))
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(attr))
                attr.CopyFrom(helper.make_attribute("value", _lower(value, low)))
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = low
    head, tail = [], []
    for info, is_output in [*((i, False) for i in graph.input), *((o, True) for o in graph.output)]:
        if info.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{info.name}/{precision}"
        for node in graph.node:
            node.input[:] = [inner if i == info.name else i for i in node.input]
            if is_output:
                node.output[:] = [inner if o == info.name else o for o in node.output]
        if is_output:
            tail.append(helper.make_node("Cast", [inner], [info.name], to=TensorProto.FLOAT))
        else:
            head.append(helper.make_node("Cast", [info.name], [inner], to=low))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return [f"ONNX converted to {precision} (graph I/O kept fp32)"]


def _lower(array: np.ndarray, low: int, name: str = "") -> onnx.TensorProto:
    array = array.astype(np.float32)
    if low == TensorProto.FLOAT16:
        finite = np.clip(array, -FP16_MAX, FP16_MAX)
        return numpy_helper.from_array(
            np.where(np.isfinite(array), finite, array).astype(np.float16), name
        )
    return numpy_helper.from_array(array.astype(ml_dtypes.bfloat16), name)


# ---- the build ------------------------------------------------------------------------------
