"""Merge nodes that compute the same thing from the same inputs.

Rewrite: two calls of one pure op with equal arguments → one. Research code indexes the
same tensor twice (``S[0]`` in two places becomes two ``select`` nodes); after this pass
both readers see one node, so the fusion pass can tell that a top-k's input and a
gather's source are the same score tensor.

Constraints: only functional ATen ops (no mutable schema, nothing random). A node that
is itself written in place, through any view or alias of it (two ``x.new_zeros(...)``
buffers each filled by ``matmul(..., out=buf[:, i])``; a static KV cache's counters,
``zeros(()).to(device).add_(n)``), is never merged: equal creation arguments do not make
equal values. Two reads of a tensor that is written in place merge only when no write
to it comes between them.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule, Node

from ._graph import is_pure, mutations, view_base, written_through
from .base import PassContext, PassResult, count_nodes, finish


def _key(node: Node) -> Any:
    def freeze(a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        if isinstance(a, Node):
            return ("node", a.name)
        return (type(a).__name__, repr(a))

    return (node.target, freeze(node.args), freeze(node.kwargs))


def eliminate_common_subexpressions(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "eliminate_common_subexpressions", nodes_before=count_nodes(gm))
    writes = mutations(gm.graph)
    written = written_through(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    seen: dict[Any, Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_pure(node):
            continue
        if node in written:  # its value is what is written into it, not what created it
            continue
        key = _key(node)
        first = seen.setdefault(key, node)
        if first is node:
            continue
        written_between = any(
            order[first] < order[w] < order[node]
            for i in node.all_input_nodes
            for w in writes.get(view_base(i), [])
        )
        if written_between:
            seen[key] = node  # later readers see this value, not the first one
            continue
        node.replace_all_uses_with(first)
        result.changed.append(f"{node.name} -> {first.name}")
    result.matched = list(result.changed)
    finish(gm)
    result.nodes_after = count_nodes(gm)
    return result
