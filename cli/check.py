"""``ultramem check [MODEL] --artifacts DIR``: re-run parity of exported artifacts."""

from __future__ import annotations

from pathlib import Path

import click

from ..compiler.artifacts import read_manifest
from ..compiler.pipeline import check_artifacts
from .options import INPUT_ERRORS, InputError, load, model_options, progress


@click.command("check")
@model_options(default=None)
@click.option(
    "--artifacts",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder written by `ultramem export`.",
)
def check(
    model: str | None, weights: Path | None, allow_unsafe_pickle: bool, artifacts: Path
) -> None:
    """Compare every artifact in --artifacts with MODEL (default: the model it was exported from).

    Exits 0 when parity holds, 1 when it does not, 2 on bad input.
    """
    try:
        source = model or read_manifest(artifacts)["source"]["model"]
        loaded = load(source, weights, allow_unsafe_pickle)
        report = check_artifacts(loaded, artifacts, progress)
    except INPUT_ERRORS as exc:
        raise InputError(str(exc)) from None
    click.echo(f"parity {'PASSED' if report else 'FAILED'}: {artifacts / 'parity.json'}")
    if not report:
        raise SystemExit(1)
