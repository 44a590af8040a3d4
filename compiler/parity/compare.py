"""Numerical parity of every stage against the original model.

``compare(reference, candidate, tolerance)`` compares outputs (max abs / max rel error,
cosine similarity, NaN/Inf counted explicitly) and, per memory layer, the selected slots:
how many (token, head) selections differ and whether each difference was a near-tie.

A difference is a *near-tie* when every slot the candidate picked instead scored within
the tolerance of the reference's k-th (lowest kept) score: the two stages saw the same
ranking up to rounding. Any other flip fails the stage, as does a shape mismatch, a
NaN/Inf, an output outside ``atol + rtol·|ref|``, or comparing nothing at all.

Tolerances per dtype (logits of the whole model, after every memory layer):

=========  ======  ======  ===========
dtype      atol    rtol    min cosine
=========  ======  ======  ===========
float32    1e-4    1e-3    0.99999
float16    2e-2    2e-2    0.999
bfloat16   6e-2    6e-2    0.998
=========  ======  ======  ===========
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .selections import Selection


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-4, 1e-3, 0.99999),
    torch.float16: Tolerance(2e-2, 2e-2, 0.999),
    torch.bfloat16: Tolerance(6e-2, 6e-2, 0.998),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float
    nonfinite: int
    needed_atol: float  # the atol (at the given rtol) that would have passed
    passed: bool
    message: str


@dataclass
class SelectionComparison:
    layer: str
    rows: int
    differing: int
    near_ties: int
    passed: bool
    message: str


@dataclass
class StageReport:
    stage: str
    executed: bool = True
    reason: str = ""
    outputs: list[OutputComparison] = field(default_factory=list)
    selections: list[SelectionComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        """The verdict; None for a stage that could not run here (it has none)."""
        if not self.executed:
            return None
        compared = self.outputs or self.selections
        return bool(compared) and all(c.passed for c in self.outputs + self.selections)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ParityReport:
    stages: list[StageReport]
    inputs: list[list[list[int]]]
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        executed = [s for s in self.stages if s.executed]
        return bool(executed) and all(s.passed for s in executed)

    def verdict(self) -> str:
        """``PASSED``/``FAILED``, saying how many stages did not run: a pass covers only
        the stages that ran."""
        word = "PASSED" if self.passed else "FAILED"
        skipped = [s.stage for s in self.stages if not s.executed]
        if skipped:
            word += (
                f" ({len(skipped)} of {len(self.stages)} stages not executed: {', '.join(skipped)})"
            )
        return word

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "inputs": self.inputs,
            "tolerance": asdict(self.tolerance),
            "stages": [s.to_json() for s in self.stages],
        }

    def summary_lines(self) -> list[str]:
        """One greppable line per stage, plus one per failed comparison."""
        lines = []
        for s in self.stages:
            if not s.executed:
                lines.append(f"SKIPPED | {s.stage} | {s.reason}")
                continue
            if not (s.outputs or s.selections):
                lines.append(f"FAILED | {s.stage} | nothing was compared | hint: check the inputs")
                continue
            worst_abs = max(c.max_abs for c in s.outputs) if s.outputs else 0.0
            worst_cos = min(c.cosine for c in s.outputs) if s.outputs else 1.0
            differing = sum(c.differing for c in s.selections)
            near = sum(c.near_ties for c in s.selections)
            rows = sum(c.rows for c in s.selections)
            lines.append(
                f"{'PASSED' if s.passed else 'FAILED'} | {s.stage} | {len(s.outputs)} outputs: "
                f"max_abs={worst_abs:.3g} min_cosine={worst_cos:.8f} | selections: "
                f"{differing}/{rows} differ ({near} near-ties)"
            )
            for c in s.outputs + s.selections:
                if not c.passed:
                    name = c.name if isinstance(c, OutputComparison) else f"selection {c.layer}"
                    lines.append(f"FAILED | {s.stage} | {name} | {c.message}")
        lines.append(f"parity {self.verdict()}")
        return lines


def compare_outputs(
    name: str, reference: Tensor, candidate: Tensor, tol: Tolerance
) -> OutputComparison:
    if tuple(reference.shape) != tuple(candidate.shape):
        return OutputComparison(
            name,
            list(candidate.shape),
            float("inf"),
            float("inf"),
            0.0,
            0,
            float("inf"),
            False,
            f"shape {tuple(candidate.shape)} != reference {tuple(reference.shape)} | "
            "hint: the stage was built for other shapes",
        )
    ref, cand = reference.detach().double().cpu(), candidate.detach().double().cpu()
    ref_bad, cand_bad = int((~torch.isfinite(ref)).sum()), int((~torch.isfinite(cand)).sum())
    nonfinite = ref_bad + cand_bad
    if nonfinite:
        if ref_bad:
            hint = (
                f"the original model's own output holds {ref_bad} NaN/Inf: NaN or Inf in "
                "its weights or inputs (nothing to compare)"
            )
        elif reference.dtype in (torch.float16, torch.bfloat16) or candidate.dtype in (
            torch.float16,
            torch.bfloat16,
        ):
            hint = "overflow in a low precision?"
        else:
            hint = "the stage computes NaN/Inf where the original does not (a bug: report it)"
        return OutputComparison(
            name,
            list(cand.shape),
            float("nan"),
            float("nan"),
            float("nan"),
            nonfinite,
            float("inf"),
            False,
            f"{nonfinite} NaN/Inf values | hint: {hint}",
        )
    diff = (ref - cand).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / ref.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    needed = float((diff - tol.rtol * ref.abs()).clamp_min(0).max()) if diff.numel() else 0.0
    denom = float(ref.norm() * cand.norm())
    cosine = float((ref * cand).sum()) / denom if denom else 1.0
    ok = bool(diff.numel()) and needed <= tol.atol and cosine >= tol.min_cosine
    msg = (
        f"max_abs={max_abs:.3g} max_rel={max_rel:.3g} cosine={cosine:.8f} needed_atol={needed:.3g}"
    )
    if not ok:
        msg += f" | allowed atol={tol.atol:g} rtol={tol.rtol:g} cosine>={tol.min_cosine}"
        msg += " | hint: see which selections flipped below"
    return OutputComparison(name, list(cand.shape), max_abs, max_rel, cosine, 0, needed, ok, msg)


def _near_ties(reference: Selection, candidate: Selection, differs: Tensor, tol: Tolerance) -> int:
    """Differing rows where only slots at the boundary swapped: every slot the reference
    kept and the candidate dropped, and every slot the candidate kept instead, scores
    within tolerance of the reference's k-th score. A slot far above the boundary that
    one side lacks is a real difference (a wrong slot id, a wrong ranking), not a tie."""
    near = 0
    for r in differs.nonzero().flatten().tolist():
        kth = float(reference.values[r].min())
        limit = tol.atol + tol.rtol * abs(kth)
        dropped = ~torch.isin(reference.slots[r], candidate.slots[r])
        picked_instead = ~torch.isin(candidate.slots[r], reference.slots[r])
        swapped = torch.cat(
            [reference.values[r][dropped].float(), candidate.values[r][picked_instead].float()]
        )
        if swapped.numel() and bool(((swapped - kth).abs() <= limit).all()):
            near += 1
    return near


def _multiset_difference(a: Tensor, b: Tensor) -> int:
    """Rows of ``a`` (each sorted) that have no equal row left in ``b``."""
    counts: dict[tuple[int, ...], int] = {}
    for row in b.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    missing = 0
    for row in a.tolist():
        key = tuple(row)
        if counts.get(key, 0):
            counts[key] -= 1
        else:
            missing += 1
    return missing


def compare_selections(
    layer: str, reference: Selection, candidate: Selection, tol: Tolerance
) -> SelectionComparison:
    if reference.slots.shape != candidate.slots.shape:
        return SelectionComparison(
            layer,
            0,
            0,
            0,
            False,
            f"selection shape {tuple(candidate.slots.shape)} != {tuple(reference.slots.shape)}",
        )
    ref_sorted = reference.slots.sort(-1).values
    cand_sorted = candidate.slots.sort(-1).values
    differs = (ref_sorted != cand_sorted).any(-1)
    rows = int(differs.numel())
    differing = int(differs.sum())
    near = _near_ties(reference, candidate, differs, tol)
    if differing:
        # The stages may order their (token, head) rows differently (a model that keeps
        # heads first, an op that keeps tokens first): match rows as a multiset instead.
        unmatched = _multiset_difference(ref_sorted, cand_sorted)
        if unmatched < differing:
            differing, near = unmatched, 0
    ok = rows > 0 and differing == near
    msg = f"{differing}/{rows} selections differ ({near} near-ties)"
    if not ok:
        msg += " | hint: a flip that is not a near-tie means the stage ranks slots differently"
    return SelectionComparison(layer, rows, differing, near, ok, msg)
