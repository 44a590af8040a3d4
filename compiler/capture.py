"""Capture a model with ``torch.export`` for inference, batch and tokens dynamic.

Every input tensor of rank >= 2 gets dim 0 as ``batch`` and dim 1 as ``tokens``. When the
model's code pins one of them (a reshape to a constant, a guard on a size), the named
dimension is refused by ``torch.export``; capture then retries with ``Dim.AUTO`` to learn
which dimensions the code leaves free, and captures again with those named (from 1) and
the pinned ones static at the user's own example sizes; then static shapes. It records
which dimension fell back and why. Every capture must run the user's example as given
(a batch-1 example is widened to 2 for tracing, and a fallback must not keep the 2).
Parity and engines use only the shapes the capture admits.

A program whose inputs are not all (batch, tokens, ...) tensors (a decoder with its KV
cache) names its axes itself (``axes``): those are captured as named, nothing else, and
its own ``inputs`` (real activations, such as a cache a prompt filled) are what
parity runs on; ``input_names``/``output_names`` are what exporters call its tensors.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.export import Dim, ExportedProgram

from . import first_line
from .inputs.errors import CaptureError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_TOKENS = 4096


@dataclass
class DynamicAxis:
    """One named axis of one input and the range the capture admits (None = static)."""

    input_index: int
    dim: int
    name: str
    min: int | None
    max: int | None
    mode: str  # "named", "auto" or "static"

    @property
    def dynamic(self) -> bool:
        return self.mode != "static"


@dataclass
class CaptureResult:
    program: ExportedProgram
    axes: list[DynamicAxis]
    notes: list[str] = field(default_factory=list)
    inputs: list[tuple[Any, ...]] | None = None  # parity's inputs, when the model gives them
    input_names: list[str] | None = None  # what exporters name its tensors (else torch's)
    output_names: list[str] | None = None
    strict: bool = False  # captured by dynamo tracing: a re-capture must be allowed it too

    def to_json(self) -> dict[str, Any]:
        return {
            "axes": [vars(a) for a in self.axes],
            "notes": self.notes,
        }

    def axis(self, input_index: int, name: str) -> DynamicAxis | None:
        for a in self.axes:
            if a.input_index == input_index and a.name == name:
                return a
        return None


def _dims_for(
    example_inputs: tuple[Any, ...], max_batch: int, max_tokens: int, mode: str
) -> tuple[tuple[dict[int, Any] | None, ...], list[DynamicAxis]]:
    specs: list[dict[int, Any] | None] = []
    axes: list[DynamicAxis] = []
    batch = Dim("batch", min=1, max=max_batch)
    tokens = Dim("tokens", min=1, max=max_tokens)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            specs.append(None)
            continue
        spec: dict[int, Any] = {}
        for dim, name, named, high in (
            (0, "batch", batch, max_batch),
            (1, "tokens", tokens, max_tokens),
        ):
            if mode == "named":
                spec[dim] = named
                axes.append(DynamicAxis(i, dim, name, 1, high, mode))
            elif mode == "auto":
                spec[dim] = Dim.AUTO
                axes.append(DynamicAxis(i, dim, name, None, None, mode))
            else:
                axes.append(DynamicAxis(i, dim, name, x.shape[dim], x.shape[dim], mode))
        specs.append(spec if mode != "static" else None)
    return tuple(specs), axes


def _widened(
    example_inputs: tuple[Any, ...], axes: list[DynamicAxis] | None = None
) -> tuple[Any, ...]:
    """Size-1 batch and tokens repeated to 2, so that torch.export does not specialise
    them; only the dynamic ones among ``axes`` when given (a static axis keeps the user's)."""
    free = None if axes is None else {(a.input_index, a.dim) for a in axes if a.dynamic}
    out = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            repeats = [
                2 if x.shape[d] == 1 and (free is None or (i, d) in free) else 1 for d in (0, 1)
            ]
            x = x.repeat(*repeats, *[1] * (x.dim() - 2))
        out.append(x)
    return tuple(out)


def _export(
    model: torch.nn.Module, args: tuple[Any, ...], dynamic_shapes: Any, strict: bool = False
) -> ExportedProgram:
    # Inference capture: research code writes into preallocated buffers with out=, which
    # autograd refuses, so no grad mode at all.
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=strict)


