"""A sort beside a lookup: ONNX writes ``aten.sort`` as a TopK over the whole axis, and
parity must not take it for a lookup's top-k (it would misalign every selection after it).

The model is a Mixture-of-Depths router (``topk(sorted=False)``, ``sort`` of the chosen
token indices, gather, scatter_add: no lookup) in front of a product-key memory; its ONNX
export runs in ONNX Runtime and is compared with the original module, selections included.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from ultramem.compiler.formats import ExportOptions
from ultramem.compiler.onnx.runner import OnnxRunner
from ultramem.compiler.pipeline import compile_model, export_model
from ultramem.models.builtin import LoadedModel
from ultramem.tests.passes.foreign_models import PKMStyle


class DepthRouter(nn.Module):
    """Half the tokens through an MLP, picked by a router, written back in token order."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.router = nn.Linear(dim, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        capacity = x.shape[1] // 2
        logits = self.router(x).squeeze(-1)
        weights, chosen = torch.topk(logits, capacity, dim=1, sorted=False)
        chosen, order = torch.sort(chosen, dim=1)
        weights = torch.gather(weights, 1, order)
        index = chosen.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        routed = self.mlp(torch.gather(x, 1, index)) * torch.sigmoid(weights).unsqueeze(-1)
        return x.scatter_add(1, index, routed)


class RouterThenMemory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = DepthRouter()
        self.memory = PKMStyle(embedding_bag=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.memory(self.router(x))


def test_a_sort_beside_a_lookup_leaves_its_selections_aligned(tmp_path: Path) -> None:
    model = RouterThenMemory().eval()
    example = (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1)),)
    loaded = LoadedModel(model, example, "router-then-memory", {})
    compiled = compile_model(loaded)
    assert "selection" in compiled.layer_table[0]["fused"], compiled.layer_table
    _, report = export_model(
        loaded, tmp_path / "out", formats=("onnx",), options=ExportOptions(), compiled=compiled
    )
    assert report.passed, "\n".join(report.summary_lines())
    [stage] = [s for s in report.stages if s.stage == "onnxruntime-cpu"]
    assert stage.selections and all(s.differing == 0 for s in stage.selections)
    assert sum(s.rows for s in stage.selections) > 0
    # the file does hold the sort as a TopK; the runner leaves it out of the sites
    [path] = (tmp_path / "out").glob("*.onnx")
    topks = [
        n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "TopK"
    ]
    assert len(topks) == 2 == 1 + sum(s.kind == "topk" for s in OnnxRunner(path).sites)
