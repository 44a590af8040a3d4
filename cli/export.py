"""``ultramem export [MODEL] --out DIR``: capture, export and check a model."""

from __future__ import annotations

from pathlib import Path

import click

from ultramem.cli.options import INPUT_ERRORS, InputError, load, model_options, progress
from ultramem.compiler.pipeline import FORMATS, export_model


@click.command("export")
@model_options()
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the artifacts: new, empty, or an earlier ultramem export.",
)
@click.option(
    "--format",
    "formats",
    default="onnx",
    show_default=True,
    help=f"Comma-separated artifact formats: {', '.join(FORMATS)}.",
)
@click.option("--opset", default=20, show_default=True, help="ONNX opset of the exported graph.")
def export(
    model: str, weights: Path | None, allow_unsafe_pickle: bool, out: Path, formats: str, opset: int
) -> None:
    """Export MODEL (default: the bundled trained model) with a parity report."""
    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    loaded = load(model, weights, allow_unsafe_pickle)
    try:
        _, report = export_model(loaded, out, progress, opset=opset, formats=chosen)
    except INPUT_ERRORS as exc:
        raise InputError(str(exc)) from None
    click.echo(f"exported {loaded.source} to {out}: parity {'PASSED' if report else 'FAILED'}")
    if not report:
        raise SystemExit(1)
