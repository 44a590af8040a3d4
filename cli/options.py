"""Options shared by the ``ultramem`` commands, and the error convention.

Bad input is a :class:`click.UsageError`-style one-line error with exit code 2; a parity
failure is exit code 1. A traceback is never the answer to a user's mistake.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .. import interrupts
from ..compiler.inputs.errors import INPUT_ERRORS
from ..compiler.inputs.sources import DEFAULT_MODEL, preflight_model

if TYPE_CHECKING:
    from ..models.builtin import LoadedModel

F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """One line on stderr, exit code 2."""

    exit_code = 2


class PathOption(click.Path):
    """``click.Path`` that refuses, before any work, a name the system or the runtimes
    cannot take (``files.path_name_problem``): too long, a NUL, not UTF-8."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ..files import path_name_problem

        problem = path_name_problem(value)
        if problem is not None:
            self.fail(f"{value!s}: {problem}", param, ctx)
        return super().convert(value, param, ctx)


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
            type=PathOption(path_type=Path, dir_okay=False),
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


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # all but tab: one line each


def printable(text: str) -> str:
    """``text`` safe for a terminal, whatever it quotes (a manifest's model string, a
    path): control characters (escape sequences included) shown as ``\\xNN``, and a
    path that is not UTF-8 (held as surrogates) with its bytes escaped."""
    with contextlib.suppress(UnicodeEncodeError):  # a surrogate no file name decodes to
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def progress(message: str) -> None:
    interrupts.raise_if_received()  # a signal a library swallowed ends the work here
    click.echo(printable(f"[ultramem] {message}"), err=True)


def preflight(model: str, weights: Path | None) -> None:
    """Refuse a MODEL that can never load, before any long import or work."""
    with bad_input():
        preflight_model(model, weights)


def _quiet_torch_logs() -> None:
    """torch logs, at ERROR, the tracebacks of what ``torch.export`` tries and drops
    (about 60 lines per shape guard it cannot keep, on exports that then succeed); the
    commands report their own failures, so without ``-v`` torch logs nothing. Set once
    torch is imported: its import resets the levels from ``TORCH_LOGS``."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    if root is not None and isinstance(root.obj, dict) and root.obj.get("verbose"):
        return
    import torch._logging

    torch._logging.set_logs(all=logging.CRITICAL)


def load(model: str, weights: Path | None, allow_unsafe_pickle: bool) -> LoadedModel:
    preflight(model, weights)
    progress(f"loading {model}")
    from ..compiler.loading import load_model  # torch and the model's code: seconds

    _quiet_torch_logs()
    with bad_input():
        ctx = click.get_current_context(silent=True)
        trust = bool(ctx and ctx.meta.get("ultramem.trust_remote_code"))
        loaded = load_model(model, weights, allow_unsafe_pickle, trust)
    for note in loaded.metadata.get("notes", []):
        progress(f"note: {note}")
    return loaded
