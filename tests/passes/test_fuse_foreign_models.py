"""fuse_memory_lookup on memory layers the compiler's authors did not write.

Each model in ``foreign_models`` is captured, rewritten and compared with the *original*
module (not its capture) on batch/sequence sizes other than the example's. A memory
layer counts as fused only when its whole lookup became one ``ultramem::retrieve`` +
``ultramem::aggregate`` pair: no top-k, gather, scatter, table read or SVD left, nothing
rolled back, parity passed with no selection flipped. Look-alikes with other semantics
and models without a memory layer must come out numerically unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ultramem.compiler.capture import CaptureResult, capture
from ultramem.compiler.parity.compare import ParityReport
from ultramem.compiler.parity.selections import memory_layer_names
from ultramem.compiler.rewrite import RewriteResult, op_counts, rewrite
from ultramem.passes.base import PassResult
from ultramem.tests.passes import foreign_models as fm

# ops a fused lookup must not leave behind (the LM's token `embedding` is legitimate)
LOOKUP_OPS = (
    "topk",
    "gather",
    "scatter",
    "index.Tensor",
    "index_select",
    "take_along_dim",
    "embedding_bag",
    "_embedding_bag",
    "svd",
    "linalg_svd",
)
OTHER_SIZES = ((1, 5), (3, 11))  # (batch, tokens), neither is the example's (2, 16)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    width: int  # model dim D, or the vocabulary size for token-id models
    memory_layers: int
    token_ids: bool = False

    def inputs(self, batch: int, tokens: int) -> torch.Tensor:
        if self.token_ids:
            return torch.randint(0, self.width, (batch, tokens))
        return torch.randn(batch, tokens, self.width)


POSITIVE = [
    pytest.param(Case(fm.AuthorsV1Loops, 48, 1), id="authors-v1-loops"),
    pytest.param(Case(fm.PyPIStyle, 32, 1), id="pypi-ultra-mem"),
    pytest.param(Case(fm.BmmStyle, 32, 1), id="bmm-per-core-tables"),
    pytest.param(Case(fm.PKMStyle, 32, 1), id="pkm-embedding-bag"),
    pytest.param(
        Case(lambda: fm.PKMStyle(embedding_bag=False), 32, 1),
        id="pkm-gather-sum",
    ),
    pytest.param(Case(lambda: fm.LookalikeLayer("plain"), 32, 1), id="lookalike-control"),
    pytest.param(Case(fm.TinyMemoryLM, 64, 3, token_ids=True), id="tiny-lm-three-authors"),
]


def _fuse(model: nn.Module, x: torch.Tensor) -> tuple[CaptureResult, RewriteResult, PassResult]:
    cap = capture(model, (x,), max_tokens=256)
    res = rewrite(model, cap, (x,), memory_layer_names(cap.program.graph))
    fuse = next(p for p in res.passes if p.name == "fuse_memory_lookup")
    return cap, res, fuse


def _differing_selections(report: ParityReport) -> int:
    return sum(c.differing for stage in report.stages for c in stage.selections)


def _run(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # research code writes into preallocated buffers with out=, which autograd refuses
    with torch.no_grad():
        return fn(x)


@pytest.mark.parametrize("case", POSITIVE)
def test_foreign_memory_layers_fuse_and_match_the_original(case: Case) -> None:
    model = case.build().eval()
    cap, res, fuse = _fuse(model, case.inputs(2, 16))
    assert len(memory_layer_names(cap.program.graph)) == case.memory_layers
    refusals = "; ".join(str(r) for r in fuse.refused)
    assert len(res.fused_layers) == case.memory_layers, f"refused: {refusals}"
    assert not res.rolled_back, res.rolled_back
    counts = op_counts(res.program)
    assert counts.get("ultramem.retrieve", 0) == case.memory_layers, counts
    assert not [op for op in counts if op.startswith(LOOKUP_OPS)], counts
    assert res.parity is not None and res.parity.passed, "\n".join(res.parity.summary_lines())
    assert _differing_selections(res.parity) == 0, "\n".join(res.parity.summary_lines())
    fused = res.program.module()
    for batch, tokens in OTHER_SIZES:
        x = case.inputs(batch, tokens)
        torch.testing.assert_close(_run(fused, x), _run(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["squared", "diagonal", "mean"])
def test_lookalike_with_other_semantics_is_refused_and_left_exact(variant: str) -> None:
    model = fm.LookalikeLayer(variant).eval()
    cap, res, fuse = _fuse(model, torch.randn(2, 16, 32))
    assert res.fused_layers == [] and not res.rolled_back
    # every lookup-like site the pass found is reported with its reason
    assert set(fuse.matched) <= {r.node for r in fuse.refused}, fuse.to_json()
    counts = op_counts(res.program)
    assert "ultramem.retrieve" not in counts, counts
    assert counts.get("topk") == op_counts(cap.program).get("topk") == 3, counts
    fused = res.program.module()
    for batch, tokens in OTHER_SIZES:
        x = torch.randn(batch, tokens, 32)
        assert torch.equal(_run(fused, x), _run(model, x))


@pytest.mark.parametrize("build", [fm.PlainBlock, fm.TopkRouterBlock], ids=["plain", "router"])
def test_model_without_memory_layer_passes_through_unchanged(
    build: Callable[[], nn.Module],
) -> None:
    model = build().eval()
    cap, res, fuse = _fuse(model, torch.randn(2, 16, 32))
    assert res.fused_layers == [] and fuse.matched == [] and fuse.refused == []
    assert "no memory lookup" in fuse.details["note"]
    assert op_counts(res.program) == op_counts(cap.program)
    fused = res.program.module()
    for batch, tokens in OTHER_SIZES:
        x = torch.randn(batch, tokens, 32)
        assert torch.equal(_run(fused, x), _run(model, x))
