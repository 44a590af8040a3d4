"""fold_constants: weight-only maths becomes buffers, bit for bit; activations are untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.compiler.capture import capture
from ultramem.compiler.rewrite import op_counts
from ultramem.models.config import UltraMemConfig
from ultramem.models.ultramem import UltraMemLayer, leading_singular_vectors
from ultramem.passes.base import PassContext
from ultramem.passes.fold_constants import fold_constants


def _targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_svd_and_key_norm_fold_exactly_with_the_original_signs() -> None:
    cfg = UltraMemConfig(heads=2, cores=2, expansion=4, rank1_from_svd_in_forward=True)
    layer = UltraMemLayer(cfg).eval()
    x = torch.randn(2, 9, cfg.d_model)
    gm = capture(layer, (x,)).program.module()
    assert "aten.linalg_svd.default" in _targets(gm)
    result = fold_constants(gm, PassContext((x,)))
    targets = _targets(gm)
    assert "aten.linalg_svd.default" not in targets
    assert "aten.linalg_vector_norm.default" not in targets
    assert len(result.changed) == 4  # two key tables, u, v
    assert result.nodes_after < result.nodes_before
    # the folded u/v are exactly what the model's own SVD call returns, signs included
    u, v = leading_singular_vectors(layer.cores.detach())
    folded = [
        b for name, b in gm.named_buffers() if name.startswith("_folded_") and b.shape == u.shape
    ]
    assert any(torch.equal(b, u) for b in folded) and any(torch.equal(b, v) for b in folded)
    x2 = torch.randn(3, 14, cfg.d_model)
    assert torch.equal(gm(x2), layer(x2))


class DependsOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.w * 2).t() + x.sum()  # w*2 folds; nothing that reads x does


def test_nothing_that_reads_an_input_is_folded() -> None:
    model = DependsOnInput().eval()
    x = torch.randn(2, 3, 8)
    gm = capture(model, (x,)).program.module()
    result = fold_constants(gm, PassContext((x,)))
    assert len(result.changed) == 1
    counts = op_counts(capture(gm, (x,)).program)
    assert counts.get("mul.Tensor", 0) == 0 and counts.get("sum", counts.get("sum.default", 0)) == 1
    x2 = torch.randn(4, 5, 8)
    assert torch.allclose(gm(x2), model(x2), atol=1e-6)


class PowerIterationFromOnes(nn.Module):
    """A core's top singular pair by power iteration in forward, started from
    ``torch.ones`` (a factory with no input): weight-only, so folded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.core = nn.Parameter(torch.randn(2, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        v = torch.ones(2, 3)
        for _ in range(4):
            u = F.normalize(torch.einsum("hab,hb->ha", self.core, v), dim=-1)
            v = F.normalize(torch.einsum("hab,ha->hb", self.core, u), dim=-1)
        return torch.einsum("xth,ha,hc->xtac", x, u, v)


class CounterAdvancedInPlace(nn.Module):
    """A static ``zeros(())`` advanced in place: state of the call, never a constant."""

    def forward(self, x: Tensor) -> Tensor:
        counter = torch.zeros((), dtype=torch.long)
        counter.add_(x.shape[1])
        return x * counter


def test_a_power_iteration_from_ones_folds_and_in_place_state_does_not() -> None:
    model = PowerIterationFromOnes().eval()
    x = torch.randn(2, 5, 2)
    gm = capture(model, (x,)).program.module()
    result = fold_constants(gm, PassContext((x,)))
    assert result.changed and not any("ones" in c for c in result.changed)
    counts = op_counts(capture(gm, (x,)).program)
    assert counts.get("einsum", 0) == 1, counts  # only the one that reads x is left
    assert torch.equal(gm(x), model(x))
    model2 = CounterAdvancedInPlace().eval()
    gm2 = capture(model2, (x,)).program.module()
    fold_constants(gm2, PassContext((x,)))
    for tokens in (5, 3, 5):
        x = torch.randn(2, tokens, 2)
        assert torch.equal(gm2(x), model2(x))
