"""Near-ties of a half-precision selection: which flips the dtype cannot decide.

A row's flip is a near-tie when the swapped slots' scores are within ``resolution`` (a
multiple of the dtype's eps) of the row's largest score from the reference's k-th, or
come from a row or column that was itself a tie at the candidate stage (judged on the
reference's own candidate scores). A row whose stages ranked other numbers (an earlier
lookup's flip reached its inputs) is no tie to judge: its flips are consequences.
"""

from __future__ import annotations

import torch

from .selections import Selection


def half_near_tie(reference: Selection, candidate: Selection, r: int, resolution: float) -> bool:
    """Whether row ``r``'s flips are near-ties at a half-precision ``resolution`` (module
    docstring). A slot the reference kept and the candidate dropped scores within the
    resolution of the reference's k-th, or its row or column was a boundary candidate the
    candidate may have dropped; a slot the candidate kept instead scores within it too,
    or comes from a boundary candidate the reference may have lacked, or scores below it
    in place of such a dropped one (the candidate had fewer slots to choose from)."""
    ref_values = reference.values[r].float()
    kth = float(ref_values.min())
    limit = resolution * float(ref_values.abs().max())
    ref_slots, cand_slots = reference.slots[r], candidate.slots[r]
    dropped = ~torch.isin(ref_slots, cand_slots)
    picked = ~torch.isin(cand_slots, ref_slots)
    if not bool(dropped.any() or picked.any()):
        return False

    def boundary(slot: int) -> bool:
        return boundary_candidate(reference, r, slot, resolution)

    lost_candidates = 0
    for slot, value in zip(ref_slots[dropped].tolist(), ref_values[dropped].tolist(), strict=True):
        if boundary(slot):
            lost_candidates += 1
        elif abs(value - kth) > limit:
            return False
    cand_values = candidate.values[r].float()
    for slot, value in zip(cand_slots[picked].tolist(), cand_values[picked].tolist(), strict=True):
        if abs(value - kth) <= limit or boundary(slot):
            continue
        if value < kth and lost_candidates:
            lost_candidates -= 1
            continue
        return False
    return True


def inputs_diverged(reference: Selection, candidate: Selection, r: int, resolution: float) -> bool:
    """Whether the stages ranked other numbers in row ``r``: the slots both kept, or the
    candidates' scores, differ by more than the dtype resolves (an earlier lookup's flip
    reached this one's inputs). Its flips are consequences to count, not ties to judge;
    the outputs' verdict covers them."""
    ref_values, cand_values = reference.values[r].float(), candidate.values[r].float()
    common = torch.isin(reference.slots[r], candidate.slots[r])
    if bool(common.any()):
        # the same slots scored differently beyond the resolution: other numbers ranked
        order = torch.argsort(candidate.slots[r])
        where = torch.searchsorted(candidate.slots[r][order], reference.slots[r][common])
        theirs = cand_values[order][where]
        limit = resolution * float(ref_values.abs().max())
        if float((ref_values[common] - theirs).abs().max()) > limit:
            return True
    pairs = (
        (reference.row_ranked, candidate.row_ranked),
        (reference.col_ranked, candidate.col_ranked),
    )
    for ref, cand in pairs:
        if ref is None or cand is None or ref.shape != cand.shape:
            return False
        limit = 2 * resolution * float(ref[r].abs().max())
        if float((ref[r] - cand[r]).abs().max()) > limit:
            return True
    return False


def boundary_candidate(reference: Selection, r: int, slot: int, resolution: float) -> bool:
    """Whether the row or column of ``slot`` scored, in the reference's own candidate
    top-k, within ``resolution`` of its m-th kept candidate: a stage may keep or drop it."""
    if reference.row_ranked is None or reference.col_ranked is None or not reference.n:
        return False
    for ranked, index in (
        (reference.row_ranked[r], slot // reference.n),
        (reference.col_ranked[r], slot % reference.n),
    ):
        mth = float(ranked.topk(reference.topm).values.min())
        if abs(float(ranked[index]) - mth) <= resolution * float(ranked.abs().max()):
            return True
    return False
