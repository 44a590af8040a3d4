"""Greedy generation through each backend's decoder program, against ``generate``.

The reference is ``transformers``' own ``generate`` on the original model (greedy, its
default dynamic cache, stopping at the checkpoint's end-of-sequence tokens), recorded with
the same dispatch mode as every parity run, so the slots each memory layer selected at
each step are known. A backend is a parity stage of the decoder (``onnxruntime-cpu``): the
prompt from an empty cache, then one token at a time, feeding each step the cache the one
before returned, with the same stopping rule.

Per prompt: the generated tokens must equal the reference's exactly (in half precision
they may part where the reference's own logits for the two tokens are closer than the
dtype resolves: a near-tie of the greedy choice, counted); each step's logits (of the
last position) are compared with the usual tolerances, and each memory layer's selections
per step, up to the first differing token (after it the contexts differ).
Prompts run one per call (batch 1): sequences of a batch share one cache position.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import first_line
from ..parity.compare import (
    OutputComparison,
    SelectionComparison,
    StageReport,
    Tolerance,
    compare_outputs,
)
from ..parity.selections import SitePlan, SiteRecord, run_recording_sites
from ..parity.stages import Stage, compare_lookups
from .programs import GenerationProgram, decoder_inputs

NEW_TOKENS = 8


@dataclass
class Generated:
    tokens: list[int]
    logits: list[Tensor]  # per step, the last position's [1, vocab]
    records: list[list[SiteRecord]]  # per step, the sites it ran


@dataclass
class PromptResult:
    prompt_tokens: int
    reference: list[int]
    generated: list[int]
    # half precision: the step where the tokens parted at a near-tie of the reference's
    # own logits (its choice and the backend's within the dtype's resolution)
    near_tie_at: int | None = None

    @property
    def exact(self) -> bool:
        return self.reference == self.generated

    @property
    def agrees(self) -> bool:
        return self.exact or self.near_tie_at is not None


@dataclass
class BackendReport(StageReport):
    """A stage's greedy generation: each prompt's tokens, and per step the last
    position's logits (``outputs``) and each memory layer's selections."""

    prompts: list[PromptResult] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        if not self.executed:
            return None
        checks = self.outputs + self.selections
        return (
            bool(self.prompts)
            and all(p.agrees for p in self.prompts)
            and all(c.passed for c in checks)
        )

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["logits"] = out.pop("outputs")  # what a generation step's outputs are
        for entry, prompt in zip(out["prompts"], self.prompts, strict=True):
            entry["exact"] = prompt.exact
        return out

    def summary_line(self) -> str:
        if not self.executed:
            return f"SKIPPED | generation {self.stage} | {self.reason}"
        exact = sum(p.exact for p in self.prompts)
        ties = sum(not p.exact and p.near_tie_at is not None for p in self.prompts)
        worst = max((c.max_abs for c in self.outputs), default=0.0)
        differing = sum(c.differing for c in self.selections)
        rows = sum(c.rows for c in self.selections)
        parted = f" ({ties} parted at a near-tie of the logits)" if ties else ""
        return (
            f"{'PASSED' if self.passed else 'FAILED'} | generation {self.stage} | "
            f"{exact}/{len(self.prompts)} prompts token-exact{parted}, {len(self.outputs)} "
            f"steps' logits max_abs={worst:.3g} | selections: {differing}/{rows} differ"
        )


def prompts_for(max_cache_len: int, vocab: int, seed: int = 0) -> list[tuple[Tensor, int]]:
    """(prompt [1, T], new tokens): one token, a short prompt, and one that fills the cache."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in sorted({1, min(5, max_cache_len - 1), max(1, max_cache_len - 4)}):
        new = min(NEW_TOKENS, max_cache_len - length)
        out.append((torch.randint(0, vocab, (1, length), generator=gen), new))
    return out


