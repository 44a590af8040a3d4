"""The ``ultramem`` command group."""

from __future__ import annotations

import logging
import os
import warnings

import click

from .. import __version__
from .bench import bench
from .check import check
from .export import export
from .inspect_cmd import inspect


@click.group()
@click.version_option(__version__, prog_name="ultramem")
@click.option("-v", "--verbose", is_flag=True, help="Show library log messages.")
def cli(verbose: bool) -> None:
    """Compile UltraMem models: capture, fuse, export, check and benchmark."""
    if not verbose:
        # torch.export and torch.onnx are chatty; the commands report their own progress
        warnings.filterwarnings("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        os.environ.setdefault("TORCH_LOGS", "-all")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


cli.add_command(export)
cli.add_command(check)
cli.add_command(inspect)
cli.add_command(bench)


def main() -> None:
    cli(prog_name="ultramem")
