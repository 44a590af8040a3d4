"""Remove nodes whose values nothing reads.

Rewrite: a node with no users and no side effect → nothing. Research code computes
things it never uses (a norm computed and dropped, the singular values of an SVD
whose vectors alone were kept); after folding and fusion, whole lookups are dead.
"""

from __future__ import annotations

from torch.fx import GraphModule

from .base import PassContext, PassResult, count_nodes, finish


def eliminate_dead_code(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "eliminate_dead_code", nodes_before=count_nodes(gm))
    before = {n.name for n in gm.graph.nodes}
    finish(gm)
    removed = sorted(before - {n.name for n in gm.graph.nodes})
    result.matched = result.changed = removed
    # weights only dead code read: drop them so re-capture does not carry them
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name.startswith("_folded_") and name not in used:
            delattr(gm, name)
    result.nodes_after = count_nodes(gm)
    return result