# Non-strict tracing runs the model's Python as it is, so ``bs = len(x)`` (XLM's and
# lingua's habit) turns a dynamic size into a constant; strict tracing (dynamo) keeps it
# symbolic. Non-strict first: it traces more code; strict where it pinned a dim.
ATTEMPTS = (("named", False), ("named", True), ("auto", False), ("static", False))
STRICT_NOTE = (
    "captured with torch.export's strict (dynamo) tracing: the model's Python pins a size "
    "when run as it is (len(x) of a dynamic dim, say)"
)


@dataclass(frozen=True)
class ProgramSpec:
    """A program's own description of its inputs (see the module's docstring)."""

    axes: list[DynamicAxis]
    inputs: list[tuple[Any, ...]]
    input_names: list[str]
    output_names: list[str]


def capture(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    dynamic: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    spec: ProgramSpec | None = None,
) -> CaptureResult:
    # the module of an exported program refuses eval(): it is an inference graph already
    with contextlib.suppress(NotImplementedError):
        model.eval()
    if spec is not None:
        return _capture_specified(model, example_inputs, spec)
    notes: list[str] = []
    attempts = ATTEMPTS if dynamic else (("static", False),)
    last_error: Exception | None = None
    # torch.export specialises any dimension whose example size is 0 or 1, so a batch-1
    # or one-token example would pin that axis: capture with such axes widened to 2.
    capture_inputs = _widened(example_inputs) if dynamic else example_inputs
    for mode, strict in attempts:
        inputs = example_inputs if mode == "static" else capture_inputs
        specs, axes = _dims_for(inputs, max_batch, max_tokens, mode)
        how = f"{mode} batch/tokens dims" + (" (strict tracing)" if strict else "")
        try:
            program = _export(model, inputs, specs, strict)
        except Exception as exc:  # torch.export raises several types for refused dims
            reason = first_line(exc) or type(exc).__name__
            notes.append(f"capture with {how} refused: {reason}")
            log.info("capture with %s refused: %s", how, reason)
            last_error = exc
            continue
        if mode == "auto":
            found = _resolve_auto_axes(program, inputs, axes)
            mixed = _capture_mixed(model, example_inputs, found, max_batch, max_tokens, notes)
            if mixed is not None:
                return mixed
            axes = found
        captured = CaptureResult(program, axes, strict=strict)
        rejected = _rejected_size(program, example_inputs, captured)
        if rejected is not None:
            notes.append(f"capture with {how} admits {rejected}: falling back")
            log.info("capture with %s: %s", how, rejected)
            continue
        if strict:
            notes.append(STRICT_NOTE)
        notes.extend(_fallback_notes(axes))
        captured.notes = notes
        return captured
    reason = first_line(last_error)
    log.info("torch.export's last refusal in full", exc_info=last_error)
    raise CaptureError(
        f"torch.export cannot capture the model: {type(last_error).__name__}: {reason[:300]} "
        "(run with -v for torch's full report)"
    ) from last_error


def _fallback_notes(axes: list[DynamicAxis]) -> list[str]:
    return [
        f"input {a.input_index} dim {a.dim} ({a.name}) captured as {a.mode}"
        + (f" [{a.min}, {a.max}]" if a.min is not None else "")
        for a in axes
        if a.mode != "named"
    ]