def reference_generation(
    model: torch.nn.Module, prompt: Tensor, new_tokens: int, eos: Collection[int],
    sites: tuple[int, int],
) -> Generated:  # fmt: skip
    """``generate`` (greedy) on the original model; ``sites`` = sites per call on the
    prompt and per later step, to split its recorded sites by step."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=sorted(eos) or None,
        pad_token_id=min(eos) if eos else 0,
    )

    def run() -> Any:
        with torch.no_grad():
            return model.generate(
                prompt, generation_config=config, output_logits=True, return_dict_in_generate=True
            )

    # generate fills what a given config leaves at its defaults from the checkpoint's
    # (a repetition penalty, sampling): plain greedy needs none there
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out, records = run_recording_sites(run, ())
    finally:
        model.generation_config = saved
    tokens = out.sequences[0, prompt.shape[1] :].tolist()
    steps, start = [], 0
    for step in range(len(tokens)):
        count = sites[0] if step == 0 else sites[1]
        steps.append(records[start : start + count])
        start += count
    if start != len(records):
        steps = [[] for _ in tokens]  # not aligned: say so at comparison
    return Generated(tokens, [x.float() for x in out.logits], steps)


def backend_generation(
    stage: Stage, program: GenerationProgram, prompt: Tensor, new_tokens: int,
    eos: Collection[int],
) -> Generated:  # fmt: skip
    assert stage.run is not None
    outputs, records = stage.run(
        decoder_inputs(prompt, 0, program.empty_cache(prompt.shape[0])), []
    )
    result = Generated([], [outputs[0][:, -1].float()], [records])
    while True:
        token = int(result.logits[-1].argmax(-1)[0])
        result.tokens.append(token)
        if token in eos or len(result.tokens) == new_tokens:
            return result
        ids = torch.tensor([[token]])
        position = prompt.shape[1] + len(result.tokens) - 1
        outputs, records = stage.run(decoder_inputs(ids, position, tuple(outputs[1:])), [])
        result.logits.append(outputs[0][:, -1].float())
        result.records.append(records)


def _compare_steps(
    report: BackendReport, index: int, reference: Generated, candidate: Generated,
    plan: SitePlan, stage_plan: SitePlan, tol: Tolerance,
) -> None:  # fmt: skip
    steps = min(len(reference.tokens), len(candidate.tokens))
    for step in range(steps):
        tag = f"prompt {index} step {step}"
        report.outputs.append(
            compare_outputs(f"logits @ {tag}", reference.logits[step], candidate.logits[step], tol)
        )
        if not reference.records[step] and plan.names:
            problem = "the reference's selections could not be split into steps"
            report.selections.append(SelectionComparison(f"all @ {tag}", 0, 0, 0, False, problem))
        else:
            report.selections += compare_lookups(
                tag, reference.records[step], plan, candidate.records[step], stage_plan, tol,
            )  # fmt: skip
        if reference.tokens[step] != candidate.tokens[step]:
            if _near_tie(
                reference.logits[step], reference.tokens[step], candidate.tokens[step], tol
            ):
                report.prompts[-1].near_tie_at = step
            break  # the contexts differ from here on


def _near_tie(logits: Tensor, chosen: int, other: int, tol: Tolerance) -> bool:
    """Half precision: whether the reference's own logits for its token and the backend's
    are closer than the dtype resolves at their magnitude (the greedy choice was a tie
    there: no two backends round alike). Never in fp32, where tokens must be equal."""
    if tol.resolution is None:
        return False
    row = logits.reshape(-1).float()
    gap = float(row[chosen] - row[other])
    return gap <= tol.resolution * float(row.abs().max())


def run_generation_parity(
    program: GenerationProgram,
    stages: Sequence[Stage],
    prompts: list[tuple[Tensor, int]],
    plan: SitePlan,
    tol: Tolerance,
) -> list[BackendReport]:
    """Each stage's greedy generation of every prompt against ``generate``'s; ``plan``
    is the reference's sites per call of the decoder."""
    sites = len(plan.sites)
    references = [
        reference_generation(program.model, p, n, program.eos, (sites, sites)) for p, n in prompts
    ]
    reports = []
    for stage in stages:
        report = BackendReport.of(stage.name, None if stage.run is not None else stage.reason)
        reports.append(report)
        if stage.run is None:
            continue
        stage_plan = stage.plan or plan
        for index, ((prompt, new), reference) in enumerate(zip(prompts, references, strict=True)):
            try:
                candidate = backend_generation(stage, program, prompt, new, program.eos)
            except Exception as exc:  # a runtime's own error: this backend fails
                message = f"generation raised {type(exc).__name__}: {first_line(exc, 300)}"
                inf = float("inf")
                report.outputs.append(
                    OutputComparison(f"prompt {index}", [], inf, inf, 0.0, 0, inf, False, message)
                )
                break
            report.prompts.append(PromptResult(prompt.shape[1], reference.tokens, candidate.tokens))
            _compare_steps(report, index, reference, candidate, plan, stage_plan, tol)
    return reports
