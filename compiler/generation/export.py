"""``--task text-generation``: export, and check, the prefill and decode programs.

Each program goes through the same compile (capture, passes, proven rewrite) and the same
exporters as a plain forward, into its own subfolder (``prefill/model.onnx``,
``decode/model.engine``, ...), and its parity is checked stage by stage on real inputs
(decode on caches a prefill filled). Then generation parity: every backend's greedy
generation against ``transformers``' ``generate`` (``decoding``). One manifest describes
both programs; ``parity.json`` holds the three reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...models.builtin import LoadedModel
from ..artifacts import (
    ArtifactError,
    ArtifactWriter,
    json_text,
    manifest_formats,
    read_manifest,
    verify_artifacts,
)
from ..formats import (
    ExportJob,
    ExportOptions,
    ProgressFn,
    engine_profile,
    resolve,
)
from ..inputs.options import ONNX_FILE
from ..parity.compare import ParityReport, tolerance_for
from ..parity.stages import Stage
from ..pipeline import (
    PARITY_FILE,
    Compiled,
    check_same_model,
    compile_model,
    no_progress,
    op_counts,
    parity_stages,
    parity_summary,
    run_checks,
    source_record,
    step,
)
from .decoding import BackendReport, prompts_for, run_generation_parity
from .programs import (
    PROGRAMS,
    TASK,
    GenerationError,
    GenerationPrograms,
    build_programs,
    cache_names,
)
from .runtime_files import copy_checkpoint_files, program_metadata, stamp_metadata


class ProgramWriter:
    """An ``ArtifactWriter`` seen from one program's subfolder: what the exporters write
    through it lands in ``<name>/`` and is recorded as such."""

    def __init__(self, writer: ArtifactWriter, name: str) -> None:
        self._writer, self._name = writer, name
        self.staging = writer.staging / name
        self.staging.mkdir(exist_ok=True)

    def path(self, name: str) -> Path:
        return self._writer.path(f"{self._name}/{name}")

    def add(self, name: str, fmt: str) -> dict[str, Any]:
        return self._writer.add(f"{self._name}/{name}", fmt)


@dataclass
class GenerationReport:
    """Parity of both programs, stage by stage, and of generation, backend by backend."""

    programs: dict[str, ParityReport]
    generation: list[BackendReport]

    @property
    def passed(self) -> bool:
        ran = [b for b in self.generation if b.executed]
        return (
            all(r.passed for r in self.programs.values())
            and bool(ran)
            and all(b.passed for b in ran)
        )

    def __bool__(self) -> bool:
        return self.passed

    def verdict(self) -> str:
        word = "PASSED" if self.passed else "FAILED"
        skipped = [b.stage for b in self.generation if not b.executed]
        ran = len(self.generation) - len(skipped)
        word += f" (prefill, decode and greedy generation on {ran} backends"
        if skipped:
            word += f"; {len(skipped)} not executed: {', '.join(skipped)}"
        return word + ")"

    def summary_lines(self) -> list[str]:
        return [b.summary_line() for b in self.generation] + [f"parity {self.verdict()}"]

    def to_json(self) -> dict[str, Any]:
        return {
            "task": TASK,
            "passed": self.passed,
            "programs": {name: r.to_json() for name, r in self.programs.items()},
            "generation": [b.to_json() for b in self.generation],
        }


def _check_all(
    programs: GenerationPrograms,
    compiled: dict[str, Compiled],
    folder: Path,
    formats: list[str],
    progress: ProgressFn,
    trt_package: str | None,
    native_code: bool,
) -> GenerationReport:
    stages: dict[str, list[Stage]] = {}
    reports: dict[str, ParityReport] = {}
    for name in PROGRAMS:
        progress(f"{name}:")
        stages[name] = parity_stages(
            compiled[name], folder / name, formats, trt_package, native_code
        )
        reports[name] = run_checks(
            compiled[name], folder / name, progress, formats, stages=stages[name]
        )
    decode_stages = {s.name: s for s in stages["decode"]}
    backends = [(s, decode_stages[s.name]) for s in stages["prefill"] if s.name in decode_stages]
    vocab = int(programs.model.config.get_text_config().vocab_size)
    prompts = prompts_for(programs.max_cache_len, vocab)
    plans = (compiled["prefill"].rewrite.plan, compiled["decode"].rewrite.plan)
    dtype = next(programs.model.parameters()).dtype
    with step(progress, f"greedy generation of {len(prompts)} prompts on {len(backends)} backends"):
        generation = run_generation_parity(
            programs.model, backends, prompts, programs.eos, plans, tolerance_for(dtype)
        )
    report = GenerationReport(reports, generation)
    for line in report.summary_lines():
        progress(line)
    return report


def export_generation(
    loaded: LoadedModel,
    out: Path,
    progress: ProgressFn = no_progress,
    formats: tuple[str, ...] = ("onnx",),
    options: ExportOptions | None = None,
    max_cache_len: int | None = None,
) -> tuple[dict[str, Any], GenerationReport]:
    """Both programs of ``loaded`` (an ``hf:DIR`` causal LM) through compile and every
    format into ``out``, then parity of each and of generation; published only whole."""
    options = options or ExportOptions()
    chosen = resolve(formats, options)
    if options.trt.mode == "plugin" and any(f.name == "tensorrt" for f in chosen):
        raise GenerationError(f"--task {TASK} builds native TensorRT engines (--trt-mode native)")
    programs = build_programs(loaded, max_cache_len)
    names = [f.name for f in chosen]
    with ArtifactWriter(out) as writer:
        compiled: dict[str, Compiled] = {}
        sections: dict[str, dict[str, Any]] = {}
        for name in PROGRAMS:
            progress(f"{name} program:")
            compiled[name] = compile_model(programs.loaded(name), progress)
            program_options = options
            if name == "decode":  # one token: the tokens range is the prefill's
                program_options = replace(options, trt=replace(options.trt, profile_tokens=None))
            if "tensorrt" in names:
                engine_profile(program_options.trt, compiled[name].capture)
            job = ExportJob(
                compiled[name].rewrite.program,
                compiled[name].capture,
                ProgramWriter(writer, name),  # type: ignore[arg-type]
                program_options,
                progress,
            )
            sections[name] = program_record(compiled[name])
            for fmt in chosen:
                with step(progress, f"writing {name} {fmt.name} ({fmt.files})"):
                    sections[name][fmt.name] = fmt.write(job)
        generation = generation_section(programs)
        if "onnx" in names:  # each program says what it is, and for which cache
            for name in PROGRAMS:
                onnx_file = f"{name}/{ONNX_FILE}"
                stamp_metadata(writer.path(onnx_file), program_metadata(name, generation))
                writer.add(onnx_file, "onnx")
        copied = copy_checkpoint_files(loaded.source, writer)
        report = _check_all(
            programs, compiled, writer.staging, names, progress, options.trt.package, True
        )
        writer.path(PARITY_FILE).write_text(json_text(report.to_json()))
        if "tensorrt" in sections["decode"]:  # one token: decode's engine has no tokens axis
            sections["decode"]["tensorrt"].get("profile", {}).pop("tokens", None)
        manifest = {
            "task": TASK,
            "source": source_record(loaded),
            "generation": generation,
            "checkpoint_files": copied,
            "programs": sections,
            "formats": names,
            "parity": {
                "passed": report.passed,
                "programs": {n: parity_summary(r) for n, r in report.programs.items()},
                "generation": {
                    b.stage: {"executed": b.executed, "passed": b.passed} for b in report.generation
                },
            },
        }
        manifest = writer.publish(manifest, extra_files=(PARITY_FILE,))
        progress(f"wrote {out}")
    return manifest, report


def generation_section(programs: GenerationPrograms) -> dict[str, Any]:
    """What a runtime reads from the manifest to drive the loop (``check`` holds a
    folder's to what the model gives, so a runtime is never fed edited values)."""
    past, present = cache_names(programs.layers)
    return {
        "max_cache_len": programs.max_cache_len,
        "cache_layers": programs.layers,
        "eos_token_ids": sorted(programs.eos),
        "inputs": {"prefill": ["input_ids"], "decode": ["input_ids", "position_ids", *past]},
        "outputs": ["logits", *present],
    }


def program_record(compiled: Compiled) -> dict[str, Any]:
    return {
        "capture": compiled.capture.to_json(),
        "memory_layers": compiled.layer_table,
        "passes": compiled.rewrite.log_json(),
        "ops": {
            "before": op_counts(compiled.capture.program),
            "after": op_counts(compiled.rewrite.program),
        },
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


def check_generation(
    loaded: LoadedModel,
    directory: Path,
    progress: ProgressFn = no_progress,
    native_code: bool = False,
) -> GenerationReport:
    """Re-run parity of a generation export in ``directory`` against ``loaded``."""
    manifest = read_manifest(directory)
    verify_artifacts(directory, manifest)
    formats = manifest_formats(manifest, directory, tuple(f"{p}/" for p in PROGRAMS))
    check_same_model(loaded, manifest, directory)
    try:
        programs = build_programs(loaded, recorded_cache_len(manifest, directory))
    except GenerationError as exc:
        raise ArtifactError(f"{directory}: {exc}") from None
    if manifest.get("generation") != generation_section(programs):
        raise ArtifactError(
            f"{directory}: its manifest's generation section (cache, end tokens, tensor "
            "names) is not what this model gives; export again"
        )
    if not isinstance(manifest.get("programs"), dict) or set(manifest["programs"]) != set(PROGRAMS):
        raise ArtifactError(f"{directory}: its manifest does not list prefill and decode")
    compiled = {}
    for name in PROGRAMS:
        progress(f"{name} program:")
        compiled[name] = compile_model(programs.loaded(name), progress)
    return _check_all(programs, compiled, directory, formats, progress, None, native_code)
