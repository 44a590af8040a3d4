"""A sub-graph between given inputs and outputs, as a module that can be evaluated alone.

``region_between(gm, inputs, outputs)`` is every node computed from ``inputs`` that an
output needs, plus the weight-only maths and shape-only buffers those nodes read (what
folding left, a view of a table, ``x.new_zeros(...)`` or ``torch.zeros(T, ...)`` to pool
into). A buffer some op writes in place belongs to it only when every write is the region's
own. The region may also read symbolic sizes and tensors it uses only for their shape;
any other activation it reads is refused, named in the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from .._graph import (
    SHAPE_ONLY_OPS,
    DataDependence,
    ancestors,
    descendants,
    extract_subgraph,
    graph_order,
    in_graph_order,
    is_symint,
    mutations,
)
from .rules import NotALookup

__all__ = ["NotALookup", "Region", "region_between"]


@dataclass
class Region:
    inputs: list[Node]
    outputs: list[Node]
    nodes: set[Node]
    # symbolic sizes and tensors read only for their shape, in graph order
    extra_inputs: list[Node] = field(default_factory=list)
    weights: list[Node] = field(default_factory=list)

    def module(self, gm: GraphModule) -> GraphModule:
        """``(*inputs, *extra_inputs) -> tuple(outputs)``, sharing the model's weights."""
        return extract_subgraph(gm, [*self.inputs, *self.extra_inputs], self.outputs, self.nodes)


def region_between(
    gm: GraphModule, inputs: Sequence[Node], outputs: Sequence[Node], what: str
) -> Region:
    """The region from ``inputs`` to ``outputs``; ``what`` names it in refusals."""
    order = graph_order(gm.graph)
    boundary = set(inputs)
    # what the outputs need from the inputs, not what the inputs themselves were made of
    needed = ancestors(outputs, through_sizes=False, stop=boundary) | set(outputs)
    inside = descendants(boundary) & needed
    inside -= boundary
    writers = mutations(gm.graph)
    data = DataDependence(gm.graph)
    pending = [i for n in inside for i in n.all_input_nodes if i.op == "call_function"]
    while pending:
        node = pending.pop()
        if node in inside or node in boundary or is_symint(node):
            continue
        own_writes = node in writers
        if any(w not in inside for w in writers.get(node, ())):
            continue
        if not (data.created_from_data(node) if own_writes else data(node)):
            inside.add(node)
            pending.extend(i for i in node.all_input_nodes if i.op == "call_function")
    missing = [o for o in outputs if o not in inside and o not in boundary]
    if missing:
        raise NotALookup(f"{what}: {missing[0].name} is not computed from its inputs")
    extra, weights = [], []
    externals = {i for n in inside for i in n.all_input_nodes if i not in inside} - boundary
    for ext in in_graph_order(externals, order):
        if ext.op == "get_attr":
            weights.append(ext)
        elif is_symint(ext) or all(
            u.target in SHAPE_ONLY_OPS and u.args[0] is ext for u in ext.users if u in inside
        ):
            extra.append(ext)
        else:
            raise NotALookup(
                f"{what} also reads {ext.name}, which is neither one of its inputs nor a weight"
            )
    return Region(list(inputs), list(outputs), inside, extra, weights)
