"""What a memory lookup is, in one place: shared by the fusion pass, ``inspect`` and parity.

A lookup is anchored at a *final* top-k whose input depends on the indices of two candidate
top-ks (row and column) and on no nearer top-k (``_lookup/region.py``).
"""

from __future__ import annotations

from torch.fx import Graph, Node

from ._lookup.region import final_topks


def lookup_anchors(graph: Graph) -> list[tuple[Node, Node, Node]]:
    """(final, row, column) top-k nodes of every memory lookup, in graph order."""
    return final_topks(graph)
