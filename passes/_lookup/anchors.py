"""What a memory lookup is, found by what the graph computes: the one definition.

A lookup is anchored at a *final* top-k whose input depends on the indices or values of
*candidate* top-ks and of no nearer top-k, and whose ranked axis holds one entry per pair
of candidates (the grid):

- two candidate top-ks (rows and columns), ranked axis m_row · m_col long (UltraMem, PKM);
- or one candidate top-k over both sides at once, its input holding the two sides along a
  dim of size 2 (``[..., 2, n]``, then ``chunk``/``unbind``), ranked axis m² long
  (product-key-memory, PEER, Meta's memory+).

- or no candidate top-k at all, the final top-k ranking the whole n × n grid of two score
  vectors, ``(rows[..., :, None] + cols[..., None, :]).reshape(..., n * n)`` (Memory+
  fine-tuning code scores every slot): an *exhaustive* lookup, a product-key lookup whose
  candidates are all n keys of each side (m = n).

A top-k with no candidate top-k behind it and no outer sum of two sides before it (an MoE
router), or whose ranked axis is not a grid of its candidates (a top-k over the grid's
diagonal), anchors no lookup. Everything else about a lookup (scores, tables, pooling) is
bound and proven elsewhere.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .._graph import ancestors, graph_order, same_size

TOPK = torch.ops.aten.topk.default


@dataclass(frozen=True)
class LookupAnchors:
    """A lookup's top-ks: ``final`` and its candidates, in graph order."""

    final: Node
    candidates: tuple[Node, ...]  # (rows, columns), (both sides,) for a joint top-k, or ()
    side_dim: int | None = None  # joint top-k: the input dim of size 2 holding the sides
    grid: ExhaustiveGrid | None = None  # no candidate top-k: the outer sum it ranks

    @property
    def name(self) -> str:
        return self.final.name

    @property
    def joint(self) -> bool:
        return len(self.candidates) == 1

    @property
    def exhaustive(self) -> bool:
        return self.grid is not None


@dataclass(frozen=True)
class ExhaustiveGrid:
    """The n × n grid an exhaustive lookup's final top-k ranks: ``rows`` [..., n, 1] plus
    ``cols`` [..., 1, n] (broadcast), flattened rows outer by ``flatten`` to [..., n²]."""

    rows: Node
    cols: Node
    flatten: Node
    n: int


_FLATTENS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)
_UNSQUEEZED_ADD = torch.ops.aten.add.Tensor


def exhaustive_grid(final: Node) -> ExhaustiveGrid | None:
    """The outer sum of two score vectors ``final`` ranks along its last dim, if it does."""
    flatten = final.args[0]
    if not isinstance(flatten, Node) or flatten.target not in _FLATTENS:
        return None
    grid = flatten.args[0]
    if not isinstance(grid, Node) or grid.target is not _UNSQUEEZED_ADD or len(grid.args) != 2:
        return None
    rows, cols = grid.args
    if not all(isinstance(x, Node) and "val" in x.meta for x in (rows, cols, grid, flatten)):
        return None
    if grid.kwargs.get("alpha", 1) != 1:
        return None
    row_shape, col_shape = rows.meta["val"].shape, cols.meta["val"].shape
    out, flat = grid.meta["val"].shape, flatten.meta["val"].shape
    if min(len(row_shape), len(col_shape)) < 2 or len(out) < 2:
        return None
    if type(row_shape[-1]) is not int or type(col_shape[-2]) is not int:
        return None
    if row_shape[-1] != 1 or col_shape[-2] != 1:
        rows, cols = cols, rows  # written columns first: ``c[..., None, :] + r[..., :, None]``
        row_shape, col_shape = col_shape, row_shape
    n = row_shape[-2]
    if row_shape[-1] != 1 or col_shape[-2] != 1 or type(n) is not int or col_shape[-1] != n:
        return None
    # the grid flattened whole into the ranked last dim, everything before it kept
    if topk_dim(final) != len(flat) - 1 or len(flat) != len(out) - 1 or flat[-1] != n * n:
        return None
    if not all(same_size(a, b) for a, b in zip(flat[:-1], out[:-2], strict=True)):
        return None
    # each side holds every leading dim itself (no side broadcast along a batch or head)
    for shape in (row_shape, col_shape):
        if len(shape) != len(out) or not all(map(same_size, shape[:-2], out[:-2])):
            return None
    return ExhaustiveGrid(rows, cols, flatten, int(n))


