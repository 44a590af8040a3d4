"""The signals a command received, raised again where its work can stop cleanly.

SIGINT and SIGTERM raise an exception where the process is (``KeyboardInterrupt``,
``Terminated``), so every ``with`` block unwinds. A library on the way may catch it and
carry on: a Ctrl-C 1.2 s into a capture was swallowed inside ``torch.export``, and the
export then published and exited 0. Each signal is therefore recorded, and raised again
at the next progress report and before an export is published: an interrupted command
never publishes.
"""

from __future__ import annotations

import signal
from types import FrameType

received: list[int] = []  # this command's signals, first first


class Terminated(BaseException):
    """SIGTERM, raised where the process is (a ``BaseException``: no ``except Exception``
    on the way swallows it)."""


def _exception(signum: int) -> BaseException:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def record_and_raise(signum: int, frame: FrameType | None) -> None:
    """The handler of SIGINT and SIGTERM while a command runs."""
    received.append(signum)
    raise _exception(signum)


def raise_if_received() -> None:
    """Raise the first signal received again, if one was (it may have been swallowed)."""
    if received:
        raise _exception(received[0])
