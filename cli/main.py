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

import click

from .. import __version__, interrupts
from ..compiler import first_line
from ..files import system_error
from .bench import bench
from .check import check
from .export import export
from .inspect_cmd import inspect
from .options import printable

BAD_INPUT = 2
INTERNAL_ERROR = 3
INTERRUPTED = 130
TERMINATED = 143


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


def _say(line: str) -> None:
    click.echo(printable(line), err=True)


def _signal_answer(signum: int) -> int:
    if signum == signal.SIGTERM:
        _say("ultramem: terminated; no half-written output is left")
        return TERMINATED
    _say("ultramem: interrupted; no half-written output is left")
    return INTERRUPTED


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return its exit code (see the module docstring)."""
    interrupts.received.clear()
    previous = signal.signal(signal.SIGTERM, interrupts.record_and_raise)
    # a shell's Ctrl-C keeps Python's meaning; an ignored SIGINT (a background job) stays so
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupts.record_and_raise)
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        result = cli.main(args=argv, prog_name="ultramem", standalone_mode=False)
        if interrupts.received:  # swallowed on the way, and no progress report came after
            return _signal_answer(interrupts.received[0])
        return result if isinstance(result, int) else 0
    except click.UsageError as exc:
        # one line, as every bad input gets, instead of click's usage block
        command = exc.ctx.command_path if exc.ctx is not None else "ultramem"
        message = " ".join(exc.format_message().split())
        _say(f"Error: {message} (see `{command} --help`)")
        return exc.exit_code
    except click.ClickException as exc:
        if interrupts.received:  # an input error a signal caused (an import cut short)
            return _signal_answer(interrupts.received[0])
        _say(f"Error: {exc.format_message()}")
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        return _signal_answer(signal.SIGINT)
    except interrupts.Terminated:
        return _signal_answer(signal.SIGTERM)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:
        # the reader went away (``ultramem inspect --json | head``): not our error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, never read
        return 0
    except Exception as exc:
        if interrupts.received:
            # an error a signal caused while it unwound (a module it cut short mid-import
            # fails later in odd ways): the signal is the answer, not a bug
            return _signal_answer(interrupts.received[0])
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
        interrupts.received.clear()  # this command's: none may end a later one in-process
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


def main() -> None:
    sys.exit(run())
