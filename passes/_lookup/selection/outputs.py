"""Rule ``selection_outputs``: the nodes the rest of the graph reads the selection through.

They are the first nodes that combine the final top-k's positions with candidate data (the
selected slot ids, or their rows and columns; the selected per-core scores), and the final
top-k's own values (the ranked scores). Refused: a model that returns the grid positions
themselves, or combines them with something computed after the final top-k.
"""

from __future__ import annotations

from torch.fx import Node

from ..._graph import DataDependence, descendants, graph_order, in_graph_order, is_symint
from ..anchors import LookupAnchors, topk_output
from ..rules import Failure

RULE = "selection_outputs"


def _position_nodes(final: Node) -> set[Node]:
    """The final top-k's positions and what is computed from them alone (``pos // m``)."""
    idx = topk_output(final, 1)
    if idx is None:
        return set()
    positions, stack = {idx}, list(idx.users)
    data = DataDependence(final.graph)
    while stack:
        node = stack.pop()
        if node in positions or node.op != "call_function":
            continue
        others = [i for i in node.all_input_nodes if i not in positions]
        if all(is_symint(i) or not data(i) for i in others):
            positions.add(node)
            stack.extend(node.users)
    return positions


def check(lookup: LookupAnchors) -> list[Node] | Failure:
    """The selection's outputs, in graph order, or why there are none to bind."""
    final = lookup.final
    order = graph_order(final.graph)
    positions = _position_nodes(final)
    values = topk_output(final, 0)
    outputs = [values] if values is not None and values.users else []
    outputs += [u for p in positions for u in p.users if u not in positions and u.op != "output"]
    if any(u.op == "output" for p in positions for u in p.users):
        return Failure.at(RULE, f"the model returns the grid positions of {final.name}", final)
    after = descendants([final])
    for out in outputs:
        late = [i for i in out.all_input_nodes if i in after and i not in positions and i != values]
        if out is not values and late:
            return Failure.at(
                RULE,
                f"{out.name} combines the selection of {final.name} with {late[0].name}, "
                "computed after it",
                out,
            )
    if not outputs:
        return Failure.at(RULE, f"nothing reads the selection of {lookup.name}", final)
    return in_graph_order(set(outputs), order)
