"""``--task text-generation``: export, and check, the decoder program.

``export_model(task.program.decoder, out, ..., task=GenerationTask.of(loaded))`` exports it.

The program goes through the same compile (capture, passes, proven rewrite) and the same
exporters as a plain forward, into the export's root (``model.onnx``, ``model.engine``,
...), and its parity is checked stage by stage on real inputs (prompts from an empty
cache, steps and a follow-up chunk against filled ones). Then generation parity: every
backend's greedy generation against ``transformers``' ``generate`` (``decoding``). Beside
the program: the checkpoint's config and tokenizer files and ``genai_config.json``
(``runtime_files``), so that ONNX Runtime GenAI runs the folder as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ...files import UnreadableFile, read_json
from ...models.builtin import LoadedModel
from ..artifacts import ArtifactError, ArtifactWriter
from ..formats import ProgressFn
from ..inputs.options import ONNX_FILE
from ..manifest import json_text
from ..parity.compare import ParityReport, tolerance_for
from ..pipeline import (
    Compiled,
    Task,
    compile_model,
    parity_stages,
    parity_summary,
    run_checks,
    source_record,
    step,
)
from .decoding import BackendReport, prompts_for, run_generation_parity
from .programs import (
    INPUTS,
    TASK,
    GenerationError,
    GenerationProgram,
    build_program,
    cache_names,
)
from .runtime_files import (
    GENAI_CONFIG,
    GENAI_FORMAT,
    copy_checkpoint_files,
    genai_config,
    program_metadata,
    stamp_metadata,
)


@dataclass
class GenerationReport:
    """Parity of the decoder program, stage by stage, and of generation, backend by
    backend."""

    program: ParityReport
    generation: list[BackendReport]

    @property
    def passed(self) -> bool:
        ran = [b for b in self.generation if b.executed]
        return self.program.passed and bool(ran) and all(b.passed for b in ran)

    def __bool__(self) -> bool:
        return self.passed

    def verdict(self) -> str:
        word = "PASSED" if self.passed else "FAILED"
        skipped = [b.stage for b in self.generation if not b.executed]
        ran = len(self.generation) - len(skipped)
        word += f" (the decoder and greedy generation on {ran} backends"
        if skipped:
            word += f"; {len(skipped)} not executed: {', '.join(skipped)}"
        return word + ")"

    def summary_lines(self) -> list[str]:
        return [b.summary_line() for b in self.generation] + [f"parity {self.verdict()}"]

    def to_json(self) -> dict[str, Any]:
        return {
            "task": TASK,
            "passed": self.passed,
            "program": self.program.to_json(),
            "generation": [b.to_json() for b in self.generation],
        }


def _check_all(
    program: GenerationProgram,
    compiled: Compiled,
    folder: Path,
    formats: list[str],
    progress: ProgressFn,
    trt_package: str | None,
    native_code: bool,
) -> GenerationReport:
    stages = parity_stages(compiled, folder, formats, trt_package, native_code)
    report = run_checks(compiled, folder, progress, formats, stages=stages)
    vocab = int(program.model.config.get_text_config().vocab_size)
    prompts = prompts_for(program.max_cache_len, vocab)
    dtype = next(program.model.parameters()).dtype
    with step(progress, f"greedy generation of {len(prompts)} prompts on {len(stages)} backends"):
        generation = run_generation_parity(
            program, stages, prompts, compiled.rewrite.plan, tolerance_for(dtype)
        )
    result = GenerationReport(report, generation)
    for line in result.summary_lines():
        progress(line)
    return result


class GenerationTask(Task):
    """The decoder program's export: the files a runtime reads beside it, and generation
    parity after the program's own."""

    manifest_task = TASK

    def __init__(self, program: GenerationProgram, loaded: LoadedModel) -> None:
        self.program, self.loaded = program, loaded

    @classmethod
    def of(cls, loaded: LoadedModel, max_cache_len: int | None = None) -> GenerationTask:
        """The task of ``loaded`` (an ``hf:DIR`` causal LM); export ``task.program.decoder``
        with it (``pipeline.export_model``)."""
        return cls(build_program(loaded, max_cache_len), loaded)

    def source(self, _: LoadedModel) -> dict[str, Any]:
        return source_record(self.loaded)  # the checkpoint, not the program around it

    def add_files(self, writer: ArtifactWriter, formats: list[str]) -> dict[str, Any]:
        generation = generation_section(self.program)
        copied = copy_checkpoint_files(self.loaded.source, writer)
        if "onnx" in formats:  # the file says what it is, and GenAI finds its config beside it
            stamp_metadata(writer.path(ONNX_FILE), program_metadata(generation))
            writer.add(ONNX_FILE, "onnx")
            writer.path(GENAI_CONFIG).write_text(json_text(genai_config(self.program, ONNX_FILE)))
            writer.add(GENAI_CONFIG, GENAI_FORMAT)
        return {"generation": generation, "checkpoint_files": copied}

    def check(
        self, compiled: Compiled, folder: Path, formats: list[str], progress: ProgressFn,
        trt_package: str | None,
    ) -> GenerationReport:  # fmt: skip
        return _check_all(self.program, compiled, folder, formats, progress, trt_package, True)

    def parity_summary(self, report: GenerationReport) -> dict[str, Any]:
        return {
            "passed": report.passed,
            "program": parity_summary(report.program),
            "generation": {
                b.stage: {"executed": b.executed, "passed": b.passed} for b in report.generation
            },
        }


