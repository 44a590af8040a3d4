"""Resolve a MODEL argument into a module and example inputs.

MODEL is one of
- ``builtin:NAME``: a bundled, trained model (``ultramem.models.builtin``);
- ``path/to/program.pt2``: a program saved with ``torch.export.save``, read as data
  (``safe_pt2``: nothing in it is unpickled, evaluated or imported) unless
  ``allow_unsafe_pickle``;
- ``package.module:factory``: a callable returning a module or ``(module, example_inputs)``,
  with optional weights (``.safetensors``, or a ``torch.load(weights_only=True)`` file);
- ``hf:DIR``: a local ``transformers`` checkpoint (``hf.py``; its own modeling code only
  with ``trust_remote_code``).

Weights files are never unpickled with arbitrary code unless ``allow_unsafe_pickle`` is
given: ``torch.load(weights_only=True)`` refuses such a payload before any of it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..models.builtin import LoadedModel, load_builtin
from . import described, first_line
from .hf import HFLoadError, load_hf
from .inputs.errors import ModelLoadError
from .inputs.sources import BUILTIN_PREFIX, HF_PREFIX, preflight_model
from .inputs.sources import DEFAULT_MODEL as DEFAULT_MODEL
from .safe_pt2 import UnsafeArchive, load_untrusted_pt2, pickle_refusal


def load_model(
    spec: str,
    weights: Path | None = None,
    allow_unsafe_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    kind = preflight_model(spec, weights)
    if kind == "builtin":  # a bundled name, checked by the preflight
        return load_builtin(spec.removeprefix(BUILTIN_PREFIX))
    if kind == "hf":
        try:
            loaded = load_hf(
                Path(spec.removeprefix(HF_PREFIX)), trust_remote_code, allow_unsafe_pickle
            )
        except HFLoadError as exc:
            raise ModelLoadError(str(exc)) from None
        return _runs(loaded)
    if kind == "pt2":
        return _load_pt2(Path(spec), allow_unsafe_pickle)
    return _load_factory(spec, weights, allow_unsafe_pickle)


def _load_pt2(path: Path, allow_unsafe_pickle: bool) -> LoadedModel:
    try:
        program = torch.export.load(str(path)) if allow_unsafe_pickle else load_untrusted_pt2(path)
    except UnsafeArchive as exc:
        # an operator is in the program itself: saving it again keeps it
        fix = "" if "operator" in str(exc) else "re-save it with torch.export.save, or "
        raise ModelLoadError(
            f"refused {path}: {exc}; {fix}pass --allow-unsafe-pickle if you trust its "
            "author (loading it runs its code)"
        ) from None
    except Exception as exc:  # torch raises many types for a corrupt archive
        reason = first_line(exc) or type(exc).__name__
        raise ModelLoadError(f"cannot read {path} as a torch.export program: {reason}") from None
    example = program.example_inputs
    if example is None:
        raise ModelLoadError(
            f"{path} holds no example inputs; re-save it with torch.export.save after "
            "torch.export.export(model, example_inputs)"
        )
    args, _ = example
    source = str(path.resolve())
    return _runs(LoadedModel(program.module(), tuple(args), source, {"program": program}))


def _load_factory(spec: str, weights: Path | None, allow_unsafe_pickle: bool) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import {spec!r}: {exc}") from None
    except (Exception, SystemExit) as exc:  # the module's own code failed while importing
        raise ModelLoadError(f"importing {module_name} failed: {described(exc)}") from None
    if not callable(factory):
        raise ModelLoadError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    try:
        built = factory()
    except (Exception, SystemExit) as exc:  # a script's sys.exit() is its failure too
        raise ModelLoadError(f"{spec}() raised {described(exc)}") from None
    model, example = _module_and_example(spec, built)
    notes: list[str] = []
    metadata: dict[str, Any] = {"notes": notes}
    if weights is not None:
        notes += apply_weights(model, load_weights(weights, allow_unsafe_pickle), weights)
        metadata["weights"] = str(weights.resolve())
    model.eval()
    return _runs(LoadedModel(model, example, spec, metadata))


def _module_and_example(spec: str, built: Any) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A factory's result as (module, example inputs): ``(module, example)``, or a module
    whose ``example_inputs`` attribute (or method) gives them."""
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        model, example = built
    elif isinstance(built, torch.nn.Module):
        model, example = built, getattr(built, "example_inputs", None)
        if callable(example):
            try:
                example = example()
            except Exception as exc:
                raise ModelLoadError(f"{spec}: example_inputs() raised {described(exc)}") from None
        if example is None:
            raise ModelLoadError(
                f"{spec} returned a module without example inputs; return "
                "(module, example_inputs), or give the module an example_inputs attribute"
            )
    else:
        raise ModelLoadError(
            f"{spec} returned {type(built).__name__}; it must return an nn.Module "
            "or a (module, example_inputs) tuple"
        )
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not example or not all(isinstance(x, torch.Tensor) for x in example):
        kinds = ", ".join(type(x).__name__ for x in example) or "nothing"
        raise ModelLoadError(f"{spec}'s example inputs must be tensors, got {kinds}")
    return model, example


