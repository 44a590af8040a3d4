"""Foreign memory layers compiled from a batch-1, one-token example.

Capture widens such an example to 2 (torch.export specialises sizes of 1), so the graph's
dims are symbolic while the example's are 1: every size the passes read must come from
what the capture traced, or a 1 is baked into a reshape that breaks every other batch.
For a representative case of each family: the compiled program fuses what the example of
the case fuses, and agrees with the original module on the batch-1 one-token example, on
batch 1 and on one token alone, and on a larger size.
"""

from __future__ import annotations

import pytest
import torch

from ultramem.compiler.pipeline import compile_model
from ultramem.compiler.rewrite import op_counts
from ultramem.models.builtin import LoadedModel
from ultramem.tests.foreign.cases import CASES_BY_ID

FAMILIES = [
    "pypi-pkm-defaults",
    "authors-v1-buffers",
    "authors-v2-shared-table",
    "xlm-hashing-memory",
    "compile-checks-pkm",
    "ultramem-one-einsum",
    "lingua-peer-gelu-variant",
    "peer-block-glu-three-heads",
    "praxis-peer-offset-heads",
]


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


@pytest.mark.parametrize("case_id", FAMILIES)
def test_a_one_token_batch_one_example_fuses_and_serves_every_size(case_id: str) -> None:
    case = CASES_BY_ID[case_id]
    model, _ = case.build()
    example = case.make_inputs(1, 1)
    compiled = compile_model(LoadedModel(model, example, case_id, {}))
    table = compiled.layer_table
    assert table and all(e["fused"] == ["selection", "aggregation"] for e in table), table
    # heads looped in Python are several lookups pooled by one aggregate per memory layer
    assert op_counts(compiled.rewrite.program)["ultramem.aggregate"] == case.memory_layers
    assert not compiled.rewrite.rolled_back, compiled.rewrite.rolled_back
    fused = compiled.rewrite.program.module()
    for batch, tokens in ((1, 1), (1, 6), (3, 1), (2, 9)):
        inputs = example if (batch, tokens) == (1, 1) else case.make_inputs(batch, tokens)
        with torch.no_grad():
            want, got = _first(model(*inputs)), _first(fused(*inputs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
