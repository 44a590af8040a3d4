"""Standard-ONNX bodies of the ``ultramem`` ops: the function each custom node carries.

A body computes the op's reference semantics (``kernels/retrieve.py``,
``kernels/aggregate.py``) with standard ops only, so stock ONNX Runtime runs the custom
node as it is and TensorRT's parser can inline it. The attributes and the optional inputs
present fix the body's structure (activation, pooling, maps), so there is one function per
such set, told apart by the node's ``overload``.

Choices that keep the bodies exact and portable:

- TopK with ``largest=1, sorted=1``: the ONNX spec breaks ties toward the lower index,
  as the reference does; ONNX Runtime's CPU kernel follows it (tested with planted ties).
- Batched row selection is GatherElements on an expanded index, not Gather + batch dims.
- A map lookup ``map[h', slot]`` is one Gather on the flattened map at ``slot + h'·S``.
- Pooling is a one-hot matrix product ``[T, G, H·k] @ [T, H·k, Dv]`` in fp32 instead of
  ScatterElements (one group: a ReduceSum): ``add`` sums the same terms; ``scatter`` ("the
  last of the H·k wins") keeps only each group's last hit. TensorRT parses this without a
  scatter reduction, and ONNX leaves duplicate indices in a plain ScatterElements undefined.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class _Body:
    """Collects the nodes of one function body; every value gets a fresh local name."""

    def __init__(self, op_name: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._op_name = op_name  # node names say which op's body a layer came from
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self._add(op_type, list(inputs), names, attrs)
        return names[0] if outputs == 1 else names

    def op_to(self, output: str, op_type: str, *inputs: str, **attrs: Any) -> str:
        self._add(op_type, list(inputs), [output], attrs)
        return output

    def _add(self, op_type: str, inputs: list[str], outputs: list[str], attrs: Any) -> None:
        name = f"{self._op_name}/{outputs[0]}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def ints(self, *values: int) -> str:
        tensor = helper.make_tensor(self._name("const"), INT64, [len(values)], list(values))
        return self.op("Constant", value=tensor)

    def scalar(self, value: int) -> str:
        return self.array(np.array(value, dtype=np.int64))

    def array(self, values: np.ndarray) -> str:
        return self.op("Constant", value=onnx.numpy_helper.from_array(values))

    def gather_rows(self, data: str, index: str, axis: int) -> str:
        """``data`` [.., n, r], ``index`` [.., m] -> [.., m, r] (rows picked along ``axis``)."""
        shape = self.op("Concat", self.op("Shape", index), self.op("Shape", data, start=-1), axis=0)
        expanded = self.op("Expand", self.op("Unsqueeze", index, self.ints(-1)), shape)
        return self.op("GatherElements", data, expanded, axis=axis)


def retrieve_body(topm: int, topk: int, activation: str) -> list[onnx.NodeProto]:
    """Nodes from (row_scores, col_scores, row_weight, col_weight, cores) to (scores, slots)."""
    b = _Body("Retrieve")
    row = b.op("Cast", "row_scores", to=FLOAT)  # [T, H, n, r]
    col = b.op("Cast", "col_scores", to=FLOAT)
    candidates = []
    for scores, weight in ((row, "row_weight"), (col, "col_weight")):
        w = b.op("Unsqueeze", b.op("Cast", weight, to=FLOAT), b.ints(0, 2))  # [1, H, 1, r]
        merged = b.op("ReduceSum", b.op("Mul", scores, w), b.ints(-1), keepdims=0)  # [T, H, n]
        _, index = b.op("TopK", merged, b.ints(topm), axis=-1, largest=1, sorted=1, outputs=2)
        candidates.append((index, b.gather_rows(scores, index, axis=2)))  # [T, H, m, r]
    (i_row, c_row), (i_col, c_col) = candidates
    cores = b.op("Cast", "cores", to=FLOAT)  # [M, H, r, r]
    projected = b.op("MatMul", b.op("Unsqueeze", c_row, b.ints(1)), cores)  # [T, M, H, m, r]
    col_t = b.op("Transpose", b.op("Unsqueeze", c_col, b.ints(1)), perm=[0, 1, 2, 4, 3])
    grid = b.op("Reshape", b.op("MatMul", projected, col_t), b.ints(0, 0, 0, -1))  # [T,M,H,m²]
    total = b.op("ReduceSum", grid, b.ints(1), keepdims=0)  # [T, H, m²]
    _, pos = b.op("TopK", total, b.ints(topk), axis=-1, largest=1, sorted=1, outputs=2)
    m = b.ints(topm)
    n = b.op("Shape", "row_scores", start=2, end=3)
    picked_row = b.op("GatherElements", i_row, b.op("Div", pos, m), axis=2)
    picked_col = b.op("GatherElements", i_col, b.op("Mod", pos, m), axis=2)
    b.op_to("slots", "Add", b.op("Mul", picked_row, n), picked_col)
    grid_shape = b.op("Concat", b.op("Shape", grid, end=3), b.ints(topk), axis=0)
    index = b.op("Expand", b.op("Unsqueeze", pos, b.ints(1)), grid_shape)  # [T, M, H, k]
    picked = b.op("GatherElements", grid, index, axis=3)
    scores = b.op("Transpose", picked, perm=[0, 2, 3, 1])  # [T, H, k, M]
    if activation == "relu":
        scores = b.op("Relu", scores)
    elif activation == "softmax":
        scores = b.op("Softmax", scores, axis=2)
    b.op_to("scores", "CastLike", scores, "row_scores")
    return b.nodes


def aggregate_body(
    groups: int, pooling: str, has_row_map: bool, has_group_map: bool
) -> list[onnx.NodeProto]:
    """Nodes from (values, weights, slots, [row_map], [group_map]) to pooled [T, G, Dv]."""
    b = _Body("Aggregate")
    slots = b.op("Cast", "slots", to=INT64)  # [T, H, k]

    def mapped(index_map: str) -> str:
        """``index_map[h', slot]`` with h' = h for an [H, S] map, 0 for a [1, S] map."""
        width = b.op("Shape", index_map, start=1, end=2)
        heads = b.op("Shape", index_map, start=0, end=1)
        head = b.op("Range", b.scalar(0), b.op("Squeeze", heads), b.scalar(1))
        offset = b.op("Mul", b.op("Reshape", head, b.ints(1, -1, 1)), width)  # [1, H', 1]
        flat = b.op("Reshape", b.op("Cast", index_map, to=INT64), b.ints(-1))
        return b.op("Gather", flat, b.op("Add", slots, offset), axis=0)

    row = mapped("row_map") if has_row_map else slots
    gathered = b.op("Cast", b.op("Gather", "values", row, axis=0), to=FLOAT)  # [T, H, k, Dv]
    chunks = b.op("Concat", b.op("Shape", "weights"), b.ints(-1), axis=0)  # [T, H, k, M, Dv/M]
    weight = b.op("Unsqueeze", b.op("Cast", "weights", to=FLOAT), b.ints(-1))
    weighted = b.op("Mul", b.op("Reshape", gathered, chunks), weight)
    tokens = b.op("Shape", "weights", end=1)
    flat = b.op("Concat", tokens, b.ints(-1), b.op("Shape", "values", start=1, end=2), axis=0)
    weighted = b.op("Reshape", weighted, flat)  # [T, H·k, Dv]
    if pooling == "add" and not has_group_map and groups == 1:
        pooled = b.op("ReduceSum", weighted, b.ints(1), keepdims=1)  # one group: a plain sum
    else:
        group = mapped("group_map") if has_group_map else b.op("Mul", slots, b.ints(0))
        group = b.op("Reshape", group, b.op("Concat", tokens, b.ints(1, -1), axis=0))  # [T,1,H·k]
        ids = b.array(np.arange(groups, dtype=np.int64).reshape(1, groups, 1))
        one_hot = b.op("Cast", b.op("Equal", group, ids), to=FLOAT)  # [T, G, H·k]
        if pooling == "scatter":
            ones = b.op(
                "ConstantOfShape",
                b.op("Shape", group),
                value=helper.make_tensor("one", FLOAT, [1], [1.0]),
            )
            axis = b.array(np.array(2, dtype=np.int64))
            position = b.op("CumSum", ones, axis)  # 1 .. H·k, exact in fp32
            last = b.op("ReduceMax", b.op("Mul", one_hot, position), b.ints(2), keepdims=1)
            is_last = b.op("Cast", b.op("Equal", position, last), to=FLOAT)
            one_hot = b.op("Mul", one_hot, is_last)
        pooled = b.op("MatMul", one_hot, weighted)
    b.op_to("pooled", "CastLike", pooled, "values")
    return b.nodes


BODIES = {"Retrieve": retrieve_body, "Aggregate": aggregate_body}