def _runs(loaded: LoadedModel) -> LoadedModel:
    """The model runs on its own example inputs, or a one-line error says how it fails
    (before any capture: torch.export's report of the same failure is pages long)."""
    try:
        with torch.no_grad():
            loaded.model(*loaded.example_inputs)
    except (Exception, SystemExit) as exc:
        raise ModelLoadError(
            f"{loaded.source}: the model's forward fails on its example inputs: {described(exc)}"
        ) from None
    return loaded


def apply_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> list[str]:
    """Load ``state`` into ``model`` strictly; return notes on lossless casts.

    Every key must match, every shape too; a dtype other than the parameter's is allowed
    only as a lossless widening (fp16 or bf16 into fp32, ...), noted. Anything else (int
    weights for float parameters, fp32 into fp16, a non-tensor) is a one-line error that
    names the tensors.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({_names(missing)})")
        if extra:
            parts.append(f"unexpected {len(extra)} ({_names(extra)})")
        raise ModelLoadError(f"weights {path} do not fit the model: {'; '.join(parts)}")
    converted: dict[str, torch.Tensor] = {}
    shapes, dtypes, casts = [], [], []
    for name, want in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor):
            dtypes.append(f"{name} is a {type(got).__name__}")
            continue
        if got.shape != want.shape:
            shapes.append(f"{name} {tuple(got.shape)} vs {tuple(want.shape)}")
            continue
        if got.dtype != want.dtype:
            if not _lossless(got.dtype, want.dtype):
                dtypes.append(f"{name} {_dtype(got.dtype)} for {_dtype(want.dtype)}")
                continue
            casts.append(f"{_dtype(got.dtype)} -> {_dtype(want.dtype)}")
            got = got.to(want.dtype)
        converted[name] = got
    if shapes:
        raise ModelLoadError(f"weights {path} have other shapes: {_names(shapes)}")
    if dtypes:
        raise ModelLoadError(
            f"weights {path} have dtypes that would change their values: {_names(dtypes)}"
        )
    model.load_state_dict(converted, strict=True)
    if not casts:
        return []
    kinds = ", ".join(sorted(set(casts)))
    return [f"weights {path}: {len(casts)} tensors widened losslessly ({kinds})"]


def _lossless(source: torch.dtype, target: torch.dtype) -> bool:
    if source.is_floating_point and target.is_floating_point:
        s, t = torch.finfo(source), torch.finfo(target)
        # every value of source is one of target: as much range, as fine a mantissa
        return t.bits > s.bits and t.max >= s.max and t.eps <= s.eps and t.tiny <= s.tiny
    if source.is_floating_point or target.is_floating_point or target.is_complex:
        # bool or integers for a float parameter: a flag or a count is not a weight, and
        # torch's promotion would call bool->float lossless
        return False
    return torch.promote_types(source, target) == target and source != target


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(items: list[str], shown: int = 3) -> str:
    head = ", ".join(items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


def load_weights(path: Path, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot read {path} as safetensors (truncated?): {described(exc)}"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as exc:
        if not re.search(r"(?i)unsupported global", str(exc)):
            raise ModelLoadError(
                # torch's own text here recommends weights_only=False: not for a corrupt file
                f"cannot read weights {path}: not a torch.save file, or a corrupt one"
            ) from None
        raise ModelLoadError(
            f"refused to unpickle {path}: it holds more than tensors ({pickle_refusal(exc)}); "
            "convert it to safetensors, or pass --allow-unsafe-pickle if you trust its author"
        ) from None
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ModelLoadError(
            f"cannot read weights {path} (corrupt, or truncated?): {described(exc)}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint's usual wrapping
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, bytes): what ``check`` and
    ``bench`` compare with the manifest to know they were given the exported model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
