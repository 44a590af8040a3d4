"""``ultramem export [MODEL] --out DIR``: capture, export and check a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..compiler.artifacts import check_out_folder
from ..compiler.inputs.options import (
    DEFAULT_SMS,
    FORMAT_NEEDS,
    ONNX_FORMS,
    ExportOptions,
    TensorRTOptions,
    plan_formats,
)
from ..compiler.inputs.options import FORWARD_TASK as FORWARD
from ..compiler.inputs.options import GENERATION_TASK as GENERATION
from .options import InputError, PathOption, bad_input, load, model_options, preflight, progress


def choice(flag: str, choices: tuple[str, ...], default: str | None, text: str) -> Any:
    """An option taking one of ``choices`` (``default`` shown when there is one)."""
    return click.option(
        flag, type=click.Choice(list(choices)), default=default,
        show_default=default is not None, help=text,
    )  # fmt: skip


@click.command("export")
@model_options()
@click.option(
    "--out",
    required=True,
    type=PathOption(path_type=Path),
    help="Folder for the artifacts: new, empty, or an earlier ultramem export.",
)
@click.option(
    "--format",
    "formats",
    default="onnx",
    show_default=True,
    help=f"Comma-separated artifact formats: {', '.join(FORMAT_NEEDS)}.",
)
@click.option("--opset", default=20, show_default=True, help="ONNX opset of the exported graph.")
@choice(
    "--onnx-form",
    ONNX_FORMS,
    "custom",
    "custom: ultramem:: nodes with function bodies; portable: the bodies inlined.",
)
@choice(
    "--trt-mode",
    ("native", "plugin"),
    "native",
    "native: the lookup in TensorRT's own layers; plugin: our AOT Triton kernels.",
)
@choice(
    "--trt-package",
    ("tensorrt", "tensorrt_rtx"),
    None,
    "Which TensorRT to build with (default: tensorrt if installed, else tensorrt_rtx).",
)
@choice("--precision", ("fp32", "fp16", "bf16"), "fp32", "Engine precision.")
@click.option("--profile-batch", help="Engine batch range min,opt,max (default 1,1,8).")
@click.option(
    "--profile-tokens", help="Engine token range min,opt,max (default: up to the capture's)."
)
@click.option(
    "--sm", default=",".join(map(str, DEFAULT_SMS)), show_default=True, help="Kernel SMs."
)
@choice(
    "--task",
    (FORWARD, GENERATION),
    FORWARD,
    f"forward: one program over whole sequences; {GENERATION} (hf:DIR): one decoder "
    "program over a static KV cache (prompts and steps), with the files ONNX Runtime "
    "GenAI reads.",
)
@click.option(
    "--max-cache-len",
    type=int,
    help=f"{GENERATION}: the KV cache's length, prompt plus new tokens (default: the "
    "checkpoint's max_position_embeddings, at most 256).",
)
def export(
    model: str,
    weights: Path | None,
    allow_unsafe_pickle: bool,
    out: Path,
    formats: str,
    opset: int,
    onnx_form: str,
    trt_mode: str,
    trt_package: str | None,
    precision: str,
    profile_batch: str | None,
    profile_tokens: str | None,
    sm: str,
    task: str,
    max_cache_len: int | None,
) -> None:
    """Export MODEL (default: the bundled trained model) with a parity report."""
    names = [f.strip() for f in formats.split(",")]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise InputError(f"--format {formats!r}: give each format once, comma-separated")
    try:
        sms = tuple(int(x) for x in sm.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--sm takes comma-separated integers such as 80,90, got {sm!r}") from None
    trt = TensorRTOptions(trt_mode, trt_package, precision, profile_batch, profile_tokens, sms)
    options = ExportOptions(opset, onnx_form, trt)
    with bad_input():
        plan_formats(tuple(names), options)  # every option checked before the model loads
        check_out_folder(out)
    if max_cache_len is not None and max_cache_len < 2:
        raise InputError(f"--max-cache-len {max_cache_len}: give at least 2")
    preflight(model, weights)
    if task == GENERATION:
        _check_generation_options(model, names, options)
    elif max_cache_len is not None:
        raise InputError(f"--max-cache-len applies to --task {GENERATION}")
    loaded = load(model, weights, allow_unsafe_pickle)
    from ..compiler.pipeline import export_model

    with bad_input():
        generation = _generation_task(loaded, max_cache_len) if task == GENERATION else None
        program = generation.program.decoder if generation is not None else loaded
        _, report = export_model(program, out, progress, tuple(names), options, task=generation)
    what = f" ({GENERATION})" if generation is not None else ""
    click.echo(f"exported {loaded.source}{what} to {out}: parity {report.verdict()}")
    if not report:
        raise SystemExit(1)


def _generation_task(loaded: Any, max_cache_len: int | None) -> Any:
    from ..compiler.generation.export import GenerationTask  # transformers: only when asked

    return GenerationTask.of(loaded, max_cache_len)


def _check_generation_options(model: str, formats: list[str], options: ExportOptions) -> None:
    if not model.startswith("hf:"):
        raise InputError(f"--task {GENERATION} takes an hf:DIR causal LM, not {model}")
    if options.trt.mode == "plugin" and "tensorrt" in formats:
        raise InputError(f"--task {GENERATION} builds native TensorRT engines (--trt-mode native)")
