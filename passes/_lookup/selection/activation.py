"""Rule ``activation``: the model's activation of the selected scores, taken into the op.

When every float output goes through the same activation (``relu``, or a ``softmax`` along
the selections' dim; after casts and views), the op applies it and the activation's node
takes the op's activated scores, proven like the rest: they reproduce the activation's
own outputs on every probe. Otherwise the activation stays as the model's op; the binding
is admitted either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..._graph import VIEW_OPS, record_values, run_widened
from ..layouts import Layout
from ..region import region_between
from ..rules import NotALookup
from .binding import Output, OutputKind, SelectionBinding, output_value
from .proof import Probe, close, match_kind

RULE = "activation"
_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}
_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _value_users(node: Node) -> list[Node]:
    """The users that read ``node``'s numbers, not only its dtype or shape."""
    return [u for u in node.users if not reads_metadata_only(u, node)]


def reads_metadata_only(user: Node, node: Node) -> bool:
    """``_assert_tensor_metadata``, ``x.type_as(node)``, and casts or views of ``node`` read
    by such ops alone: what torch.export leaves of a ``.float() … .type_as(scores)``."""
    aten = torch.ops.aten
    if user.target is aten._assert_tensor_metadata.default:
        return True
    if user.target is aten.type_as.default:
        return user.args[0] is not node
    if user.target in _CASTS or user.target in VIEW_OPS:
        return bool(user.users) and all(reads_metadata_only(u, user) for u in user.users)
    return False


def _activation_of(out: Output) -> tuple[str, Node, list[str] | None] | None:
    """The activation every use of a float output goes through (after casts and views):
    ``relu``, or a ``softmax`` along the selections' dim; its node, and the output's roles
    as they reach it (None past a view)."""
    aten = torch.ops.aten
    node, roles = out.node, list(out.layout.roles)
    while len(_value_users(node)) == 1:
        (user,) = _value_users(node)
        if user.target in _CASTS:
            pass
        elif user.target is aten.permute.default:
            roles = [roles[d] for d in user.args[1]] if roles is not None else None
        elif user.target is aten.transpose.int and roles is not None:
            a, b = (int(d) % len(roles) for d in user.args[1:3])
            roles[a], roles[b] = roles[b], roles[a]
        elif user.target in VIEW_OPS:
            roles = None  # still elementwise-equivalent, but which dim is which is lost
        else:
            break
        node = user
    if len(_value_users(node)) != 1:
        return None
    (user,) = _value_users(node)
    if user.target is aten.relu.default:
        return "relu", user, roles
    if user.target not in _SOFTMAX or out.kind == OutputKind.RANKING or roles is None:
        return None
    if roles[int(user.args[1]) % len(roles)] == "k":
        return "softmax", user, roles
    return None


def absorb_activation(
    gm: GraphModule,
    b: SelectionBinding,
    distinct: list[Node],
    probes: list[Probe],
    example: tuple[Any, ...],
) -> None:
    """Set ``b.activation`` and ``b.activated`` when the op reproduces the activation."""
    floats = [o for o in b.outputs if o.kind not in OutputKind.INTEGER]
    found = [_activation_of(o) for o in floats]
    if not floats or any(f is None for f in found) or len({f[0] for f in found}) != 1:  # type: ignore[index]
        return
    activation = found[0][0]  # type: ignore[index]
    nodes = [f[1] for f in found]  # type: ignore[index]
    try:
        region = region_between(gm, distinct, nodes, "the activation of the selected scores")
    except NotALookup:
        return
    module = region.module(gm)
    sizes = record_values(gm, example, set(region.extra_inputs))
    extras = [sizes[e] for e in region.extra_inputs]
    found_layouts: list[Layout | None] = [None] * len(floats)
    for xs, _ in probes:
        values = dict(zip(distinct, xs, strict=True))
        with torch.no_grad():
            expected = run_widened(module, *xs, *extras)
            scores, slots = b.run(values[b.rows.node], values[b.cols.node], activation)
        for i, (out, want) in enumerate(zip(floats, expected, strict=True)):
            # the activation's dims are the output's moved by the permutes between them
            # (known) or by views (found on the first probe, proven on the rest)
            layout = found_layouts[i] or _layout_of(out, found[i][2], want, scores, slots, b)  # type: ignore[index]
            if layout is None:
                return
            found_layouts[i] = layout
            value = output_value(out.kind, scores, slots, b.n)
            got = layout.model(value, list(want.shape)).to(want.dtype)
            if not close(got, want)[0]:
                return
    b.activation = activation
    b.activated = {
        o.node: (n, layout)
        for o, n, layout in zip(floats, nodes, found_layouts, strict=True)
        if layout is not None
    }


def _layout_of(
    out: Output,
    roles: list[str] | None,
    want: Tensor,
    scores: Tensor,
    slots: Tensor,
    b: SelectionBinding,
) -> Layout | None:
    if roles is not None:
        return Layout(tuple(roles), out.layout.named)
    return match_kind(out.kind, want, scores, slots, b)
