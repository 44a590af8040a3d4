"""``tabulate``: an index computed from slot ids becomes ``map[h, s]``, checked on every slot.

The evaluated glue here is written directly (a shuffle, a per-head offset) and the table
is compared with the map it must equal; an index expanded over a value dim (the pooling
index of a ``scatter_add``) tabulates the same, and one that varies along that dim is
refused, as it is no function of (head, slot)."""

from __future__ import annotations

import pytest
import torch

from ultramem.passes._lookup.index_maps import tabulate
from ultramem.passes._lookup.region import NotALookup

TOKENS, HEADS, K, SLOTS, DV = 3, 2, 4, 40, 5
SHAPES = [torch.Size((TOKENS, HEADS, K))]


def _coords(expand_over_dv: bool) -> dict[str, torch.Tensor]:
    t = torch.arange(TOKENS).view(-1, 1, 1).expand(TOKENS, HEADS, K)
    h = torch.arange(HEADS).view(1, -1, 1).expand(TOKENS, HEADS, K)
    j = torch.arange(K).view(1, 1, -1).expand(TOKENS, HEADS, K)
    coords = {"t": t, "h": h, "j": j}
    if expand_over_dv:  # as a scatter_add's index [T, H, k, Dv] carries them
        coords = {n: x.unsqueeze(-1).expand(TOKENS, HEADS, K, DV) for n, x in coords.items()}
    return coords


PERMUTATION = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(1))


def _glue(slots: list[torch.Tensor], expand_over_dv: bool) -> torch.Tensor:
    s = slots[0]
    heads = torch.arange(HEADS).view(1, -1, 1)
    index = PERMUTATION[s] + 100 * heads  # a shuffle, then a per-head offset
    if expand_over_dv:
        index = index.unsqueeze(-1).expand(-1, -1, -1, DV).contiguous()  # materialised
    return index


@pytest.mark.parametrize("expand_over_dv", [False, True], ids=["per-selection", "over-dv"])
def test_the_table_is_the_map_the_glue_computes(expand_over_dv: bool) -> None:
    table = tabulate(
        lambda slots: _glue(slots, expand_over_dv),
        _coords(expand_over_dv),
        SHAPES,
        SLOTS,
        "the test's index",
    )
    want = PERMUTATION.view(1, -1) + 100 * torch.arange(HEADS).view(-1, 1)
    assert torch.equal(table.long(), want)


def test_an_index_that_varies_along_the_value_dim_is_refused() -> None:
    def glue(slots: list[torch.Tensor]) -> torch.Tensor:
        return _glue(slots, True) + torch.arange(DV)  # a different row per value element

    with pytest.raises(NotALookup, match="not a function of"):
        tabulate(glue, _coords(True), SHAPES, SLOTS, "the test's index")
