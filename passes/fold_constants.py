"""Fold weight-only sub-graphs into constants.

Rewrite: every value computed from weights and buffers alone (the SVD of the summed
Tucker cores, key normalisation, reshapes and permutations of weights and index buffers,
a power iteration started from ``torch.ones``) → one ``get_attr`` of a new buffer holding
that value.

Constraints: the value is computed by running the graph's own ATen calls on the real
weights, so folding reproduces the original numbers bit for bit, singular-vector signs
included (whatever ``torch.linalg.svd`` or ``torch.svd`` gave). Nothing that depends on a
model input is folded; random ops are never folded; nor is a tensor written in place (a
static cache's ``zeros(())`` counter that ``add_`` advances is state, not a constant). A
value that is only a view or an expansion of a weight, or a fill (no maths), is left as it
is, since folding it would copy a table.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_map

from ._graph import VIEW_OPS, get_attr_value, written_through
from .base import PassContext, PassResult, count_nodes, finish

log = logging.getLogger(__name__)

# Views, expansions and copies: folding these alone only copies a weight.
_NO_MATHS = VIEW_OPS | {torch.ops.aten.detach.default}


def _is_random(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable) or "rand" in str(node.target)


def fold_constants(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "fold_constants", nodes_before=count_nodes(gm))
    values: dict[Node, Any] = {}
    maths: dict[Node, bool] = {}  # whether a constant value involved real computation
    written = written_through(gm.graph)
    for node in gm.graph.nodes:
        if node in written:
            continue
        if node.op == "get_attr":
            values[node] = get_attr_value(gm, node)
            maths[node] = False
        elif node.op == "call_function" and not _is_random(node):
            inputs = node.all_input_nodes
            # no input at all: a factory of static size (``torch.ones(h, r)``)
            if all(i in values for i in inputs):
                args = tree_map(lambda a: values[a] if isinstance(a, Node) else a, node.args)
                kwargs = tree_map(lambda a: values[a] if isinstance(a, Node) else a, node.kwargs)
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
                # a factory alone is no maths either: folding it would only copy a fill
                maths[node] = any(maths[i] for i in inputs) or (
                    bool(inputs) and node.target not in _NO_MATHS
                )
    frontier = [
        n
        for n in values
        if n.op == "call_function"
        and maths[n]
        and isinstance(values[n], torch.Tensor)
        and any(u not in values for u in n.users)
    ]
    for i, node in enumerate(frontier):
        name = f"_folded_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, values[node].detach().clone().contiguous())
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        result.changed.append(f"{node.name} -> {name} {tuple(values[node].shape)}")
    result.matched = [n.name for n in values if n.op == "call_function" and maths[n]]
    finish(gm)
    # buffers the graph no longer reads (e.g. the cores' pre-SVD sum) stay on the module;
    # re-capture drops what no node uses
    result.nodes_after = count_nodes(gm)
    log.info("fold_constants: folded %d values", len(result.changed))
    return result
