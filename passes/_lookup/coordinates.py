"""Which selection every element of a per-selection tensor belongs to, traced through glue.

The fused selection's outputs have known coordinates: ``slots`` [T, H, k] element (t, h, j)
is token t's j-th selection of head h; ``scores`` [T, H, k, M] adds the core c. The model's
glue between them and the aggregation (views, permutes, ``cat`` of heads, activations,
gates, shuffles, table reads at the slots, einsums) moves elements around; ``trace``
follows each element's coordinates through it, op by op, on the real shapes: for every
node, one int64 tensor per coordinate (its shape), -1 where the element does not vary
with that coordinate (an operand broadcast, a table's value dim).

Ops it does not know leave a node untraced (None): what needs its coordinates is then
refused with the op's name, never guessed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node
from torch.utils._pytree import tree_map

from .._graph import VIEW_OPS
from .einsum_specs import expand_ellipsis, matmul_equation

Coords = dict[str, Tensor]
NAMES = ("t", "h", "j", "c")
aten = torch.ops.aten

# ops that only move or copy elements: applied to each coordinate tensor as they are
LAYOUT_OPS = VIEW_OPS | {
    aten._unsafe_view.default,
    aten.squeeze.default,
    aten.detach.default,
    aten.repeat.default,
    aten.narrow.default,
    aten.movedim.int,
    aten.swapaxes.default,
    aten.flip.default,
    aten.roll.default,
    aten.clone.default,
}
SPLIT_OPS = {
    aten.chunk.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.tensor_split.indices,
}
ALONG_AXIS_OPS = {
    aten.softmax.int,
    aten._softmax.default,
    aten.log_softmax.int,
    aten._log_softmax.default,
    aten.cumsum.default,
}
REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}
CASTS = {
    aten.to.dtype,
    aten.to.device,
    aten.to.other,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
}
# elementwise ops torch does not tag ``pointwise``
ELEMENTWISE = {
    aten.floor_divide.default,
    aten.floor_divide.Scalar,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.where.self,
}


def _inference_dropout(node: Node) -> bool:
    """``dropout(x, p, train=False)``: the identity at inference."""
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return node.target is aten.dropout.default and train is False


def merge(parts: Iterable[Coords | None], shape: torch.Size) -> Coords | None:
    """The coordinates of an elementwise result: each part broadcast to ``shape``; where
    two parts both name a coordinate they must agree (else None: not aligned)."""
    out: Coords = {}
    for part in parts:
        if part is None:
            continue
        for name, c in part.items():
            c = c.expand(shape) if tuple(c.shape) != tuple(shape) else c
            if name not in out:
                out[name] = c
                continue
            known = out[name]
            both = (known >= 0) & (c >= 0)
            if bool((known[both] != c[both]).any()):
                return None
            out[name] = torch.where(known >= 0, known, c)
    return out


def _broadcastable(c: Tensor, shape: torch.Size) -> Tensor:
    """``c`` (of some operand's shape) laid against ``shape`` from the right, as torch does."""
    while c.dim() < len(shape):
        c = c.unsqueeze(0)
    return c


class Tracer:
    """Coordinates of nodes downstream of seeded ones; ``values`` holds real node values
    (for shapes and the size arguments of views)."""

    def __init__(self, values: dict[Node, Any]) -> None:
        self.values = values
        self.known: dict[Node, Any] = {}
        self.why: dict[Node, str] = {}

    def seed(self, node: Node, coords: Coords) -> None:
        self.known[node] = coords

    def coords(self, node: Node) -> Coords | None:
        """The node's coordinates (None: it carries no selection, or an op was unknown)."""
        if node in self.known:
            return self.known[node]
        stack, needed = [node], set()
        while stack:  # every untraced node it is computed from
            n = stack.pop()
            if n in self.known or n in needed:
                continue
            needed.add(n)
            stack.extend(i for i in n.all_input_nodes if i not in self.known)
        position = {n: i for i, n in enumerate(node.graph.nodes)}
        for n in sorted(needed, key=position.__getitem__):  # inputs before their users
            self.known[n] = self._trace(n)
        return self.known[node]

    def reason(self, node: Node) -> str:
        """Why ``node`` has no coordinates: the first untraceable op on its way, if any."""
        for n in [node, *sorted(self.why, key=lambda m: m.name)]:
            if n in self.why:
                return self.why[n]
        return f"{node.name} carries no selection coordinates"

    # ---- rules ---------------------------------------------------------------------------

    def _trace(self, node: Node) -> Any:
        if node.op != "call_function":
            return None
        inputs = [self.known.get(i) for i in node.all_input_nodes]
        if all(c is None for c in inputs):
            return None  # computed without any selection
        target = node.target
        out = self.values.get(node)
        try:
            if target is operator.getitem:
                parent = self.known.get(node.args[0])
                return parent[node.args[1]] if isinstance(parent, list) else None
            if target in LAYOUT_OPS or target in SPLIT_OPS:
                return self._apply(node)
            if target in (aten.cat.default, aten.concat.default, aten.stack.default):
                return self._concat(node)
            if target in ALONG_AXIS_OPS or _inference_dropout(node):
                return self.known.get(node.args[0])
            if target in REDUCTIONS:
                return self._reduce(node)
            if target in (aten.embedding.default,):
                return self._read_rows(node, node.args[1], node.args[0])
            if target is aten.index.Tensor:
                return self._index(node)
            if target is aten.gather.default:
                return self._gather(node)
            if target is aten.take_along_dim.default:
                return self._take_along_dim(node)
            if target in (aten.einsum.default, aten.matmul.default, aten.bmm.default,
                          aten.mm.default, aten.linear.default):  # fmt: skip
                return self._contract(node)
            if isinstance(out, Tensor) and (
                target in CASTS
                or target in ELEMENTWISE
                or torch.Tag.pointwise in getattr(target, "tags", ())
            ):
                parts = [
                    self.known.get(a) if isinstance(a, Node) else None
                    for a in node.args
                    if isinstance(a, Node) and isinstance(self.values.get(a), Tensor)
                ]
                parts = [
                    {k: _broadcastable(v, out.shape) for k, v in p.items()} if p else None
                    for p in parts
                ]
                return merge(parts, out.shape)
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            self.why[node] = f"cannot trace {node.name} ({target}): {exc}"
            return None
        self.why[node] = f"{node.name} ({target}) is an op the coordinate trace does not know"
        return None

    def _args(self, node: Node, pick: Callable[[Node], Any]) -> tuple[Any, Any]:
        def value(a: Any) -> Any:
            if isinstance(a, Node):
                return pick(a)
            return a

        return tree_map(value, node.args), tree_map(value, node.kwargs)

    def _apply(self, node: Node) -> Any:
        """A layout op on every coordinate tensor (a broadcast input holds -1s)."""
        source = node.args[0]
        coords = self.known.get(source)
        if coords is None:
            return None
        result: dict[str, Any] = {}
        for name, c in coords.items():
            full = c.expand(self.values[source].shape).contiguous()
            args, kwargs = self._args(
                node, lambda a, full=full: full if a is source else self.values.get(a)
            )
            result[name] = node.target(*args, **kwargs)
        if isinstance(next(iter(result.values())), (list, tuple)):
            count = len(next(iter(result.values())))
            return [{name: parts[i] for name, parts in result.items()} for i in range(count)]
        return result

    def _concat(self, node: Node) -> Coords | None:
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        names = {k for t in tensors for k in (self.known.get(t) or {})}
        out: Coords = {}
        for name in names:
            parts = []
            for t in tensors:
                c = (self.known.get(t) or {}).get(name)
                shape = self.values[t].shape
                parts.append(c.expand(shape) if c is not None else torch.full(shape, -1))
            out[name] = node.target(parts, dim)
        return out

    def _reduce(self, node: Node) -> Coords | None:
        source = node.args[0]
        coords = self.known.get(source)
        if coords is None:
            return None
        shape = self.values[source].shape
        dims = node.args[1] if len(node.args) > 1 else list(range(len(shape)))
        dims = [d % len(shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim"))
        out: Coords = {}
        for name, c in coords.items():
            c = c.expand(shape)
            first = c
            for d in dims:
                first = first.narrow(d, 0, 1)
            constant = bool((c == first.expand(shape)).all())
            reduced = first if keep else first.squeeze(dims) if dims else first
            out[name] = reduced if constant else torch.full(reduced.shape, -1)
        return out

    def _read_rows(self, node: Node, index: Node, table: Node) -> Coords | None:
        """Rows of a table without coordinates at traced indices: each row takes its index's
        coordinates, the row's own dims none."""
        if self.known.get(table) is not None:
            return None
        coords = self.known.get(index)
        out = self.values[node]
        if coords is None:
            return None
        extra = out.dim() - self.values[index].dim()
        result = {}
        for name, c in coords.items():
            c = c.expand(self.values[index].shape)
            for _ in range(extra):
                c = c.unsqueeze(-1)
            result[name] = c.expand(out.shape)
        return result

    def _index(self, node: Node) -> Coords | None:
        table, indices = node.args
        if self.known.get(table) is not None or any(i is None for i in indices):
            return None
        out = self.values[node]
        lead = torch.broadcast_shapes(*(self.values[i].shape for i in indices))
        parts = [
            {
                k: _broadcastable(v.expand(self.values[i].shape), lead)
                for k, v in self.known[i].items()
            }
            if self.known.get(i) is not None
            else None
            for i in indices
        ]
        merged = merge(parts, lead)
        if merged is None:
            return None
        extra = out.dim() - len(lead)
        return {k: v.reshape(*lead, *([1] * extra)).expand(out.shape) for k, v in merged.items()}

    def _gather(self, node: Node) -> Coords | None:
        source, dim, index = node.args[:3]
        if self.known.get(source) is None:
            coords = self.known.get(index)
            return (
                None
                if coords is None
                else {k: v.expand(self.values[index].shape) for k, v in coords.items()}
            )
        if self.known.get(index) is not None:
            return None  # per-selection data gathered at per-selection positions
        return {
            k: torch.gather(v.expand(self.values[source].shape), dim, self.values[index])
            for k, v in self.known[source].items()
        }

    def _take_along_dim(self, node: Node) -> Coords | None:
        """``gather`` with broadcasting (``dim`` given; without it the input is flattened)."""
        source, index = node.args[:2]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim is None:
            return None
        shape = self.values[node].shape
        if self.known.get(source) is None:
            coords = self.known.get(index)
            if coords is None:
                return None
            return {
                k: v.expand(self.values[index].shape).broadcast_to(shape) for k, v in coords.items()
            }
        if self.known.get(index) is not None:
            return None  # per-selection data gathered at per-selection positions
        return {
            k: torch.take_along_dim(v.expand(self.values[source].shape), self.values[index], dim)
            for k, v in self.known[source].items()
        }

    def _contract(self, node: Node) -> Coords | None:
        target = node.target
        if target is aten.einsum.default:
            equation, operands = node.args[0], list(node.args[1])
        else:
            operands = list(node.args[:2])
            ranks = [self.values[o].dim() for o in operands]
            equation = matmul_equation(target, ranks)
            if equation is None:
                return None
        out = self.values[node]
        ins, result = equation.replace(" ", "").split("->")
        specs = expand_ellipsis(ins.split(","), result, [self.values[o].dim() for o in operands])
        if specs is None:
            return None
        in_specs, out_spec = specs
        parts = []
        for operand, spec in zip(operands, in_specs, strict=True):
            coords = self.known.get(operand)
            if coords is None:
                continue
            shape = self.values[operand].shape
            part = {}
            for name, c in coords.items():
                c = c.expand(shape)
                kept_labels = []
                for d, label in reversed(list(enumerate(spec))):
                    if label not in out_spec:
                        first = c.narrow(d, 0, 1)
                        if not bool((c == first.expand(c.shape)).all()):
                            c = None
                            break
                        c = first.squeeze(d)
                    else:
                        kept_labels.insert(0, label)
                if c is None:
                    part = None  # a selection coordinate summed over: pooling, not glue
                    break
                # duplicate labels (a diagonal) are not glue either
                if len(set(kept_labels)) != len(kept_labels):
                    part = None
                    break
                perm = sorted(range(len(kept_labels)), key=lambda i: out_spec.index(kept_labels[i]))
                c = c.permute(perm)
                ordered = [kept_labels[i] for i in perm]
                view = [c.shape[ordered.index(lab)] if lab in ordered else 1 for lab in out_spec]
                part[name] = c.reshape(view).expand(out.shape)
            if part is None:
                return None
            parts.append(part)
        return merge(parts, out.shape)
