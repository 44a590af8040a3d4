"""What a memory lookup is, in one place: shared by the fusion pass, ``inspect`` and parity.

A lookup is anchored at a *final* top-k over the grid of two candidate top-ks (rows and
columns), or of one candidate top-k over both sides at once (``_lookup/anchors.py``). An
MoE router's top-k, or a top-k over anything but the candidates' grid, anchors none.
"""

from __future__ import annotations

from ._lookup.anchors import LookupAnchors, find_lookups

__all__ = ["LookupAnchors", "find_lookups"]
