"""Capture: dynamic batch/tokens, and the fallback when a model pins a dimension."""

from __future__ import annotations

import torch
from torch import nn

from ultramem.compiler.capture import STRICT_NOTE, DynamicAxis, ProgramSpec, capture, recapture
from ultramem.compiler.parity.selections import (
    layer_selections,
    memory_layer_names,
    run_recording_sites,
    site_plan,
)
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM


class PinsTokens(nn.Module):
    """Research-code habit: a reshape to the training sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(x.shape[0], 16, 8)


def test_lm_captures_with_named_dynamic_axes_and_matches_on_other_sizes() -> None:
    cfg = LMConfig(memory=UltraMemConfig(heads=2, cores=2, expansion=4), memory_layers={0: 1})
    model = UltraMemLM(cfg).eval()
    result = capture(model, (torch.randint(0, 64, (2, 16)),), max_tokens=cfg.max_seq_len)
    assert [(a.name, a.mode, a.min, a.max) for a in result.axes] == [
        ("batch", "named", 1, 64),
        ("tokens", "named", 1, cfg.max_seq_len),
    ]
    assert memory_layer_names(result.program.graph) == ["memories.0"]
    x = torch.randint(0, 64, (3, 37))
    ref, ref_records = run_recording_sites(model, (x,))
    out, records = run_recording_sites(result.program.module(), (x,))
    assert torch.equal(ref, out)
    plan = site_plan(result.program.graph)
    [ref_sel] = layer_selections(ref_records, plan)  # type: ignore[misc]
    assert ref_sel.slots.shape == (3 * 37 * 2, cfg.memory.topk)
    assert torch.equal(ref_sel.slots, layer_selections(records, plan)[0].slots)  # type: ignore[index]
    assert int(ref_sel.slots.max()) < cfg.memory.n_keys**2


def test_pinned_token_dim_falls_back_and_says_why() -> None:
    model = PinsTokens().eval()
    result = capture(model, (torch.randn(2, 16, 8),))
    assert any("named batch/tokens dims refused" in note for note in result.notes)
    tokens = result.axis(0, "tokens")
    batch = result.axis(0, "batch")
    assert tokens is not None and not tokens.dynamic and tokens.min == tokens.max == 16
    assert batch is not None and batch.dynamic  # batch stayed free under Dim.AUTO
    x = torch.randn(5, 16, 8)
    assert torch.equal(result.program.module()(x), model(x))


class LenOfFlattened(nn.Module):
    """XLM's and lingua's memory code: ``bs = len(query)`` of the flattened tokens, used
    in views. Run as Python (non-strict tracing) that ``len`` is a constant, pinning
    batch × tokens to the example's; strict tracing keeps it symbolic."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.proj(x).reshape(-1, 8)
        bs = len(query)
        halves = query.view(bs, 2, 4).topk(2, dim=-1).values.reshape(bs, 4)
        return halves.view(*x.shape[:-1], 4)


def test_len_of_a_dynamic_dim_is_captured_dynamic_by_strict_tracing() -> None:
    model = LenOfFlattened().eval()
    result = capture(model, (torch.randn(2, 16, 8),))
    assert STRICT_NOTE in result.notes, result.notes
    for name in ("batch", "tokens"):
        axis = result.axis(0, name)
        assert axis is not None and axis.mode == "named", result.notes
    for shape in ((1, 1, 8), (3, 5, 8)):
        x = torch.randn(shape)
        assert torch.equal(result.program.module()(x), model(x))


def test_a_programs_own_axes_fall_back_to_strict_tracing_too() -> None:
    model = LenOfFlattened().eval()
    inputs = [(torch.randn(2, 6, 8),), (torch.randn(1, 1, 8),), (torch.randn(3, 4, 8),)]
    axes = [DynamicAxis(0, 0, "batch", 1, 8, "named"), DynamicAxis(0, 1, "tokens", 1, 32, "named")]
    spec = ProgramSpec(axes, inputs, ["x"], ["y"])
    result = capture(model, inputs[0], spec=spec)
    assert result.notes == [STRICT_NOTE] and result.inputs == inputs
    for (x,) in inputs:
        assert torch.equal(result.program.module()(x), model(x))


def test_a_batch_one_example_keeps_batch_free_from_one_when_tokens_are_pinned() -> None:
    model = PinsTokens().eval()
    example = torch.randn(1, 16, 8)
    result = capture(model, (example,))
    batch = result.axis(0, "batch")
    assert batch is not None and (batch.mode, batch.min) == ("named", 1), result.axes
    for x in (example, torch.randn(4, 16, 8)):
        assert torch.equal(result.program.module()(x), model(x))


class BranchesOnBatch(nn.Module):
    """Eager code that runs at any batch but branches on it: ``Dim.AUTO`` specialises batch
    to whatever the traced example had, and tokens are pinned by a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x).reshape(x.shape[0], 16, 8)
        return y * 2 if x.shape[0] == 2 else y - 1


def test_a_fallback_keeps_the_users_batch_one_not_the_widened_two() -> None:
    model = BranchesOnBatch().eval()
    example = torch.randn(1, 16, 8)
    result = capture(model, (example,))
    assert torch.equal(result.program.module()(example), model(example))
    batch = result.axis(0, "batch")
    assert batch is not None and batch.min is not None and batch.min <= 1, result.axes


def test_recapture_keeps_the_strict_tracing_the_first_capture_needed() -> None:
    model = LenOfFlattened().eval()
    result = capture(model, (torch.randn(2, 16, 8),))
    assert result.strict
    # the model's own Python again: non-strict tracing would pin batch × tokens
    program = recapture(model, result)
    x = torch.randn(3, 5, 8)
    assert torch.equal(program.module()(x), model(x))
