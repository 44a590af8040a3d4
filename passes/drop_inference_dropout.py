"""Remove dropout that inference makes the identity.

Rewrite: ``dropout(x, p, train=False)`` (and ``native_dropout(x, p, False)``) → ``x``.
Research code keeps dropout modules on queries, scores and values; in an inference graph
they are no-ops that would otherwise sit between the parts of a lookup (and keep a
replaced sub-graph alive).

Constraints: only calls whose ``train`` argument is literally ``False``; training-mode
dropout is random and stays.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from .base import PassContext, PassResult, count_nodes, finish

_DROPOUT = torch.ops.aten.dropout.default
_NATIVE = torch.ops.aten.native_dropout.default


def drop_inference_dropout(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "drop_inference_dropout", nodes_before=count_nodes(gm))
    for node in list(gm.graph.nodes):
        if node.target is _DROPOUT:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
            if train is False:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)  # dead code removal keeps dropout (random op)
                result.changed.append(node.name)
        elif node.target is _NATIVE and len(node.args) > 2 and node.args[2] is False:
            outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            for out in outputs:
                out.replace_all_uses_with(node.args[0])
            if outputs:
                result.changed.append(node.name)
    result.matched = list(result.changed)
    finish(gm)
    result.nodes_after = count_nodes(gm)
    return result