def _capture_mixed(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    found: list[DynamicAxis],
    max_batch: int,
    max_tokens: int,
    notes: list[str],
) -> CaptureResult | None:
    """Named dims (from 1) where ``Dim.AUTO`` found the code leaves a dimension free, the
    user's own example size where it pinned one. AUTO's own result is not kept as it is:
    its ranges start at 2 (0/1 specialisation) and a dimension it pinned is pinned at the
    widened example's size, which the user's batch-1 example then fails."""
    if not any(a.dynamic for a in found):
        return None
    axes = []
    for a in found:
        x = example_inputs[a.input_index]
        if a.dynamic:
            high = a.max if a.max is not None else (max_batch if a.name == "batch" else max_tokens)
            axes.append(DynamicAxis(a.input_index, a.dim, a.name, 1, high, "named"))
        else:
            size = x.shape[a.dim]
            axes.append(DynamicAxis(a.input_index, a.dim, a.name, size, size, "static"))
    inputs = _widened(example_inputs, axes)
    for strict in (False, True):
        try:
            program = _export(model, inputs, _specs_from_axes(inputs, axes), strict)
        except Exception as exc:  # torch.export raises several types for refused dims
            log.info("capture with AUTO's free dims named refused: %s", first_line(exc))
            continue
        captured = CaptureResult(program, axes, strict=strict)
        rejected = _rejected_size(program, example_inputs, captured)
        if rejected is not None:
            log.info("capture with AUTO's free dims named admits %s", rejected)
            continue
        captured.notes = [*notes, *([STRICT_NOTE] if strict else []), *_fallback_notes(axes)]
        return captured
    return None


def _capture_specified(
    model: torch.nn.Module, example_inputs: tuple[Any, ...], spec: ProgramSpec
) -> CaptureResult:
    """The program's own axes, as named dims only: non-strict, else strict tracing."""
    dims = _specs_from_axes(example_inputs, spec.axes)
    problem = ""
    for strict in (False, True):
        try:
            program = _export(model, example_inputs, dims, strict)
        except Exception as exc:  # torch.export raises many types
            log.info("torch.export's refusal in full", exc_info=exc)
            problem = f"torch.export cannot capture it: {type(exc).__name__}: {first_line(exc)}"
            continue
        notes = [STRICT_NOTE] if strict else []
        captured = CaptureResult(
            program,
            list(spec.axes),
            notes,
            list(spec.inputs),
            spec.input_names,
            spec.output_names,
            strict,
        )
        rejected = _rejected_size(program, example_inputs, captured)
        if rejected is None:
            return captured
        problem = f"the capture admits {rejected}"
    names = ", ".join(sorted({a.name for a in spec.axes}))
    raise CaptureError(
        f"the model cannot be captured with dynamic {names}: {problem[:300]} "
        "(run with -v for torch's full report)"
    )


def _specs_from_axes(
    args: tuple[Any, ...], axes: list[DynamicAxis]
) -> tuple[dict[int, Any] | None, ...]:
    """torch.export's dynamic shapes for ``axes``: one ``Dim`` per axis name, shared by
    every input that has it (so batch is one symbol), AUTO where the capture chose."""
    dims: dict[str, Any] = {}
    specs: list[dict[int, Any] | None] = []
    for i, x in enumerate(args):
        spec: dict[int, Any] = {}
        for a in axes:
            if a.input_index != i or a.mode == "static":
                continue
            if a.mode == "auto":
                spec[a.dim] = Dim.AUTO
            else:
                spec[a.dim] = dims.setdefault(a.name, Dim(a.name, min=a.min or 1, max=a.max))
        specs.append(spec or None if isinstance(x, torch.Tensor) else None)
    return tuple(specs)


def _rejected_size(
    program: ExportedProgram, example: tuple[Any, ...], captured: CaptureResult
) -> str | None:
    """A size the capture claims to admit but its program refuses (the model's code pins
    it with a hidden guard: ``len(x)`` baked into a view), or None when it runs them all.
    The user's example is among them: the capture traced a widened copy of it."""
    module = program.module()
    for inputs in parity_inputs(example, captured):
        try:
            with torch.no_grad():
                module(*inputs)
        except Exception as exc:  # guards raise several types
            shape = "x".join(str(s) for s in next(x for x in inputs if isinstance(x, Tensor)).shape)
            reason = first_line(exc) or type(exc).__name__
            return f"inputs of shape {shape} that its program refuses ({reason})"
    return None


