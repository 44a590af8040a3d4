"""Model tensors seen as the fused ops' canonical tensors, and back: one role per dim.

A ``Layout`` gives every dim of a model tensor a role: ``t`` (a token dim; the canonical
``T`` is the product of the ``t`` dims, in the model's order), a named role (``h`` heads,
``n`` keys, ``r`` rank, ``k`` selections, ``c`` cores, ``side``, ``g``/``e`` groups, ``d``
values: one canonical dim each), or ``*`` (a dim the values do not vary along, an expansion:
read at index 0). The canonical tensor is ``[T, *named]``; a named role the model tensor
lacks is a dim of size 1 there (``expand`` broadcasts it, as a score tensor shared by every
head is read).

Layouts are hypotheses, never accepted on looks: every one is proven by evaluating the
model's own sub-graph against the fused ops (``selection``, ``aggregation``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import Graph, GraphModule, Node

from .._graph import size_of_symbol

TOKEN, STAR = "t", "*"


@dataclass(frozen=True)
class Layout:
    roles: tuple[str, ...]
    named: tuple[str, ...]

    @property
    def token_dims(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == TOKEN]

    def dim_of(self, role: str) -> int | None:
        return self.roles.index(role) if role in self.roles else None

    def _kept(self) -> list[int]:
        """The model dims that survive into the canonical tensor (every role but ``*``)."""
        return [i for i, r in enumerate(self.roles) if r != STAR]

    def _order(self) -> list[int]:
        """Kept dims in canonical order, as positions among the kept dims."""
        kept = [self.roles[i] for i in self._kept()]
        order = [i for i, r in enumerate(kept) if r == TOKEN]
        return order + [kept.index(r) for r in self.named if r in kept]

    def _named_shape(self, shape: Sequence[object]) -> list[int]:
        kept = [self.roles[i] for i in self._kept()]
        sizes = [shape[i] for i in self._kept()]
        return [int(sizes[kept.index(r)]) if r in kept else 1 for r in self.named]  # type: ignore[call-overload]

    def _broadcast(self, sizes: Mapping[str, int] | None) -> list[int] | None:
        """``expand`` sizes for named roles the model tensor lacks (None: nothing to do)."""
        absent = [r for r in self.named if r not in self.roles]
        if not sizes or all(sizes.get(r, 1) == 1 for r in absent):
            return None
        return [-1, *(sizes.get(r, 1) if r in absent else -1 for r in self.named)]

    def _is_canonical(self, shape: Sequence[object]) -> bool:
        """Whether a tensor of ``shape`` in this layout already is [T, *named]."""
        return self.roles == (TOKEN, *self.named) and all(isinstance(s, int) for s in shape[1:])

    def canonical(self, x: Tensor, sizes: Mapping[str, int] | None = None) -> Tensor:
        """``x`` as ``[T, *named]``; ``sizes`` broadcasts named roles ``x`` lacks."""
        y = x[tuple(0 if r == STAR else slice(None) for r in self.roles)]
        y = y.permute(self._order()).reshape(-1, *self._named_shape(x.shape))
        target = self._broadcast(sizes)
        return y.expand(target) if target else y

    def canonical_node(
        self,
        graph: Graph,
        x: Node,
        sizes: Mapping[str, int] | None = None,
        shape: Sequence[object] | None = None,
    ) -> Node:
        """``canonical`` as graph nodes, inserted at the graph's insertion point; ``shape``
        is ``x``'s (default: its fake value's)."""
        aten = torch.ops.aten
        y = x
        for dim in reversed([i for i, r in enumerate(self.roles) if r == STAR]):
            y = graph.call_function(aten.select.int, (y, dim, 0))
        order = self._order()
        if order != sorted(order):
            y = graph.call_function(aten.permute.default, (y, order))
        shape = shape if shape is not None else x.meta["val"].shape
        named = self._named_shape(shape)
        if not self._is_canonical(shape):
            y = graph.call_function(aten.reshape.default, (y, [-1, *named]))
        target = self._broadcast(sizes)
        return graph.call_function(aten.expand.default, (y, target)) if target else y

    def model(self, c: Tensor, shape: Sequence[int]) -> Tensor:
        """The inverse of ``canonical`` for a model tensor of ``shape`` (for probes)."""
        kept, order = self._kept(), self._order()
        y = c.reshape([shape[kept[i]] for i in order]).permute(_inverse(order))
        for dim in [i for i, r in enumerate(self.roles) if r == STAR]:
            y = y.unsqueeze(dim)
        return y.expand(list(shape)) if STAR in self.roles else y

    @property
    def permutes(self) -> bool:
        """Whether the model tensor is a permutation of the canonical one: strided, where
        the model's own tensor may have been contiguous (and read by ``view``)."""
        order = self._order()
        return order != sorted(order)

    def model_node_like(
        self, gm: GraphModule, c: Node, replaced: Node, before: Node, shape: Sequence[object]
    ) -> Node:
        """``model_node`` for a node that replaces ``replaced``, as contiguous as it was:
        the model's code may ``view`` it, which a permuted tensor refuses."""
        y = self.model_node(gm, c, shape, before)
        val = replaced.meta.get("val")
        if self.permutes and isinstance(val, Tensor) and val.is_contiguous():
            y = gm.graph.call_function(
                torch.ops.aten.clone.default, (y,), {"memory_format": torch.contiguous_format}
            )
        return y

    def model_node(self, gm: GraphModule, c: Node, shape: Sequence[object], before: Node) -> Node:
        """``model`` as graph nodes: ``c`` [T, *named] to a tensor of ``shape`` (ints and
        SymInts), inserted at the graph's insertion point. Symbolic token sizes come from
        nodes computed before ``before`` (or a new ``sym_size`` of a model input)."""
        aten, graph = torch.ops.aten, gm.graph
        kept, order = self._kept(), self._order()
        sizes = [shape[kept[i]] for i in order]
        if self._is_canonical(shape):
            y = c
        else:
            if sum(1 for s in sizes if not isinstance(s, int)) == 1:
                args = [s if isinstance(s, int) else -1 for s in sizes]
            else:
                args = [_size_arg(gm, s, before) for s in sizes]
            y = graph.call_function(aten.reshape.default, (c, args))
        if order != sorted(order):
            y = graph.call_function(aten.permute.default, (y, _inverse(order)))
        if STAR in self.roles:
            for dim in [i for i, r in enumerate(self.roles) if r == STAR]:
                y = graph.call_function(aten.unsqueeze.default, (y, dim))
            target = [
                _size_arg(gm, s, before) if r == STAR else -1
                for s, r in zip(shape, self.roles, strict=True)
            ]
            y = graph.call_function(aten.expand.default, (y, target))
        return y


