"""``ultramem inspect [MODEL]``: memory layers found, which were fused and why not, op counts."""

from __future__ import annotations

from pathlib import Path

import click

from ..compiler.artifacts import json_text
from .options import bad_input, load, model_options, progress


@click.command("inspect")
@model_options()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(model: str, weights: Path | None, allow_unsafe_pickle: bool, as_json: bool) -> None:
    """Show what the passes find and change in MODEL (default: the bundled trained model)."""
    loaded = load(model, weights, allow_unsafe_pickle)
    from ..compiler.pipeline import inspect_model

    with bad_input():
        report = inspect_model(loaded, progress)
    if as_json:
        click.echo(json_text(report.to_json()), nl=False)
    else:
        click.echo("\n".join(report.lines()))
