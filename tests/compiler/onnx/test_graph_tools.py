"""Our ONNX files through the graph tools people run on them: onnxslim and
onnx-graphsurgeon (what ``polygraphy surgeon sanitize`` uses).

Both drop the ONNX ``overload`` field. When variants of an op were told apart by it, a
file with two differently-configured memory layers came back with one variant's function
body for both (onnxslim: valid, and silently wrong) or refused by ONNX Runtime ("Duplicate
model-local function"). Variants now have names of their own; each round trip must stay
valid and give what the model gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ultramem.cli.main import run
from ultramem.compiler.onnx.domain import base_op

TWO_VARIANTS = """
import torch
from ultramem.models.config import UltraMemConfig
from ultramem.models.ultramem import UltraMemLayer


class TwoMemories(torch.nn.Module):
    # two memory layers configured differently: two variants of each fused op
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = UltraMemLayer(UltraMemConfig(
            d_model=32, n_keys=8, key_dim=16, value_dim=32, topm=4, topk=4))
        self.b = UltraMemLayer(UltraMemConfig(
            d_model=32, n_keys=8, key_dim=16, value_dim=32, topm=6, topk=3, heads=2,
            score_activation="softmax", expansion=2))

    def forward(self, x):
        h = x + self.a(x)
        return h + self.b(h)


def make():
    return TwoMemories().eval(), (torch.randn(2, 8, 32),)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("variants")
    (root / "two_variants_model.py").write_text(TWO_VARIANTS)
    import sys

    sys.path.insert(0, str(root))
    try:
        import two_variants_model

        assert run(["export", "two_variants_model:make", "--out", str(root / "out")]) == 0
        model, _ = two_variants_model.make()
    finally:
        sys.path.remove(str(root))
    return root / "out" / "model.onnx", model


def _variants(model: onnx.ModelProto) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for node in model.graph.node:
        op = base_op(node)
        if op is not None:
            out.setdefault(op, set()).add(node.op_type)
    return out


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _graphsurgeon(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()  # what `polygraphy surgeon sanitize` does to a graph
    return gs.export_onnx(graph)


@pytest.mark.parametrize("tool", [_slim, _graphsurgeon], ids=["onnxslim", "onnx-graphsurgeon"])
def test_a_round_trip_through_a_graph_tool_stays_valid_and_exact(
    exported: tuple[Path, torch.nn.Module], tool: object
) -> None:
    path, module = exported
    original = onnx.load(str(path))
    variants = _variants(original)
    assert all(len(names) == 2 for names in variants.values()), variants  # the premise
    tooled = tool(onnx.load(str(path)))  # type: ignore[operator]
    onnx.checker.check_model(tooled, full_check=True)
    assert _variants(tooled) == variants
    assert {f.name for f in tooled.functions} >= set().union(*variants.values())
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x).numpy()
    before, after = _run(original, x.numpy()), _run(tooled, x.numpy())
    np.testing.assert_allclose(before, want, atol=1e-5, rtol=1e-5)
    # the tool may reorder or fold; the numbers must be the file's own
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=1e-6)
