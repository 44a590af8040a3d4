"""Numerical parity of every stage against the original model.

``compare(reference, candidate, tolerance)`` compares outputs (max abs / max rel error,
cosine similarity, NaN/Inf counted explicitly) and, per memory layer, the selected slots:
how many (token, head) selections differ and whether each difference was a near-tie.

A difference is a *near-tie* when every slot the candidate picked instead scored within
the tolerance of the reference's k-th (lowest kept) score: the two stages saw the same
ranking up to rounding. Any other flip fails the stage, as does a shape mismatch, a
NaN/Inf, an output outside ``atol + rtol·|ref|``, or comparing nothing at all; in fp32, an
output a near-tie flip moved passes only when the stage, run again with its retrieves
selecting what the model selected, is within the tolerance (AOTInductor orders a sum its
own way and may break an exact tie the other way); a stage that cannot be run so fails.

Half precision (the model's outputs in fp16 or bf16) is judged by what the dtype can
resolve, since no two backends round a half-precision model alike:

- a selection may differ only at a near-tie *at the dtype's resolution*: the swapped
  slots' scores within ``8·eps·scale`` of the reference's k-th score, ``scale`` the row's
  largest score magnitude (``eps``: 2⁻⁷ for bf16, 2⁻¹⁰ for fp16); or, for a slot whose row
  or column one stage kept among its candidates and the other did not, that row's (or
  column's) candidate score within ``8·eps·scale`` of the m-th candidate's, judged on the
  model's own candidate scores. Every flip is counted; any other fails;
- an output passes within the dtype's tolerance of the model. Where near-tie flips moved
  it further (a flip swaps a whole value row's share), in this order (``flips.py``): run
  again with its fused retrieves selecting what the model selected (PyTorch stages and
  AOTInductor), it is within the tolerance; or it selected exactly what the fused program
  it was made from selected, and is within the tolerance of that program's output; or,
  over all the stage's inputs, it is no further from the model's fp32 maths than the
  model itself (``‖stage − ref32‖ ≤ 2·max(‖model − ref32‖, eps·‖ref32‖)``, ``ref32`` the
  same model and inputs in fp32); or, the last resort for a stage that cannot be run with
  the model's selections (a runtime outside PyTorch), its cosine to the model's output is
  at least the dtype's on an input whose flips were all near-ties. A stage that could be
  run with the model's selections is judged by that run and the fp32 distance alone. Each
  says which in its message.

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
from typing import Any, Self

import torch
from torch import Tensor

from .selections import Selection
from .ties import half_near_tie, inputs_diverged


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float
    # half precision: what the dtype resolves, relative to a score's magnitude (None:
    # selections use atol and rtol, as fp32 does: exact up to ties)
    resolution: float | None = None


# roundings a half-precision score may carry, relative to its row's largest: the merge,
# each core's two products, the sum over cores (authors' V2 in bf16 reached 7, measured)
NEAR_TIE_ULPS = 8
# a stage may be this many times further from the fp32 maths than the model itself
FP32_DISTANCE_FACTOR = 2.0
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-4, 1e-3, 0.99999),
    torch.float16: Tolerance(2e-2, 2e-2, 0.999, NEAR_TIE_ULPS * torch.finfo(torch.float16).eps),
    torch.bfloat16: Tolerance(6e-2, 6e-2, 0.998, NEAR_TIE_ULPS * torch.finfo(torch.bfloat16).eps),
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
    # half precision, outside the tolerance: relative L2 distances from the fp32 maths,
    # the model's and the stage's, and their squares (stage, model, fp32 reference)
    model_fp32_distance: float | None = None
    stage_fp32_distance: float | None = None
    fp32_squares: tuple[float, float, float] | None = None


@dataclass
class SelectionComparison:
    layer: str
    rows: int
    differing: int
    near_ties: int
    passed: bool
    message: str
    # half precision: rows whose lookup already ranked other scores (an earlier flip
    # changed its inputs), counted and left to the outputs' verdict
    consequential: int = 0


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

    def fp32_distances(self) -> tuple[float, float] | None:
        """Half precision: the stage's and the model's relative distance from the fp32
        maths, over every output and input; None where none was measured."""
        squares = [c.fp32_squares for c in self.outputs if c.fp32_squares is not None]
        if not squares:
            return None
        ref = sum(q[2] for q in squares)
        return (sum(q[0] for q in squares) / ref) ** 0.5, (sum(q[1] for q in squares) / ref) ** 0.5

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def of(cls, name: str, reason: str | None) -> Self:
        """The report of a stage, not executed where ``reason`` says why it cannot run."""
        return cls(name) if reason is None else cls(name, executed=False, reason=reason)


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
            after = sum(c.consequential for c in s.selections)
            rows = sum(c.rows for c in s.selections)
            flips = f"{near} near-ties" + (f", {after} after an earlier flip" if after else "")
            lines.append(
                f"{'PASSED' if s.passed else 'FAILED'} | {s.stage} | {len(s.outputs)} outputs: "
                f"max_abs={worst_abs:.3g} min_cosine={worst_cos:.8f}{_fp32_note(s)} | "
                f"selections: {differing}/{rows} differ ({flips})"
            )
            for c in s.outputs + s.selections:
                if not c.passed:
                    name = c.name if isinstance(c, OutputComparison) else f"selection {c.layer}"
                    lines.append(f"FAILED | {s.stage} | {name} | {c.message}")
        lines.append(f"parity {self.verdict()}")
        return lines


def _fp32_note(stage: StageReport) -> str:
    distances = stage.fp32_distances()
    if distances is None:
        return ""
    return f" fp32_distance={distances[0]:.3g} (the model's {distances[1]:.3g})"


def compare_outputs(
    name: str,
    reference: Tensor,
    candidate: Tensor,
    tol: Tolerance,
    reference32: Tensor | None = None,
) -> OutputComparison:
    """``candidate`` against ``reference``. In half precision, with ``reference32`` (the
    model in fp32), also its and the model's distance from the fp32 maths: reported, and
    read by :func:`judge_by_fp32_distance` for an output outside the tolerance."""
    result = _compare_outputs(name, reference, candidate, tol)
    if result.nonfinite or reference32 is None or tol.resolution is None:
        return result
    if tuple(reference32.shape) != tuple(reference.shape):
        return result
    ref32 = reference32.detach().double().cpu()
    if not bool(torch.isfinite(ref32).all()):
        return result
    stage_sq = float((candidate.detach().double().cpu() - ref32).pow(2).sum())
    model_sq = float((reference.detach().double().cpu() - ref32).pow(2).sum())
    ref_sq = float(ref32.pow(2).sum()) or 1.0
    result.fp32_squares = (stage_sq, model_sq, ref_sq)
    result.stage_fp32_distance = (stage_sq / ref_sq) ** 0.5
    result.model_fp32_distance = (model_sq / ref_sq) ** 0.5
    return result


def judge_by_fp32_distance(outputs: list[OutputComparison], tol: Tolerance) -> None:
    """Half precision: pass the outputs a near-tie flip moved outside the tolerance when,
    over every input of the stage, the output is no further from the fp32 maths than the
    model: ``‖stage − ref32‖ ≤ 2·max(‖model − ref32‖, eps·‖ref32‖)`` summed over inputs
    (one input alone says little: one token's flip moves it by a value row's share, where
    the model may happen to flip elsewhere)."""
    if tol.resolution is None:
        return
    groups: dict[str, list[OutputComparison]] = {}
    for out in outputs:
        groups.setdefault(out.name.split(" @ ")[0], []).append(out)
    eps = tol.resolution / NEAR_TIE_ULPS
    for group in groups.values():
        failed = [o for o in group if not o.passed]
        if not failed or any(o.fp32_squares is None for o in failed):
            continue
        squares = [o.fp32_squares for o in group if o.fp32_squares is not None]
        stage = (sum(q[0] for q in squares) / sum(q[2] for q in squares)) ** 0.5
        model = (sum(q[1] for q in squares) / sum(q[2] for q in squares)) ** 0.5
        allowed = FP32_DISTANCE_FACTOR * max(model, eps)
        for out in failed:
            if stage > allowed:
                out.message += (
                    f" | fp32 distance over the inputs {stage:.3g} > "
                    f"{FP32_DISTANCE_FACTOR:g}x the model's {model:.3g}"
                )
                continue
            out.passed = True
            out.message = (
                f"{out.message.split(' | ')[0]} | near-tie flips moved it; over the inputs "
                f"no further from the fp32 maths ({stage:.3g}) than the model ({model:.3g})"
            )


def _compare_outputs(
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
    if tol.resolution is not None:
        rows = differs.nonzero().flatten().tolist()
        return sum(
            half_near_tie(reference, candidate, r, tol.resolution)
            for r in rows
            if not inputs_diverged(reference, candidate, r, tol.resolution)
        )
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
    layer: str,
    reference: Selection,
    candidate: Selection,
    tol: Tolerance,
    after_flip: bool = False,
) -> SelectionComparison:
    """``after_flip``: an earlier lookup of the same run flipped a selection (half
    precision), so this one's inputs may differ anywhere it reaches (attention mixes
    tokens): a flip that is no near-tie counts as a consequence, judged by the outputs."""
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
    consequential = 0
    if tol.resolution is not None:
        consequential = sum(
            inputs_diverged(reference, candidate, r, tol.resolution)
            for r in differs.nonzero().flatten().tolist()
        )
        if after_flip:
            consequential = differing - near
    if differing:
        # The stages may order their (token, head) rows differently (a model that keeps
        # heads first, an op that keeps tokens first): match rows as a multiset instead.
        unmatched = _multiset_difference(ref_sorted, cand_sorted)
        if unmatched < differing:
            differing, near, consequential = unmatched, 0, 0
    ok = rows > 0 and differing == near + consequential
    msg = f"{differing}/{rows} selections differ ({near} near-ties"
    msg += f", {consequential} after an earlier flip)" if consequential else ")"
    if not ok:
        msg += " | hint: a flip that is not a near-tie means the stage ranks slots differently"
    return SelectionComparison(layer, rows, differing, near, ok, msg, consequential)
