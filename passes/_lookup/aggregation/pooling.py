"""Rules ``pooling`` and ``pooled_layout``: how the weighted rows are pooled, and into what.

``pooling``: a scatter in the pooling region pools into groups computed from the slot ids
(its index tabulated like a row map) by adding or overwriting (the last write wins); no
scatter is a sum. ``pooled_layout``: the pooled node's dims as tokens, head groups,
scatter groups and values; each gives the op's group map (head · scatter groups + scatter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .binding import GroupSizes

POOLING_RULE = "pooling"
LAYOUT_RULE = "pooled_layout"
aten = torch.ops.aten
SCATTERS = {  # op -> accumulates (add) or overwrites (scatter: the last write wins)
    aten.scatter_add.default: True,
    aten.scatter_add_.default: True,
    aten.index_add.default: True,
    aten.index_add_.default: True,
    aten.scatter.src: False,
    aten.scatter_.src: False,
    aten.scatter.value: False,
    aten.scatter_.value: False,
}


def group_map(
    heads: int, slot_count: int, groups: GroupSizes, scatter_map: Tensor | None
) -> Tensor | None:
    """The op's group of each (head, slot), None when everything pools into one group."""
    if groups.heads == 1 and groups.scatter == 1:
        return None
    scatter = (
        scatter_map.long()
        if scatter_map is not None and groups.scatter > 1
        else torch.zeros(1, slot_count, dtype=torch.int64)
    )
    head = (
        torch.arange(heads).view(-1, 1)
        if groups.heads > 1
        else torch.zeros(1, 1, dtype=torch.int64)
    )
    out = head * groups.scatter + scatter
    if out.shape[0] == 1 and heads > 1 and groups.heads > 1:
        out = out.expand(heads, -1)
    return out.int().contiguous()
