"""The binder's named rules and its tracer, as ``ultramem inspect`` reports them: a refused
lookup says the furthest rule its binding reached and why it failed there; a fused one
reports no failure. The models are in ``rule_models.py``."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from ultramem.cli.main import cli
from ultramem.compiler.capture import capture
from ultramem.compiler.inspection import fused_layer_table
from ultramem.compiler.rewrite import op_counts, rewrite
from ultramem.passes._lookup.rules import Failure, NotALookup, RuleTracer, furthest
from ultramem.tests.passes import rule_models

MODELS = "ultramem.tests.passes.rule_models"


def _inspect(factory: str, *options: str) -> Any:
    result = CliRunner().invoke(cli, ["inspect", *options, f"{MODELS}:{factory}"])
    assert result.exit_code == 0, result.output
    return result.stdout


def _layers(factory: str) -> list[dict[str, Any]]:
    return json.loads(_inspect(factory, "--json"))["memory_layers"]


def test_a_refused_selection_reports_the_furthest_rule_and_its_failure() -> None:
    [layer] = _layers("max_grid")
    assert layer["fused"] == []
    selection = layer["selection"]
    # the reason the binder always gave is kept as it was; the tracer's fields are added
    assert selection["reason"].startswith("no binding of ultramem::retrieve reproduces")
    assert selection["furthest_rule"] == "output_proof"
    assert "equals" in selection["furthest_reason"] and selection["furthest_node"]
    assert layer["aggregation"] == {"reason": "selection not fused"}


def test_a_selection_refused_at_the_first_rule_says_so_in_the_text_report() -> None:
    text = _inspect("returns_positions")
    [line] = [x for x in text.splitlines() if "selection NOT fused" in x]
    assert "the model returns the grid positions" in line
    assert line.endswith("(got as far as rule selection_outputs)"), line


def test_a_refused_aggregation_reports_its_rule_and_the_fused_selection_none() -> None:
    model, example = rule_models.topk_then_mean()
    res = rewrite(model, capture(model, example, max_tokens=64), example)
    [entry] = fused_layer_table(res)
    assert entry["fused"] == ["selection"]
    assert "furthest_rule" not in entry["selection"] and "reason" not in entry["selection"]
    assert entry["aggregation"]["furthest_rule"] == "aggregation_proof"
    assert entry["aggregation"]["furthest_node"] == entry["aggregation"]["reason"].split()[-1]
    counts = op_counts(res.program)
    assert counts.get("ultramem.retrieve") == 1 and "ultramem.aggregate" not in counts
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(res.program.module()(x), model(x), atol=1e-6, rtol=1e-6)


def test_a_fused_lookup_reports_no_failure() -> None:
    [layer] = _layers("fused_layer")
    assert layer["fused"] == ["selection", "aggregation"]
    for part in ("selection", "aggregation"):
        assert not {"reason", "furthest_rule", "furthest_reason"} & set(layer[part]), layer[part]
    assert layer["selection"]["grid"] in ("rows outer", "rows inner")


RULES = ("first", "second", "third")


@pytest.mark.parametrize(
    ("failures", "want"),
    [
        ([], None),
        ([Failure("second", "a"), Failure("first", "b")], Failure("second", "a")),
        ([Failure("second", "a"), Failure("second", "b")], Failure("second", "a")),  # first kept
        ([Failure("first", "a"), Failure("third", "c")], Failure("third", "c")),
    ],
)
def test_the_tracer_keeps_the_first_failure_at_the_furthest_rule(
    failures: list[Failure], want: Failure | None
) -> None:
    assert furthest(failures, RULES) == want


def test_a_helpers_refusal_inside_a_rule_keeps_its_reason_and_records_the_rule() -> None:
    tracer = RuleTracer(RULES)
    tracer.record(Failure("first", "earlier"))
    with pytest.raises(NotALookup) as raised, tracer.rule("second"):
        raise NotALookup("the helper's own words")
    assert str(raised.value) == "the helper's own words"
    assert raised.value.furthest == Failure("second", "the helper's own words")
