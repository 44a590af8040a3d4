"""Index maps computed from the model's own integer glue, on every slot id.

Between the fused selection's slot ids and a table read's row (or a pooling index) the
model runs its own integer ops: a global shuffle and ``j mod R`` / ``j div R``, ``j // E``, a
per-row permutation buffer, per-layer offsets into a shared table ``((j mod R) + o) mod
R_all``, head offsets, a per-head table read ``table[h, j // E]``. Whatever they are, the
result depends only on the head and the slot id: ``tabulate`` evaluates the glue on
synthetic slot ids until every (head, slot) pair has been seen at least twice, at two
different positions, and returns the table ``map[h, s]`` — refusing, with the reason, when
an element depends on anything else (its position, the token, an activation).

Memory: H·S entries (S = n² slots), int32 when they fit: 8 MB at paper scale (n = 1024,
H = 2), the size of the authors' own shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .coordinates import Coords
from .region import NotALookup

Evaluate = Callable[[list[Tensor]], Tensor]
"""Synthetic slot ids, one [T, H_i, k] tensor per source -> the index tensor's values."""


def synthetic_slots(
    shapes: Sequence[torch.Size], slot_count: int, start: int, shift: int
) -> list[Tensor]:
    """Slot ids for one round: consecutive ids (from ``start``, plus ``shift``) along each
    token's k selections and the tokens, the same for every head."""
    out = []
    for shape in shapes:
        tokens, heads, k = shape
        ids = start + shift + torch.arange(tokens * k).view(tokens, 1, k)
        out.append((ids % slot_count).expand(tokens, heads, k).contiguous())
    return out


def _first_along(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``x`` with each of ``dims`` narrowed to its first element (kept as size 1)."""
    for d in dims:
        x = x.narrow(d, 0, 1)
    return x


def tabulate(
    evaluate: Evaluate,
    coords: Coords,
    shapes: Sequence[torch.Size],
    slot_count: int,
    what: str,
) -> Tensor:
    """``map[h, s]`` such that every element of the evaluated index tensor is ``map[h, s]``
    of its (global head, slot); [1, S] when no head changes it. ``coords`` gives each
    element's (t, h, j); ``shapes`` the sources' slot tensors [T, H_i, k]."""
    missing = [n for n in ("t", "h", "j") if n not in coords]
    if missing:
        raise NotALookup(f"{what} does not follow the selections ({', '.join(missing)} lost)")
    t, h, j = (coords[n] for n in ("t", "h", "j"))
    if bool(((t < 0) | (h < 0) | (j < 0)).any()):
        raise NotALookup(f"{what} holds elements that belong to no selection")
    heads = sum(s[1] for s in shapes)
    tokens, k = shapes[0][0], shapes[0][2]
    per_round = tokens * k
    table = torch.zeros(heads * slot_count, dtype=torch.int64)
    filled = torch.zeros(heads * slot_count, dtype=torch.int32)
    # dims along which no coordinate changes (an index expanded over the value dim, Dv
    # copies of each): one element of each stands for all, once the values are seen to
    # agree along them; the tables below then touch Dv times fewer elements
    shape = coords["t"].shape
    repeated = [
        d
        for d in range(len(shape))
        if shape[d] > 1 and all(x.stride(d) == 0 for x in (t, h, j) if x.dim() == len(shape))
    ]
    t, h, j = (_first_along(x.expand(shape), repeated).reshape(-1) for x in (t, h, j))
    # two covers: every slot is seen at two positions, so a value that depends on its
    # position (not only its slot) is caught
    shifts = (0, slot_count // 2 + 1) if slot_count > 1 else (0,)
    for shift in shifts:
        for start in range(0, slot_count, per_round):
            slots = synthetic_slots(shapes, slot_count, start, shift)
            merged = torch.cat(slots, dim=1)  # [T, H, k]: the global head order
            values = evaluate(slots).expand(shape)
            first = _first_along(values, repeated)
            if repeated and bool((values != first).any()):
                raise NotALookup(f"{what} is not a function of (head, slot)")
            values = first.reshape(-1).long()
            key = h * slot_count + merged[t, h, j]
            seen = filled[key] > 0
            if bool((table[key][seen] != values[seen]).any()):
                raise NotALookup(
                    f"{what} is not a function of (head, slot): one slot gives different "
                    "values at different positions"
                )
            table[key] = values
            filled[key] += 1
            # the same (head, slot) twice in one round must agree too
            if bool((table[key] != values).any()):
                raise NotALookup(f"{what} is not a function of (head, slot)")
    if bool((filled == 0).any()):
        raise NotALookup(f"{what}: some slot ids were never reached")
    table = table.view(heads, slot_count)
    if heads > 1 and bool((table == table[:1]).all()):
        table = table[:1]
    fits = table.numel() == 0 or (int(table.min()) >= -(2**31) and int(table.max()) < 2**31)
    return table.int().contiguous() if fits else table.contiguous()