def generation_section(program: GenerationProgram) -> dict[str, Any]:
    """What a runtime reads from the manifest to drive the loop (``check`` holds a
    folder's to what the model gives, so a runtime is never fed edited values)."""
    past, present = cache_names(program.layers)
    return {
        "max_cache_len": program.max_cache_len,
        "cache_layers": program.layers,
        "eos_token_ids": sorted(program.eos),
        "inputs": [*INPUTS, *past],
        "outputs": ["logits", *present],
    }


def recorded_cache_len(manifest: dict[str, Any], directory: Path) -> int:
    value = (
        manifest.get("generation", {}).get("max_cache_len")
        if isinstance(manifest.get("generation"), dict)
        else None
    )
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ArtifactError(
            f"{directory}: its manifest records no valid max_cache_len; export again"
        )
    return value


def _check_genai_config(
    manifest: dict[str, Any], directory: Path, program: GenerationProgram
) -> None:
    """GenAI drives its loop from ``genai_config.json`` (hashed, so as exported): it must
    still be what this model gives, as the manifest's generation section must."""
    listed = {a.get("path") for a in manifest.get("artifacts", []) if isinstance(a, dict)}
    if GENAI_CONFIG not in listed:
        return
    try:
        written = read_json(directory / GENAI_CONFIG, 1 << 20)
    except UnreadableFile as exc:
        raise ArtifactError(str(exc)) from None
    if written != json.loads(json_text(genai_config(program, ONNX_FILE))):
        raise ArtifactError(
            f"{directory / GENAI_CONFIG} is not what this model gives (cache, heads, end "
            "tokens, names); export again"
        )


def _check_onnx_metadata(path: Path, generation: dict[str, Any]) -> None:
    """The ``metadata_props`` a runtime may read from ``model.onnx`` (hashed, so as
    exported) still say what this model gives; the producer's version may differ."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    wrong = sorted(
        key for key, value in program_metadata(generation).items()
        if key != "producer" and props.get(key) != value
    )  # fmt: skip
    if wrong:
        raise ArtifactError(
            f"{path}: its metadata_props {', '.join(wrong)} are not what this model gives; "
            "export again"
        )


def check_generation(
    loaded: LoadedModel, directory: Path, manifest: dict[str, Any], formats: list[str],
    progress: ProgressFn, native_code: bool,
) -> GenerationReport:  # fmt: skip
    """Re-run parity of the generation export in ``directory`` (its manifest verified, its
    formats listed, its model ``loaded``: ``pipeline.check_artifacts``)."""
    try:
        program = build_program(loaded, recorded_cache_len(manifest, directory))
    except GenerationError as exc:
        raise ArtifactError(f"{directory}: {exc}") from None
    if manifest.get("generation") != generation_section(program):
        raise ArtifactError(
            f"{directory}: its manifest's generation section (cache, end tokens, tensor "
            "names) is not what this model gives; export again"
        )
    _check_genai_config(manifest, directory, program)
    if "onnx" in formats:
        _check_onnx_metadata(directory / ONNX_FILE, generation_section(program))
    compiled = compile_model(program.decoder, progress)
    return _check_all(program, compiled, directory, formats, progress, None, native_code)
