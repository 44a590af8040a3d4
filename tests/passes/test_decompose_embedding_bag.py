"""``decompose_embedding_bag``: equal-size bags become a gather and a reduction (what
TensorRT's ONNX parser reads: torch.onnx writes an embedding bag as a Loop over
sequences, which it refuses); anything else is left with its reason."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from ultramem.compiler.capture import capture
from ultramem.compiler.onnx.export import export_onnx
from ultramem.passes.base import PassContext
from ultramem.passes.decompose_embedding_bag import decompose_embedding_bag


class Bags(nn.Module):
    def __init__(self, mode: str, weighted: bool, padding_idx: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.bag = nn.EmbeddingBag(50, 8, mode=mode, padding_idx=padding_idx)
        with torch.no_grad():
            self.bag.weight.copy_(torch.randn(50, 8, generator=gen))
        self.weighted = weighted

    def forward(self, ids: Tensor, weights: Tensor) -> Tensor:
        return self.bag(ids, per_sample_weights=weights if self.weighted else None)


def _inputs(bags: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(bags)
    return torch.randint(0, 50, (bags, 4), generator=gen), torch.rand(bags, 4, generator=gen)


def _graph(model: nn.Module) -> torch.fx.GraphModule:
    bags = Dim("bags", min=2)
    dims = ({0: bags}, {0: bags})
    return torch.export.export(model.eval(), _inputs(3), dynamic_shapes=dims).module()


@pytest.mark.parametrize(
    ("mode", "weighted"), [("sum", True), ("sum", False), ("mean", False), ("max", False)]
)
def test_equal_bags_become_a_gather_and_a_reduction(mode: str, weighted: bool) -> None:
    model = Bags(mode, weighted)
    gm = _graph(model)
    result = decompose_embedding_bag(gm, PassContext(()))
    assert len(result.changed) == 1 and not result.refused
    assert not any("embedding_bag" in str(n.target) for n in gm.graph.nodes)
    for bags in (2, 7):
        ids, weights = _inputs(bags)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, weights), model(ids, weights), atol=1e-6, rtol=1e-6)


def test_a_padding_index_is_left_with_its_reason() -> None:
    gm = _graph(Bags("sum", False, padding_idx=3))
    result = decompose_embedding_bag(gm, PassContext(()))
    assert not result.changed and "padding_idx" in result.refused[0].reason


def test_the_onnx_file_holds_no_loop_over_sequences(tmp_path: Path) -> None:
    from ultramem.compiler.rewrite import rewrite

    model = Bags("sum", True).eval()
    example = _inputs(3)
    captured = capture(model, example)
    program = rewrite(model, captured, example).program
    path = tmp_path / "model.onnx"
    export_onnx(captured, path, program=program)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "SequenceEmpty", "ConcatFromSequence"}, ops