def _resolve_auto_axes(
    program: ExportedProgram, example_inputs: tuple[Any, ...], axes: list[DynamicAxis]
) -> list[DynamicAxis]:
    """Read back which AUTO dims stayed symbolic, and their ranges."""
    placeholders = [
        n
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in _user_input_names(program)
    ]
    resolved = []
    for a in axes:
        val = (
            placeholders[a.input_index].meta.get("val")
            if a.input_index < len(placeholders)
            else None
        )
        size = val.shape[a.dim] if val is not None else example_inputs[a.input_index].shape[a.dim]
        if isinstance(size, torch.SymInt) and size.node.expr.is_number:
            size = int(size.node.expr)  # AUTO specialised it to a constant
        if isinstance(size, torch.SymInt):
            rng = program.range_constraints.get(size.node.expr)
            lower = _finite_int(rng.lower) if rng is not None else None
            upper = _finite_int(rng.upper) if rng is not None else None
            resolved.append(DynamicAxis(a.input_index, a.dim, a.name, lower, upper, "auto"))
        else:
            resolved.append(
                DynamicAxis(a.input_index, a.dim, a.name, int(size), int(size), "static")
            )
    return resolved


def _finite_int(bound: Any) -> int | None:
    try:  # sympy's (and torch's) infinities refuse int()
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _user_input_names(program: ExportedProgram) -> set[str]:
    return set(program.graph_signature.user_inputs)


def recapture(module: torch.nn.Module, original: CaptureResult) -> ExportedProgram:
    """Capture a rewritten module with the same dynamic axes as ``original``."""
    example = original.program.example_inputs
    if example is None:
        raise ValueError("the original program holds no example inputs to re-capture with")
    args, _ = example
    dims = _specs_from_axes(tuple(args), original.axes)
    # the first capture's tracing first; the other when it refuses (a rewritten graph can
    # trace where the model's Python could not, and the other way round)
    try:
        return _export(module, tuple(args), dims, original.strict)
    except Exception as exc:  # torch.export raises several types
        log.info("re-capture (strict=%s) refused: %s", original.strict, first_line(exc))
    return _export(module, tuple(args), dims, not original.strict)


def parity_inputs(
    example_inputs: tuple[Any, ...], capture: CaptureResult, seed: int = 0
) -> list[tuple[Any, ...]]:
    """The example, plus batch/token sizes other than the example's, within the captured
    range; or the program's own inputs, when it gave them."""
    if capture.inputs:
        return list(capture.inputs)
    gen = torch.Generator().manual_seed(seed)
    first = next((x for x in example_inputs if isinstance(x, Tensor) and x.dim() >= 2), None)
    if first is None:
        return [example_inputs]
    sizes = {(first.shape[0], first.shape[1])}
    batch_axis, token_axis = capture.axis(0, "batch"), capture.axis(0, "tokens")
    for b, t in ((1, 1), (1, 7), (3, 13), (1, 2 * first.shape[1] + 3)):
        b_ok = batch_axis is not None and batch_axis.dynamic and _within(b, batch_axis)
        t_ok = token_axis is not None and token_axis.dynamic and _within(t, token_axis)
        sizes.add((b if b_ok else first.shape[0], t if t_ok else first.shape[1]))
    example_size = (first.shape[0], first.shape[1])
    others = sorted(sizes - {example_size})
    return [example_inputs, *(like_inputs(example_inputs, b, t, gen) for b, t in others)]


def _within(size: int, axis: Any) -> bool:
    return (axis.min is None or size >= axis.min) and (axis.max is None or size <= axis.max)


def like_inputs(
    example: tuple[Any, ...], batch: int, tokens: int, gen: torch.Generator
) -> tuple[Any, ...]:
    out = []
    for x in example:
        if not isinstance(x, Tensor) or x.dim() < 2:
            out.append(x)
            continue
        shape = (batch, tokens, *x.shape[2:])
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(x.dtype))
        else:
            low, high = int(x.min()), int(x.max()) + 1
            out.append(torch.randint(low, high, shape, generator=gen, dtype=x.dtype))
    return tuple(out)
