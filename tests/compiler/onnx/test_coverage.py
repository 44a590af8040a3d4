"""``missing_kernels``: decided from the file and ONNX Runtime's kernel registry, and
held to what ONNX Runtime itself does with the file (it fails to run exactly those)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ultramem.compiler.onnx.coverage import missing_kernels


def _topk_model(elem: int, op: str = "TopK") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, [2, 8])
    values = helper.make_tensor_value_info("values", elem, [2, 3])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    if op == "ScatterElements":  # a scatter-add, as torch.onnx writes index_add / scatter_add
        shape = [2, 8]
        updates = helper.make_tensor_value_info("values", elem, shape)
        index = helper.make_tensor("i", TensorProto.INT64, shape, [0] * 16)
        node = helper.make_node(
            "ScatterElements", ["x", "i", "x"], ["values"], axis=1, reduction="add"
        )
        graph = helper.make_graph([node], "g", [x], [updates], initializer=[index])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    if op == "TopK":
        indices = helper.make_tensor_value_info("indices", TensorProto.INT64, [2, 3])
        node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)
        outputs = [values, indices]
    else:  # a node whose kernel takes any type: a copy
        values = helper.make_tensor_value_info("values", elem, [2, 8])
        node = helper.make_node("Identity", ["x"], ["values"])
        outputs = [values]
    graph = helper.make_graph([node], "g", [x], outputs, initializer=[k])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _runs(model: onnx.ModelProto) -> bool:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    elem = model.graph.input[0].type.tensor_type.elem_type
    x = np.ones(shape, dtype=helper.tensor_dtype_to_np_dtype(elem))
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        if elem != TensorProto.BFLOAT16:  # numpy feeds no bfloat16: loading must do
            session.run(None, {"x": x})
    except Exception:
        return False
    return True


@pytest.mark.parametrize(
    ("elem", "op", "missing"),
    [
        (TensorProto.BFLOAT16, "TopK", ["TopK (bfloat16)"]),
        (TensorProto.FLOAT, "TopK", []),
        # no float16 TopK kernel either, but the CPU provider casts float16 nodes itself
        (TensorProto.FLOAT16, "TopK", []),
        (TensorProto.BFLOAT16, "Identity", []),
        # registered for float16, refused when it runs with a reduction
        (TensorProto.FLOAT16, "ScatterElements", ["ScatterElements with reduction (float16)"]),
        (TensorProto.FLOAT, "ScatterElements", []),
    ],
)
def test_missing_kernels_are_what_onnx_runtime_refuses(elem: int, op: str, missing: list) -> None:
    model = _topk_model(elem, op)
    assert missing_kernels(model) == missing
    assert _runs(model) == (not missing)
