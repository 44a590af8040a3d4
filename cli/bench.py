"""``ultramem bench [MODEL] --artifacts DIR --tokens ... --out DIR``: latency of every backend."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..compiler.bench.report import markdown, write_reports
from ..compiler.bench.run import ALL_BACKENDS, make_backends, run_bench
from ..compiler.pipeline import compile_model
from .options import INPUT_ERRORS, InputError, load, model_options, progress


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


@click.command("bench")
@model_options()
@click.option("--artifacts", type=click.Path(path_type=Path), help="An `ultramem export` folder.")
@click.option("--tokens", default="1,16,64,256", show_default=True, help="Sequence lengths.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--backends", default=",".join(ALL_BACKENDS), show_default=True)
@click.option("--budget", default=0.5, show_default=True, help="Seconds of timing per point.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for bench.*")
@click.option(
    "--compare", type=click.Path(path_type=Path, dir_okay=False), help="An older bench.json."
)
def bench(
    model: str,
    weights: Path | None,
    allow_unsafe_pickle: bool,
    artifacts: Path | None,
    tokens: str,
    batch: int,
    backends: str,
    budget: float,
    out: Path,
    compare: Path | None,
) -> None:
    """Time every available backend of MODEL on the same inputs, with parity checked first."""
    token_list = _int_list(tokens)
    old = json.loads(compare.read_text()) if compare is not None else None
    loaded = load(model, weights, allow_unsafe_pickle)
    try:
        compiled = compile_model(loaded, progress)
        chosen = make_backends(compiled, artifacts, [b for b in backends.split(",") if b])
    except (*INPUT_ERRORS, ValueError) as exc:
        raise InputError(str(exc)) from None
    report = run_bench(compiled, chosen, token_list, batch, budget, progress)
    write_reports(report, out, old)
    click.echo(markdown(report, old))
