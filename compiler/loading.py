"""Resolve a MODEL argument into a module and example inputs.

MODEL is one of
- ``builtin:NAME``: a bundled, trained model (``ultramem.models.builtin``);
- ``path/to/program.pt2``: a program saved with ``torch.export.save``, read as data
  (``safe_pt2``: nothing in it is unpickled, evaluated or imported) unless
  ``allow_unsafe_pickle``;
- ``package.module:factory``: a callable returning a module or ``(module, example_inputs)``,
  with optional weights (``.safetensors``, or a ``torch.load(weights_only=True)`` file).

Weights files are never unpickled with arbitrary code unless ``allow_unsafe_pickle`` is
given: ``torch.load(weights_only=True)`` refuses such a payload before any of it runs.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ..models.builtin import DEFAULT_BUILTIN, LoadedModel, load_builtin
from .safe_pt2 import UnsafeArchive, load_untrusted_pt2

DEFAULT_MODEL = f"builtin:{DEFAULT_BUILTIN}"


class ModelLoadError(ValueError):
    """A MODEL or weights argument that cannot be used; the message says what to do."""


def load_model(
    spec: str, weights: Path | None = None, allow_unsafe_pickle: bool = False
) -> LoadedModel:
    if spec.startswith("builtin:"):
        if weights is not None:
            raise ModelLoadError("--weights applies to package.module:factory models only")
        try:
            return load_builtin(spec.removeprefix("builtin:"))
        except KeyError as exc:
            raise ModelLoadError(str(exc.args[0])) from None
    if spec.endswith(".pt2"):
        if weights is not None:
            raise ModelLoadError("--weights applies to package.module:factory models only")
        return _load_pt2(Path(spec), allow_unsafe_pickle)
    if ":" in spec:
        return _load_factory(spec, weights, allow_unsafe_pickle)
    raise ModelLoadError(
        f"unknown MODEL {spec!r}: use builtin:NAME, a .pt2 file, or package.module:factory"
    )


def _load_pt2(path: Path, allow_unsafe_pickle: bool) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"no such .pt2 file: {path}")
    try:
        program = torch.export.load(str(path)) if allow_unsafe_pickle else load_untrusted_pt2(path)
    except UnsafeArchive as exc:
        raise ModelLoadError(
            f"refused {path}: {exc}; re-save it with torch.export.save, or pass "
            "--allow-unsafe-pickle if you trust its author (loading it runs its code)"
        ) from None
    except Exception as exc:  # torch raises many types for a corrupt archive
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read {path} as a torch.export program: {reason}") from None
    example = program.example_inputs
    if example is None:
        raise ModelLoadError(
            f"{path} holds no example inputs; re-save it with torch.export.save after "
            "torch.export.export(model, example_inputs)"
        )
    args, _ = example
    return LoadedModel(program.module(), tuple(args), f"pt2:{path}", {"program": program})


def _load_factory(spec: str, weights: Path | None, allow_unsafe_pickle: bool) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import {spec!r}: {exc}") from None
    built = factory()
    if isinstance(built, tuple) and len(built) == 2:
        model, example = built
    else:
        model, example = built, None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(
            f"{spec} returned {type(model).__name__}; it must return an nn.Module "
            "or a (module, example_inputs) tuple"
        )
    if example is None:
        raise ModelLoadError(f"{spec} returned no example inputs; return (module, example_inputs)")
    if weights is not None:
        model.load_state_dict(load_weights(weights, allow_unsafe_pickle))
    model.eval()
    example_inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return LoadedModel(model, example_inputs, spec, {})


def load_weights(path: Path, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {path} as safetensors (truncated?): {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ModelLoadError(
            f"refused to unpickle {path}: it holds more than tensors ({first_line}); "
            "convert it to safetensors, or pass --allow-unsafe-pickle if you trust its author"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelLoadError(f"cannot read weights {path} (truncated?): {exc}") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state
