"""fuse_memory_lookup on memory layers the compiler's authors did not write.

Each model in ``foreign_models`` is captured, rewritten and compared with the *original*
module (not its capture) on batch/sequence sizes other than the example's. A memory
layer counts as fused only when its whole lookup became one ``ultramem::retrieve`` +
``ultramem::aggregate`` pair: no top-k, gather, scatter, table read or SVD left, nothing
rolled back, parity passed with no selection flipped. Look-alikes with other semantics
fuse only the part they share with a lookup (the rest is reported, with its reason), and
models without a memory layer must come out numerically unchanged.
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
    res = rewrite(model, cap, (x,))
    return cap, res, res.fusion


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


LOOKALIKES = [
    # score² weights: the selection and a weighted sum are both there; the square stays
    # as graph glue between the two ops
    pytest.param("squared", {"selection", "aggregation"}, id="squared"),
    # the final top-k runs over the grid's diagonal: no grid of candidates, no anchor
    pytest.param("diagonal", set(), id="diagonal"),
    # the rows are averaged, the scores ignored: a selection, but no weighted pooling
    pytest.param("mean", {"selection"}, id="mean"),
]


@pytest.mark.parametrize(("variant", "fused_parts"), LOOKALIKES)
def test_lookalike_with_other_semantics_fuses_only_what_it_shares(
    variant: str, fused_parts: set[str]
) -> None:
    model = fm.LookalikeLayer(variant).eval()
    _, res, fuse = _fuse(model, torch.randn(2, 16, 32))
    assert not res.rolled_back and not res.disabled_passes
    lookups = fuse.to_json().get("details", {}).get("lookups", {})  # as the pass log has it
    got = {part for entry in lookups.values() for part, d in entry.items() if d["fused"]}
    assert got == fused_parts, fuse.to_json()
    # what was not fused is reported with its reason
    for entry in lookups.values():
        for part, d in entry.items():
            assert d["fused"] or d["reason"], (part, d)
    counts = op_counts(res.program)
    assert counts.get("ultramem.retrieve", 0) == ("selection" in fused_parts), counts
    assert counts.get("ultramem.aggregate", 0) == ("aggregation" in fused_parts), counts
    fused = res.program.module()
    for batch, tokens in OTHER_SIZES:
        x = torch.randn(batch, tokens, 32)
        if fused_parts:
            torch.testing.assert_close(_run(fused, x), _run(model, x), atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(_run(fused, x), _run(model, x))


@pytest.mark.parametrize("build", [fm.PlainBlock, fm.TopkRouterBlock], ids=["plain", "router"])
def test_model_without_memory_layer_passes_through_unchanged(
    build: Callable[[], nn.Module],
) -> None:
    model = build().eval()
    cap, res, fuse = _fuse(model, torch.randn(2, 16, 32))
    assert res.fused_layers == [] and fuse.matched == [] and fuse.refused == []
    assert "no memory lookup" in fuse.details["note"]
    # nothing else changes; a router's einsum with its weight becomes one mm (its own pass)
    rewritten = next(p for p in res.passes if p.name == "einsum_weights_to_matmul")
    before, after = op_counts(cap.program), op_counts(res.program)
    if rewritten.changed:
        assert before.pop("einsum") == len(rewritten.changed) == after.pop("mm")
        for view in ("reshape", "sym_size.int", "permute"):
            before.pop(view, None), after.pop(view, None)
    assert after == before
    fused = res.program.module()
    for batch, tokens in OTHER_SIZES:
        x = torch.randn(batch, tokens, 32)
        if rewritten.changed:  # the same sums, associated as one GEMM
            torch.testing.assert_close(_run(fused, x), _run(model, x), atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(_run(fused, x), _run(model, x))
