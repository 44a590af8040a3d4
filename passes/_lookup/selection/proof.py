"""Rule ``output_proof``: a hypothesis is a binding only if the op reproduces every output.

Each selection output must equal some kind of the op's outputs in some layout on the
model's real activations (found there), and the same on random score tensors (kept there),
floats up to rounding and ints exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Node

from ..layouts import Layout, layouts
from ..rules import Failure
from .binding import Output, OutputKind, SelectionBinding, output_value

RULE = "output_proof"
Probe = tuple[list[Tensor], list[Tensor]]  # score tensors, expected outputs


def check(
    binding: SelectionBinding, outputs: list[Node], probes: list[Probe], distinct: list[Node]
) -> float | Failure:
    """Max abs error of the float outputs over the probes if every output is reproduced by
    some (kind, layout), found on the real probe and kept for the others (then stored in
    ``binding.outputs``); else why not."""
    worst = 0.0
    matched: list[Output] = []
    for i, (xs, expected) in enumerate(probes):
        values = dict(zip(distinct, xs, strict=True))
        try:
            with torch.no_grad():
                scores, slots = binding.run(values[binding.rows.node], values[binding.cols.node])
        except (ValueError, RuntimeError, IndexError) as exc:  # shapes the op refuses
            reason = f"ultramem::retrieve refuses these views of the scores: {exc}"
            return Failure.at(RULE, reason, binding.rows.node)
        for j, (node, want) in enumerate(zip(outputs, expected, strict=True)):
            if i == 0:
                found = _match(node, want, scores, slots, binding)
                if found is None:
                    reason = f"no output of ultramem::retrieve equals {node.name} in any layout"
                    return Failure.at(RULE, reason, node)
                matched.append(found)
            out = matched[j]
            got = out.layout.model(
                output_value(out.kind, scores, slots, binding.n), list(want.shape)
            )
            ok, error = close(got, want)
            if not ok:
                reason = f"{node.name} differs from the op's {out.kind} on random scores"
                return Failure.at(RULE, reason, node)
            worst = max(worst, error)
    binding.outputs = matched
    return worst


def _match(
    node: Node, want: Tensor, scores: Tensor, slots: Tensor, b: SelectionBinding
) -> Output | None:
    m = scores.shape[-1]
    if want.dtype.is_floating_point:
        kinds = [
            OutputKind.SCORES,
            OutputKind.RANKING,
            *(OutputKind.core(c) for c in range(m) if m > 1),
        ]
    else:
        kinds = list(OutputKind.INTEGER)
    for kind in kinds:
        layout = match_kind(kind, want, scores, slots, b)
        if layout is not None:
            return Output(node, kind, layout)
    return None


def match_kind(
    kind: str, want: Tensor, scores: Tensor, slots: Tensor, b: SelectionBinding
) -> Layout | None:
    """The layout in which the op's ``kind`` output equals ``want``."""
    sizes = {"h": b.heads, "k": b.topk, "c": scores.shape[-1]}
    named = ("h", "k", "c") if kind == OutputKind.SCORES else ("h", "k")
    value = output_value(kind, scores, slots, b.n)
    for layout in layouts(list(want.shape), named, sizes, optional=("h", "c"), star=True):
        try:
            got = layout.model(value, list(want.shape))
        except RuntimeError:
            continue
        if close(got, want)[0]:
            return layout
    return None


def close(got: Tensor, want: Tensor) -> tuple[bool, float]:
    """Whether ``got`` is ``want`` (ints exactly, floats up to rounding), and the error."""
    if got.shape != want.shape:
        return False, float("inf")
    if not want.dtype.is_floating_point:
        return bool(torch.equal(got.to(want.dtype), want)), 0.0
    got, want = got.float(), want.float()
    ok = bool(torch.allclose(got, want, atol=1e-5, rtol=1e-4))
    return ok, float((got - want).abs().max()) if ok and want.numel() else 0.0
