"""Write exclusive-or of flags without bitwise ops, which TensorRT's parser refuses.

Rewrite: ``x ^ y`` of two bool tensors → ``x != y``; ``m.to(int) ^ c`` for a bool ``m``
and a constant ``c`` of 0 or 1 (``(attention_mask.long() ^ 1)``, RNA-MSM's padding mask)
→ ``m.to(int)`` or ``(~m).to(int)``. Exact: the values are 0 and 1 on both sides.

Constraints: only operands known to hold 0 and 1 (bools, or an integer cast of a bool);
any other exclusive-or is left as it is (torch.onnx's ``BitwiseXor``).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ._graph import fill_meta
from .base import PassContext, PassResult, Refusal, calls_to, count_nodes, finish

aten = torch.ops.aten
_XOR = {
    aten.bitwise_xor.Tensor,
    aten.bitwise_xor.Scalar,
    aten.__xor__.Tensor,
    aten.__xor__.Scalar,
}
_CASTS = (aten.to.dtype, aten._to_copy.default)


def _is_bool(x: object) -> bool:
    return isinstance(x, Node) and "val" in x.meta and x.meta["val"].dtype is torch.bool


def _cast_of_bool(x: object) -> Node | None:
    """The bool tensor ``x`` is an integer cast of, if it is one."""
    if not isinstance(x, Node) or x.target not in _CASTS or not _is_bool(x.args[0]):
        return None
    return x.args[0]  # type: ignore[return-value]


def flags_without_bitwise_ops(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "flags_without_bitwise_ops", nodes_before=count_nodes(gm))
    graph = gm.graph
    for node in calls_to(gm, _XOR):
        result.matched.append(node.name)
        a, b = node.args[0], node.args[1]
        with graph.inserting_before(node):
            if _is_bool(a) and _is_bool(b):
                new = graph.call_function(aten.ne.Tensor, (a, b))
            elif _cast_of_bool(a) is not None and b in (0, 1, True, False):
                flag = _cast_of_bool(a)
                flipped = graph.call_function(aten.logical_not.default, (flag,)) if b else flag
                new = graph.call_function(aten.to.dtype, (flipped, a.meta["val"].dtype))
            else:
                result.refused.append(Refusal(node.name, "operands not known to hold 0 and 1"))
                continue
        node.replace_all_uses_with(new)
        result.changed.append(node.name)
    finish(gm)
    fill_meta(gm)
    result.nodes_after = count_nodes(gm)
    return result
