"""Rules ``region_inputs`` and ``weights``: what the pooling multiplies the rows by.

``region_inputs``: besides the reads and the index glue, the pooling may read only
per-selection float data (the *factors*: scores after any activation or gate), sizes, and
tensors used for their shape. ``weights``: each factor holds its selections in a product
layout, every element's (token, head, selection) traced from the fused selection
(``coordinates``), so it can be viewed as the op's weights [T, H, k, (M)].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import DataDependence, in_graph_order, is_symint, mutations
from ..coordinates import Coords, Tracer
from ..layouts import STAR, TOKEN, Layout
from ..rules import NotALookup
from .binding import WeightFactor

INPUTS_RULE = "region_inputs"
WEIGHTS_RULE = "weights"
aten = torch.ops.aten


def factor_nodes(
    gm: GraphModule, core: set[Node], closure: set[Node], order: dict[Node, int], what: str
) -> list[Node]:
    """The float per-selection inputs of the pooling ``core`` (the nodes between the reads
    and the pooled node), in graph order; refuses any other activation it reads."""
    data = DataDependence(gm.graph)
    writers = mutations(gm.graph)
    candidates = []
    for node in in_graph_order(core, order):
        for i in node.all_input_nodes:
            if i in core or i in closure or is_symint(i) or i.op == "get_attr" or not data(i):
                continue
            own = writers.get(i, [])
            if own and all(w in core for w in own) and not data.created_from_data(i):
                continue  # a fresh buffer the pooling writes into
            val = i.meta.get("val")
            if isinstance(val, Tensor) and val.is_floating_point() and i not in candidates:
                candidates.append(i)
            elif not isinstance(val, Tensor) or not all(
                u.target in (aten.sym_size.int,) for u in i.users if u in core
            ):
                raise NotALookup(f"{what} also reads {i.name}, which is not per-selection data")
    return candidates


def weight_factor(tracer: Tracer, real: dict[Node, Any], node: Node, what: str) -> WeightFactor:
    """``node`` as a weight factor: its dims split into token, head, selection and core
    sub-dims, proven against every traced coordinate."""
    coords = tracer.coords(node)
    if coords is None or "j" not in coords:
        raise NotALookup(f"{what} multiplies by {node.name}: {tracer.reason(node)}")
    shape = real[node].shape
    subs = split_dims(coords, shape)
    if subs is None:
        raise NotALookup(f"{what}: {node.name} holds its selections in no product layout")
    split = [size for dim in subs for _, size in dim]
    role_of = {"t": TOKEN, "h": "h", "j": "k", "c": "c"}
    roles = [role_of.get(name, STAR) for dim in subs for name, _ in dim]
    subs = [[(role_of.get(name, STAR), size) for name, size in dim] for dim in subs]
    counts = {r: roles.count(r) for r in ("h", "k", "c")}
    if any(v > 1 for v in counts.values()):
        raise NotALookup(f"{what}: {node.name} spreads one coordinate over several dims")
    layout = Layout(tuple(roles), ("h", "k", "c"))
    core = None
    c = coords.get("c")
    if c is not None and "c" not in roles:
        values = set(c.unique().tolist()) - {-1}
        core = values.pop() if len(values) == 1 else None
    # the split must reproduce every traced coordinate
    expected = {
        "t": _flat_index(split, roles, TOKEN),
        "h": _flat_index(split, roles, "h"),
        "j": _flat_index(split, roles, "k"),
    }
    for name, want in expected.items():
        got = coords.get(name)
        if got is not None and want is not None:
            got = got.expand(shape).reshape(split)
            if not bool(((got < 0) | (got == want)).all()):
                raise NotALookup(f"{what}: {node.name}'s {name} order is not the selection's")
    return WeightFactor(node=node, subs=subs, layout=layout, core=core)


def _flat_index(split: list[int], roles: list[str], role: str) -> Tensor | None:
    """Per element of a tensor of shape ``split``, its index along the ``role`` dims
    (flattened in order; a head's index is global)."""
    dims = [d for d, r in enumerate(roles) if r == role]
    if not dims:
        return None
    index = torch.zeros(split, dtype=torch.int64)
    for d in dims:
        shape = [1] * len(split)
        shape[d] = split[d]
        index = index * split[d] + torch.arange(split[d]).view(shape)
    return index


def _line(c: Tensor, dim: int) -> list[int]:
    index = [0] * c.dim()
    index[dim] = slice(None)  # type: ignore[call-overload]
    return c[tuple(index)].tolist()


def split_dims(coords: Coords, shape: torch.Size) -> list[list[tuple[str, int]]] | None:
    """Per dim, the (coordinate, size) sub-dims it holds, outermost first: a dim holding
    ``H·k`` selections (``view(T, H*k)``) splits into ``[("h", H), ("j", k)]``; a dim no
    coordinate varies along is ``[("*", size)]``. None when a dim is not such a product."""
    out = []
    for dim, size in enumerate(shape):
        lines = {}
        for name, c in coords.items():
            line = _line(c.expand(shape), dim)
            if len(set(line)) > 1:
                lines[name] = line
        if not lines:
            out.append([("*", size)])
            continue
        # inner coordinates change first; each period is the next one's first change
        first_change = {
            name: next(i for i, v in enumerate(line) if v != line[0])
            for name, line in lines.items()
        }
        names = sorted(lines, key=first_change.__getitem__)
        subs, inner = [], first_change[names[0]]
        if inner > 1:  # an expansion inside the dim, below every coordinate
            subs.append(("*", inner))
        for i, name in enumerate(names):
            nxt = first_change[names[i + 1]] if i + 1 < len(names) else size
            if nxt % inner or size % nxt or nxt == inner:
                return None
            subs.append((name, nxt // inner))
            inner = nxt
        out.append(list(reversed(subs)))
    return out
