"""Options shared by the ``ultramem`` commands, and the error convention.

Bad input is a :class:`click.UsageError`-style one-line error with exit code 2; a parity
failure is exit code 1. A traceback is never the answer to a user's mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..compiler.inputs.errors import INPUT_ERRORS
from ..compiler.inputs.sources import DEFAULT_MODEL, preflight_model

if TYPE_CHECKING:
    from ..models.builtin import LoadedModel

F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """One line on stderr, exit code 2."""

    exit_code = 2


@contextmanager
def bad_input() -> Iterator[None]:
    """Every input error raised inside becomes the one-line, exit-2 answer."""
    try:
        yield
    except INPUT_ERRORS as exc:
        text = " ".join(str(exc).split())  # one line, whatever the message held
        raise InputError(text) from None


def _remember_trust(ctx: click.Context, _: click.Parameter, value: bool) -> bool:
    # kept on the context, not passed to each command: only the loader reads it
    ctx.meta["ultramem.trust_remote_code"] = value
    return value


def model_options(default: str | None = DEFAULT_MODEL) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        fn = click.argument("model", required=False, default=default, metavar="[MODEL]")(fn)
        fn = click.option(
            "--weights",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Weights for a package.module:factory MODEL (.safetensors or a torch.save file).",
        )(fn)
        fn = click.option(
            "--trust-remote-code",
            is_flag=True,
            expose_value=False,
            callback=_remember_trust,
            help="Let an hf:DIR checkpoint run its own modeling code (auto_map: trusted only).",
        )(fn)
        fn = click.option(
            "--allow-unsafe-pickle",
            is_flag=True,
            help="Let --weights unpickle any object (runs code from the file: trusted only).",
        )(fn)
        return fn

    return decorate


def native_code_option(fn: F) -> F:
    return click.option(
        "--allow-native-code",
        is_flag=True,
        help="Load and run the folder's AOTInductor package (a shared library: trusted only).",
    )(fn)


def progress(message: str) -> None:
    click.echo(f"[ultramem] {message}", err=True)


def preflight(model: str, weights: Path | None) -> None:
    """Refuse a MODEL that can never load, before any long import or work."""
    with bad_input():
        preflight_model(model, weights)


def load(model: str, weights: Path | None, allow_unsafe_pickle: bool) -> LoadedModel:
    preflight(model, weights)
    progress(f"loading {model}")
    from ..compiler.loading import load_model  # torch and the model's code: seconds

    with bad_input():
        ctx = click.get_current_context(silent=True)
        trust = bool(ctx and ctx.meta.get("ultramem.trust_remote_code"))
        loaded = load_model(model, weights, allow_unsafe_pickle, trust)
    for note in loaded.metadata.get("notes", []):
        progress(f"note: {note}")
    return loaded
