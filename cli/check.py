"""``ultramem check [MODEL] --artifacts DIR``: re-run parity of exported artifacts."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from ..compiler.artifacts import (
    ArtifactError,
    finish_interrupted_publish,
    json_text,
    manifest_formats,
    read_manifest,
    verify_artifacts,
)
from ..compiler.inputs.options import GENERATION_TASK as GENERATION
from ..compiler.inputs.sources import HF_PREFIX
from ..files import atomic_write, output_file_problem
from .options import PathOption, bad_input, load, model_options, native_code_option, progress


def _pastes_back(word: str) -> bool:
    """Whether ``word``, quoted, reads back as itself from the one-line error: printable
    (no newline, no terminal escape), no run of spaces (the error folds those), and not
    an option."""
    return bool(word) and word.isprintable() and "  " not in word and not word.startswith("-")


def shown(text: str) -> str:
    """Text from a folder as it may reach a terminal: itself, or escaped (``repr``)."""
    return text if text.isprintable() else repr(text)


def suggested_command(*words: tuple[str, str | None]) -> str:
    """A command line to paste: each ``(word, placeholder)`` quoted for the shell (text
    from a folder never runs as a command of its own), or, where the word would not paste
    back as itself, the placeholder for the user to fill in (None: a literal word)."""
    return shlex.join(
        word if placeholder is None or _pastes_back(word) else placeholder
        for word, placeholder in words
    )


def _check_again(model: str, weights: Any, artifacts: Path, *flags: str) -> str:
    weight_words = [("--weights", None), (str(weights), "WEIGHTS")] if weights else []
    return suggested_command(
        ("ultramem", None), ("check", None), (model, "MODEL"), *weight_words,
        *((flag, None) for flag in flags), ("--artifacts", None), (str(artifacts), "DIR"),
    )  # fmt: skip


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
            again = _check_again(model, None, artifacts, "--trust-remote-code")
            raise ArtifactError(
                f"--trust-remote-code runs a checkpoint's own code: name the checkpoint "
                f"yourself, e.g. `{again}` (never the one a folder names)"
            )
        progress(f"the model {artifacts} was exported from: {shown(model)} (loaded as data)")
        return model
    again = _check_again(model, source.get("weights"), artifacts)
    raise ArtifactError(
        f"{artifacts} was exported from {shown(model) or 'an unrecorded model'}; check loads "
        f"no model a folder names (that would run its code): name it yourself, e.g. `{again}`"
    )


def verify_folder(manifest: dict[str, Any], artifacts: Path) -> list[str]:
    """The formats to check, once every file check reads from the folder (and every file
    those read) is known to be listed and hashed: said before any model loads."""
    verify_artifacts(artifacts, manifest)
    return manifest_formats(manifest, artifacts)


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
    type=PathOption(path_type=Path),
    help="Folder written by `ultramem export` (only read, but for finishing an export that "
    "SIGKILL cut short while publishing).",
)
@click.option(
    "--report",
    type=PathOption(path_type=Path, dir_okay=False),
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
        finish_interrupted_publish(artifacts)  # a publish SIGKILL cut short
        manifest = read_manifest(artifacts)
        check_task(manifest, artifacts)
        verify_folder(manifest, artifacts)
        if model is None:
            if weights is not None:
                raise ArtifactError("--weights needs the MODEL it belongs to")
            model = model_named_by(manifest, artifacts)
        problem = output_file_problem(report) if report is not None else None
        if problem is not None:
            raise ArtifactError(f"--report {report} {problem}")
    loaded = load(model, weights, allow_unsafe_pickle)
    from ..compiler.pipeline import check_artifacts

    with bad_input():
        result = check_artifacts(loaded, artifacts, progress, allow_native_code)
    if report is not None:
        atomic_write(report, json_text(result.to_json()))
    click.echo(f"parity {result.verdict()}" + (f": {report}" if report is not None else ""))
    if not result:
        raise SystemExit(1)
