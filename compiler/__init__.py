"""compiler: capture, rewrite, export, check and time a model (one module or package per
stage). Here: one line of an exception, as every one-line answer of the CLI quotes it."""

from __future__ import annotations


def first_line(error: BaseException | None, limit: int | None = None) -> str:
    """The first line of ``str(error)`` (cut to ``limit`` characters), or ``""``."""
    text = str(error).strip() if error is not None else ""
    line = text.splitlines()[0] if text else ""
    return line[:limit] if limit is not None else line


def described(error: BaseException, limit: int = 300) -> str:
    """``Type: first line``, or the type alone when the message is empty."""
    line = first_line(error, limit)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