def _inverse(order: Sequence[int]) -> list[int]:
    out = [0] * len(order)
    for i, o in enumerate(order):
        out[o] = i
    return out


def _size_arg(gm: GraphModule, size: object, before: Node) -> object:
    if isinstance(size, int):
        return size
    node = size_of_symbol(gm, size, before)  # type: ignore[arg-type]
    if node is None:
        raise ValueError(f"cannot rebuild the symbolic size {size}")
    return node


def layouts(
    shape: Sequence[object],
    named: Sequence[str],
    sizes: Mapping[str, int],
    *,
    optional: Sequence[str] = (),
    star: bool = False,
) -> Iterator[Layout]:
    """Every assignment of ``named`` roles to dims of matching size (a role in
    ``optional``, or of size 1, may be absent); the other dims are tokens, or, with
    ``star``, also expansions."""
    dims = range(len(shape))

    def choices(role: str) -> list[int | None]:
        fits: list[int | None] = [
            d for d in dims if isinstance(shape[d], int) and shape[d] == sizes[role]
        ]
        if role in optional or sizes[role] == 1:
            fits.append(None)
        return fits

    seen: set[tuple[str, ...]] = set()
    for picks in itertools.product(*(choices(r) for r in named)):
        taken = [p for p in picks if p is not None]
        if len(set(taken)) != len(taken):
            continue
        roles = [TOKEN] * len(shape)
        for role, dim in zip(named, picks, strict=True):
            if dim is not None:
                roles[dim] = role
        rest = [d for d in dims if roles[d] == TOKEN]
        fills = itertools.product((TOKEN, STAR), repeat=len(rest)) if star else [()]
        for fill in fills:
            candidate = list(roles)
            for d, role in zip(rest, fill, strict=False):
                candidate[d] = role
            key = tuple(candidate)
            if key not in seen:
                seen.add(key)
                yield Layout(key, tuple(named))


def token_count(shape: Sequence[object], layout: Layout) -> object:
    return math.prod(shape[d] for d in layout.token_dims)  # type: ignore[misc]
