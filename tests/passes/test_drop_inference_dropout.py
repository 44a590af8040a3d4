"""``drop_inference_dropout``: dropout in eval mode leaves the graph, including a dropout
whose output nothing reads (dead-code removal keeps random ops); training-mode dropout
stays. The reference is the module itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.passes.base import PassContext
from ultramem.passes.drop_inference_dropout import drop_inference_dropout


class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.drop(x * 3)  # computed and dropped, as PEER-pytorch does
        kept = F.dropout(x, 0.5, training=True)  # random: must stay
        return self.drop(x) + 1, kept


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_inference_dropout_leaves_the_graph_and_training_dropout_stays() -> None:
    model = Dropouts().eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    gm = torch.export.export(model, (x,)).module()
    before = sum("dropout" in t for t in _targets(gm))
    result = drop_inference_dropout(gm, PassContext((x,)))
    assert before == 3 and len(result.changed) == 2, (before, result.changed)
    assert sum("dropout" in t for t in _targets(gm)) == 1
    out, kept = gm(x)
    torch.testing.assert_close(out, x + 1, atol=0, rtol=0)
    assert ((kept == 0) | (kept == 2 * x)).all()  # the training dropout still drops
