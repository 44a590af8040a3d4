"""Options shared by the ``ultramem`` commands, and the error convention.

Bad input is a :class:`click.UsageError`-style one-line error with exit code 2; a parity
failure is exit code 1. A traceback is never the answer to a user's mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..compiler.artifacts import ArtifactError
from ..compiler.loading import DEFAULT_MODEL, ModelLoadError, load_model
from ..models.builtin import LoadedModel

F = TypeVar("F", bound=Callable[..., Any])

INPUT_ERRORS = (ModelLoadError, ArtifactError)


class InputError(click.ClickException):
    """One line on stderr, exit code 2."""

    exit_code = 2


def model_options(default: str | None = DEFAULT_MODEL) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        fn = click.argument("model", required=False, default=default, metavar="[MODEL]")(fn)
        fn = click.option(
            "--weights",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Weights for a package.module:factory MODEL (.safetensors or a torch.save file).",
        )(fn)
        fn = click.option(
            "--allow-unsafe-pickle",
            is_flag=True,
            help="Let --weights unpickle any object (runs code from the file: trusted only).",
        )(fn)
        return fn

    return decorate


def progress(message: str) -> None:
    click.echo(f"[ultramem] {message}", err=True)


def load(model: str, weights: Path | None, allow_unsafe_pickle: bool) -> LoadedModel:
    progress(f"loading {model}")
    try:
        return load_model(model, weights, allow_unsafe_pickle)
    except INPUT_ERRORS as exc:
        raise InputError(str(exc)) from None
