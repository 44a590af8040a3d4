"""``ultramem check [MODEL] --artifacts DIR``: re-run parity of exported artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..compiler.artifacts import ArtifactError, json_text, read_manifest
from ..compiler.inputs.options import GENERATION_TASK as GENERATION
from ..compiler.inputs.sources import HF_PREFIX
from ..files import atomic_write
from .options import bad_input, load, model_options, native_code_option, progress


def model_named_by(manifest: dict[str, Any], artifacts: Path) -> str:
    """The MODEL to re-check with when none is given: a bundled one, or an ``hf:DIR``
    checkpoint, which loads as data (config JSON, safetensors) and never with its own
    code: ``--trust-remote-code`` applies only to a MODEL named on the command line. An
    artifacts folder is data from elsewhere; importing the factory or loading the
    ``.pt2`` its manifest names would run whatever code that names."""
    source = manifest.get("source", {})
    model = str(source.get("model", ""))
    if model.startswith("builtin:") and not source.get("weights"):
        return model
    if model.startswith(HF_PREFIX) and not source.get("weights"):
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.meta.get("ultramem.trust_remote_code"):
            raise ArtifactError(
                f"--trust-remote-code runs a checkpoint's own code: name the checkpoint "
                f"yourself, e.g. `ultramem check {model} --trust-remote-code --artifacts "
                f"{artifacts}` (never the one a folder names)"
            )
        progress(f"the model {artifacts} was exported from: {model} (loaded as data)")
        return model
    weights = source.get("weights")
    again = f"ultramem check {model}" + (f" --weights {weights}" if weights else "")
    raise ArtifactError(
        f"{artifacts} was exported from {model or 'an unrecorded model'}; check loads no "
        f"model a folder names (that would run its code): name it yourself, e.g. `{again} "
        f"--artifacts {artifacts}`"
    )


def check_task(manifest: dict[str, Any], artifacts: Path) -> None:
    task = manifest.get("task")
    if task not in (None, GENERATION):
        raise ArtifactError(f"{artifacts}: its manifest names task {task!r}; export again")


@click.command("check")
@model_options(default=None)
@native_code_option
@click.option(
    "--artifacts",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder written by `ultramem export` (only read).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the parity report (JSON) to this file.",
)
def check(
    model: str | None,
    weights: Path | None,
    allow_unsafe_pickle: bool,
    allow_native_code: bool,
    artifacts: Path,
    report: Path | None,
) -> None:
    """Compare every artifact in --artifacts with MODEL (default: the bundled model it was
    exported from; any other model must be named here).

    Exits 0 when parity holds, 1 when it does not, 2 on bad input.
    """
    with bad_input():
        manifest = read_manifest(artifacts)
        check_task(manifest, artifacts)
        if model is None:
            if weights is not None:
                raise ArtifactError("--weights needs the MODEL it belongs to")
            model = model_named_by(manifest, artifacts)
        if report is not None and report.is_dir():
            raise ArtifactError(f"--report {report} is a folder; give a file name")
    loaded = load(model, weights, allow_unsafe_pickle)
    from ..compiler.generation.export import check_generation
    from ..compiler.pipeline import check_artifacts

    with bad_input():
        if manifest.get("task") == GENERATION:
            result: Any = check_generation(loaded, artifacts, progress, allow_native_code)
        else:
            result = check_artifacts(loaded, artifacts, progress, allow_native_code)
    if report is not None:
        atomic_write(report, json_text(result.to_json()))
    click.echo(f"parity {result.verdict()}" + (f": {report}" if report is not None else ""))
    if not result:
        raise SystemExit(1)