def topk_dim(node: Node) -> int:
    """The axis a top-k ranks along, as a non-negative index."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    return int(dim) % node.args[0].meta["val"].dim()


def topk_count(node: Node) -> int:
    return int(node.args[1])


def topk_output(node: Node, index: int) -> Node | None:
    """The ``getitem`` taking a top-k's values (0) or indices (1), if any."""
    return next(
        (u for u in node.users if u.target is operator.getitem and u.args[1] == index), None
    )


def _ranked_size(node: Node) -> object:
    return node.args[0].meta["val"].shape[topk_dim(node)]


_SPLITS = {  # op -> (position of its dim argument, its default)
    torch.ops.aten.unbind.int: (1, 0),
    torch.ops.aten.chunk.default: (2, 0),
    torch.ops.aten.split.Tensor: (2, 0),
    torch.ops.aten.split_with_sizes.default: (2, 0),
    torch.ops.aten.select.int: (1, None),
    torch.ops.aten.slice.Tensor: (1, 0),
}


def _side_dim(candidate: Node) -> int | None:
    """The dim of size 2 a joint top-k's input holds its two sides in: the one its outputs
    are split along (``unbind``, ``chunk``, ``select``...), else the only such dim."""
    shape = candidate.args[0].meta["val"].shape
    # a static 2 only: a symbolic batch whose example was 2 is no pair of sides (an MoE
    # router's [batch, experts] with experts = k², as OLMoE's 64 experts, top 8, would
    # otherwise read as a joint lookup over the previous layer's router)
    sizes2 = [
        d for d, s in enumerate(shape) if type(s) is int and s == 2 and d != topk_dim(candidate)
    ]
    users = [u for out in candidate.users for u in out.users]
    while users:
        user = users.pop(0)
        if user.target not in _SPLITS:
            continue
        pos, default = _SPLITS[user.target]
        dim = user.args[pos] if len(user.args) > pos else user.kwargs.get("dim", default)
        if dim is not None and int(dim) % len(shape) in sizes2:
            return int(dim) % len(shape)
        if user.target is torch.ops.aten.slice.Tensor:  # ``x[:, :, 0]``: a full slice first
            users += list(user.users)
    return sizes2[0] if len(sizes2) == 1 else None


def _with_nearest_topks(graph: Graph) -> list[tuple[Node, list[Node]]]:
    """Each top-k with the nearest top-ks behind it (in its ancestry, feeding no other
    top-k of it), in graph order."""
    order = graph_order(graph)
    topks = [n for n in graph.nodes if n.target is TOPK]
    out = []
    for final in topks:
        behind = ancestors([final])
        inner = [t for t in topks if t in behind]
        nearest = [t for t in inner if not any(t in ancestors([o]) for o in inner if o is not t)]
        out.append((final, sorted(nearest, key=order.__getitem__)))
    return out


def merged_grids(graph: Graph) -> list[tuple[Node, int]]:
    """Top-ks that rank the candidate grids of several selections together (each grid's
    two candidate top-ks, the grids concatenated: a top-k across heads or memories), with
    how many grids: no lookup the fused op expresses, which selects per head."""
    out = []
    for final, nearest in _with_nearest_topks(graph):
        if len(nearest) < 4 or len(nearest) % 2:
            continue
        pairs = list(zip(nearest[::2], nearest[1::2], strict=True))
        if _ranked_size(final) == sum(topk_count(a) * topk_count(b) for a, b in pairs):
            out.append((final, len(pairs)))
    return out


def find_lookups(graph: Graph) -> list[LookupAnchors]:
    """Every lookup's anchors, in graph order."""
    out = []
    for final, nearest in _with_nearest_topks(graph):
        grid = _ranked_size(final)
        if not nearest:
            exhaustive = exhaustive_grid(final)
            if exhaustive is not None:
                out.append(LookupAnchors(final, (), grid=exhaustive))
        elif len(nearest) == 2:
            if grid == topk_count(nearest[0]) * topk_count(nearest[1]):
                out.append(LookupAnchors(final, (nearest[0], nearest[1])))
        elif len(nearest) == 1:
            side = _side_dim(nearest[0])
            if side is not None and grid == topk_count(nearest[0]) ** 2:
                out.append(LookupAnchors(final, (nearest[0],), side))
    return out
