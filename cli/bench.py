"""``ultramem bench [MODEL] --artifacts DIR --tokens ... --out DIR``: latency of every backend."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..compiler.artifacts import (
    ArtifactError,
    finish_interrupted_publish,
    read_manifest,
)
from ..compiler.inputs.options import BENCH_BACKENDS as ALL_BACKENDS
from ..compiler.inputs.options import BENCH_SCHEMA
from ..compiler.inputs.options import GENERATION_TASK as GENERATION
from ..compiler.inputs.sources import DEFAULT_MODEL
from ..files import UnreadableFile, output_folder_problem, read_json
from .check import check_task, model_named_by, verify_folder
from .options import (
    InputError,
    PathOption,
    bad_input,
    load,
    model_options,
    native_code_option,
    preflight,
    progress,
)

if TYPE_CHECKING:
    from ..compiler.capture import CaptureResult


REPORT_NAMES = ("bench.json", "bench.md", "bench.png")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def _old_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"--compare {path}: no such file")
    try:
        old = read_json(path, 64 << 20, follow_links=True)
    except UnreadableFile as exc:
        raise ArtifactError(f"--compare {exc}") from None
    schema = old.get("schema") if isinstance(old, dict) else None
    if schema != BENCH_SCHEMA:
        raise ArtifactError(
            f"--compare {path} is not a bench.json of this ultramem (schema {schema!r}, "
            f"expected {BENCH_SCHEMA!r})"
        )
    from ..compiler.bench.compare import comparable

    problem = comparable(old)
    if problem is not None:
        raise ArtifactError(f"--compare {path} {problem}")
    return old


def admitted(capture: CaptureResult, name: str, wanted: list[int]) -> tuple[list[int], list[int]]:
    """The sizes of ``wanted`` the capture admits along axis ``name``, and the others."""
    axis = capture.axis(0, name)
    if axis is None:
        return wanted, []
    low, high = axis.min or 1, axis.max
    inside = [w for w in wanted if w >= low and (high is None or w <= high)]
    return inside, [w for w in wanted if w not in inside]


@click.command("bench")
@model_options(default=None)
@native_code_option
@click.option("--artifacts", type=PathOption(path_type=Path), help="An `ultramem export` folder.")
@click.option(
    "--tokens",
    default="1,16,64,256",
    show_default=True,
    help="Sequence lengths (a text-generation export: prompt lengths; decode is timed at "
    "cache fills 1, 1/4, 1/2 and full); those the model does not admit are left out.",
)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--backends", default=",".join(ALL_BACKENDS), show_default=True)
@click.option(
    "--budget",
    default=0.5,
    show_default=True,
    help="Seconds of timing per backend and size, spent in interleaved rounds.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads for every backend (torch's and ONNX Runtime's); "
    "default: torch's count when the command starts.",
)
@click.option("--out", required=True, type=PathOption(path_type=Path), help="Folder for bench.*")
@click.option(
    "--compare", type=PathOption(path_type=Path, dir_okay=False), help="An older bench.json."
)
def bench(
    model: str | None,
    weights: Path | None,
    allow_unsafe_pickle: bool,
    allow_native_code: bool,
    artifacts: Path | None,
    tokens: str,
    batch: int,
    backends: str,
    budget: float,
    threads: int | None,
    out: Path,
    compare: Path | None,
) -> None:
    """Time every available backend of MODEL on the same inputs, with parity checked first."""
    cores = os.cpu_count() or 1
    # oversubscribing a little is a choice; thousands of threads crash the runtimes' pools
    most = max(4 * cores, 16)
    if threads is not None and threads > most:
        raise InputError(f"--threads {threads}: at most {most} on these {cores} cores")
    if threads is not None and threads > cores:
        progress(f"note: --threads {threads} is more than the {cores} cores here")
    token_list = _int_list(tokens)
    if not math.isfinite(budget) or not 0 < budget <= 3600:
        raise InputError(f"--budget {budget}: give seconds per point, above 0 and at most 3600")
    problem = output_folder_problem(out)
    taken = [n for n in REPORT_NAMES if (out / n).is_dir() and not (out / n).is_symlink()]
    if problem is None and taken:
        problem = f"holds a folder named {taken[0]}, where the report goes"
    if problem is not None:
        raise InputError(f"--out {out} {problem}")
    wanted = [b for b in backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in ALL_BACKENDS]
    if unknown or not wanted:
        raise InputError(
            f"--backends: unknown {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(ALL_BACKENDS)}"
        )
    with bad_input():
        old = _old_report(compare) if compare is not None else None
        formats: list[str] = []
        if artifacts is not None:
            finish_interrupted_publish(artifacts)  # a publish SIGKILL cut short
            manifest = read_manifest(artifacts)
            check_task(manifest, artifacts)
            formats = verify_folder(manifest, artifacts)
            if manifest.get("task") == GENERATION and compare is not None:
                raise ArtifactError(
                    f"--compare: {artifacts} is a text-generation export, whose bench "
                    "reports are not compared yet"
                )
    if model is None:  # a folder names no model to load: only a bundled one
        with bad_input():
            model = DEFAULT_MODEL if artifacts is None else model_named_by(manifest, artifacts)
    preflight(model, weights)
    if threads is None:
        # the count the command started with (torch's own default is the machine's cores
        # unless the environment says otherwise): a user's factory may change it on loading
        import torch

        thread_count = torch.get_num_threads()
    else:
        thread_count = threads
    if artifacts is not None and manifest.get("task") == GENERATION:
        _bench_generation(
            model, weights, allow_unsafe_pickle, allow_native_code, artifacts, manifest,
            formats, token_list, batch, wanted, budget, thread_count, out,
        )  # fmt: skip
        return
    loaded = load(model, weights, allow_unsafe_pickle)
    from ..compiler.bench.report import markdown, write_reports
    from ..compiler.bench.run import make_backends, run_bench
    from ..compiler.pipeline import check_same_model, compile_model

    with bad_input():
        if artifacts is not None:
            check_same_model(loaded, manifest, artifacts)
        compiled = compile_model(loaded, progress)
        token_list, dropped = admitted(compiled.capture, "tokens", token_list)
        if dropped:
            progress(f"note: --tokens {','.join(map(str, dropped))} left out: not admitted")
        if not token_list:
            raise ArtifactError(f"no --tokens size in {tokens} is one {loaded.source} admits")
        batches, _ = admitted(compiled.capture, "batch", [batch])
        if not batches:
            raise ArtifactError(f"--batch {batch} is not one {loaded.source} admits")
        # ONNX Runtime takes the count when its session opens; the torch backends inside
        # run_bench, which sets it before their first call (torch.compile compiles then)
        chosen = make_backends(
            compiled, artifacts, wanted, formats, allow_native_code, threads=thread_count
        )
    report = run_bench(compiled, chosen, token_list, batch, budget, progress, thread_count)
    write_reports(report, out, old)
    click.echo(markdown(report, old))


def _bench_generation(
    model: str,
    weights: Path | None,
    allow_unsafe_pickle: bool,
    native_code: bool,
    artifacts: Path,
    manifest: dict[str, Any],
    formats: list[str],
    prompt_lengths: list[int],
    batch: int,
    wanted: list[str],
    budget: float,
    threads: int,
    out: Path,
) -> None:
    """Prompts and per-token steps of a text-generation export's decoder against eager
    transformers."""
    from ..compiler.artifacts import json_text
    from ..compiler.bench.generation import (
        GENERATION_BACKENDS,
        generation_markdown,
        run_generation_bench,
    )
    from ..compiler.capture import DEFAULT_MAX_BATCH
    from ..compiler.generation.export import recorded_cache_len
    from ..compiler.generation.programs import build_program
    from ..compiler.pipeline import check_same_model, compile_model
    from ..files import atomic_write

    loaded = load(model, weights, allow_unsafe_pickle)
    with bad_input():
        check_same_model(loaded, manifest, artifacts)
        length = recorded_cache_len(manifest, artifacts)
        lengths = [t for t in prompt_lengths if t <= length]
        if len(lengths) < len(prompt_lengths):
            progress(f"note: prompts longer than the cache ({length}) left out")
        if not lengths:
            raise ArtifactError(f"no --tokens size fits the export's cache of {length} tokens")
        if batch > DEFAULT_MAX_BATCH:
            raise ArtifactError(f"--batch {batch}: the decoder admits 1..{DEFAULT_MAX_BATCH}")
        program = build_program(loaded, length)
        compiled = compile_model(program.decoder, progress)
    chosen = [b for b in wanted if b in GENERATION_BACKENDS]
    left = [b for b in wanted if b not in GENERATION_BACKENDS]
    if left:
        progress(f"note: {', '.join(left)} not benched for text-generation")
    with bad_input():
        report = run_generation_bench(
            program, compiled, artifacts, chosen, formats, native_code,
            lengths, batch, budget, progress, threads,
        )  # fmt: skip
    for name in left:
        reason = "not benched for text-generation exports"
        report["backends"].append(
            {"name": name, "available": False, "reason": reason, "settings": {}, "results": []}
        )
    out.mkdir(parents=True, exist_ok=True)
    text = generation_markdown(report)
    atomic_write(out / "bench.json", json_text(report))
    atomic_write(out / "bench.md", text)
    click.echo(text)
