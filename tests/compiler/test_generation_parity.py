"""Generation parity: a backend whose decode is off by a little is caught, an exact one
passes, and the reference's selections are split per step (compared, not skipped), and the
checkpoint's own sampling defaults (a repetition penalty) stay out of the greedy reference.

The decoder program runs eagerly here (a torch stage of its module), against
``transformers``' ``generate`` on the checkpoint's model; the wrong backend is the same
program over a copy of the model with its output head nudged by 1e-3 for single steps
only (its prompts are exact).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ultramem.compiler.capture import capture
from ultramem.compiler.generation.decoding import prompts_for, run_generation_parity
from ultramem.compiler.generation.programs import build_program
from ultramem.compiler.loading import load_model
from ultramem.compiler.parity.compare import tolerance_for
from ultramem.compiler.parity.selections import site_plan
from ultramem.compiler.parity.stages import torch_stage
from ultramem.tests.cli.hf import checkpoints


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    directory = checkpoints.memory_fork(tmp_path_factory.mktemp("fork"))
    loaded = load_model(f"hf:{Path(directory)}", trust_remote_code=True)
    return build_program(loaded, 16)


def _plan(program):  # type: ignore[no-untyped-def]
    spec = program.metadata["program_spec"]
    return site_plan(capture(program.model, program.example_inputs, spec=spec).program.graph)


def test_an_exact_backend_passes_and_a_nudged_one_fails(program) -> None:  # type: ignore[no-untyped-def]
    plan = _plan(program.decoder)
    assert len(plan.names) == 2
    exact_module = program.decoder.model
    nudged = copy.deepcopy(exact_module)
    with torch.no_grad():
        nudged.model.lm_head.weight.add_(1e-3)

    def steps_nudged(*inputs):  # type: ignore[no-untyped-def]
        return (nudged if inputs[0].shape[1] == 1 and int(inputs[2][0, 0]) > 0 else exact_module)(
            *inputs
        )

    stages = [torch_stage("exact", exact_module), torch_stage("nudged", steps_nudged)]
    prompts = prompts_for(program.max_cache_len, 128)
    # a checkpoint's sampling defaults must not leak into the greedy reference
    config = program.model.generation_config
    config.do_sample, config.repetition_penalty, config.top_k = True, 3.0, 4
    assert [p.shape[1] for p, _ in prompts] == [1, 5, 12]
    assert all(p.shape[1] + n <= program.max_cache_len for p, n in prompts)
    exact, wrong = run_generation_parity(
        program, stages, prompts, plan, tolerance_for(torch.float32)
    )
    assert exact.passed, exact.summary_line()
    assert all(p.exact for p in exact.prompts)
    steps = sum(len(p.generated) for p in exact.prompts)
    assert len(exact.outputs) == steps and max(c.max_abs for c in exact.outputs) <= 1e-4
    # every step's selections compared, per memory layer: two layers per step
    assert len(exact.selections) == 2 * steps and all(c.rows > 0 for c in exact.selections)
    assert not wrong.passed
    failed = [c for c in wrong.outputs if not c.passed]
    assert failed and all("step 0" not in c.name for c in failed)  # its prompts are exact


def test_half_precision_tokens_may_part_only_at_a_near_tie_of_the_reference_logits() -> None:
    from ultramem.compiler.generation.decoding import PromptResult, _near_tie
    from ultramem.compiler.parity.compare import TOLERANCES

    bf16, fp32 = TOLERANCES[torch.bfloat16], TOLERANCES[torch.float32]
    logits = torch.tensor([[8.0, 7.9, 2.0, -1.0]])  # bf16 resolves 0.5 at 8.0
    assert _near_tie(logits, 0, 1, bf16)  # 0.1 apart: a tie the dtype cannot decide
    assert not _near_tie(logits, 0, 2, bf16)  # 6.0 apart: a wrong token
    assert not _near_tie(logits, 0, 1, fp32)  # fp32: tokens must be equal
    parted = PromptResult(3, [5, 6, 7], [5, 9, 9], near_tie_at=1)
    wrong = PromptResult(3, [5, 6, 7], [5, 9, 9])
    assert parted.agrees and not parted.exact and not wrong.agrees
