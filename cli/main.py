"""The ``ultramem`` command group, and its exit codes.

0 done (parity passed); 1 parity failed; 2 bad input, one line on stderr, before long
work; 3 an internal error (a bug: one line, ``-v`` shows the traceback); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). Whatever the code, an interrupted export leaves its
``--out`` as it was (``compiler/artifacts.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from types import FrameType

import click

from .. import __version__
from ..compiler import first_line
from .bench import bench
from .check import check
from .export import export
from .inspect_cmd import inspect
from .options import printable

BAD_INPUT = 2
INTERNAL_ERROR = 3
INTERRUPTED = 130
TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every ``with`` block unwinds (a
    ``BaseException``: no ``except Exception`` on the way swallows it)."""


@click.group()
@click.version_option(__version__, prog_name="ultramem")
@click.option("-v", "--verbose", is_flag=True, help="Show library log messages and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Compile UltraMem models: capture, fuse, export, check and benchmark."""
    ctx.obj = {"verbose": verbose}
    if not verbose:
        # torch.export and torch.onnx are chatty; the commands report their own progress
        # (torch's own logs are quieted once it is imported: options._quiet_torch_logs)
        warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


cli.add_command(export)
cli.add_command(check)
cli.add_command(inspect)
cli.add_command(bench)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


# what the system says when the machine, not ultramem, is short of something; torch's C++
# writers and compilers run as subprocesses report it only as text
_SYSTEM_TEXTS = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Read-only file system",
    "Permission denied",
    "File name too long",
)


def system_error(exc: BaseException) -> str | None:
    """One line for an error the operating system raised (a full disk, a read-only folder,
    a name too long), wherever it surfaced and however a library wrapped it; None for
    anything else. Such an error is the machine's state or the user's path: bad input
    (exit 2), not a bug."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno is not None:
            where = link.filename if link.filename is not None else ""
            reason = link.strerror or os.strerror(link.errno)
            return f"{where}: {reason}" if where != "" else reason
        text = str(link)
        found = next((t for t in _SYSTEM_TEXTS if t in text), None)
        if found is not None:
            return f"{found} ({type(link).__name__}: {first_line(link, 200)})"
        link = link.__cause__ or link.__context__
    return None


def _say(line: str) -> None:
    click.echo(printable(line), err=True)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return its exit code (see the module docstring)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        result = cli.main(args=argv, prog_name="ultramem", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.UsageError as exc:
        # one line, as every bad input gets, instead of click's usage block
        command = exc.ctx.command_path if exc.ctx is not None else "ultramem"
        message = " ".join(exc.format_message().split())
        _say(f"Error: {message} (see `{command} --help`)")
        return exc.exit_code
    except click.ClickException as exc:
        _say(f"Error: {exc.format_message()}")
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        _say("ultramem: interrupted; no half-written output is left")
        return INTERRUPTED
    except Terminated:
        _say("ultramem: terminated; no half-written output is left")
        return TERMINATED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:
        # the reader went away (``ultramem inspect --json | head``): not our error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, never read
        return 0
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        system = system_error(exc)
        if system is not None:
            _say(f"Error: {system}")
            return BAD_INPUT
        _say(
            f"ultramem: internal error: {type(exc).__name__}: {first_line(exc, 300)} "
            "(a bug: please report it with the command line; -v shows the traceback)"
        )
        return INTERNAL_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    sys.exit(run())
