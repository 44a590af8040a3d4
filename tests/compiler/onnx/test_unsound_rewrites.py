"""ONNX export leaves out onnxscript's reshape-MatMul-reshape rules, which are unsound.

They replace ``Reshape -> MatMul -> Reshape`` by one MatMul whenever MatMul's broadcasting
gives the same output shape; with a batched weight the broadcast pairs its batch with
another dim. Both a batched product the einsum pass writes (the flax PEER port's
``einsum("pbnhd,hkpd->pbnhk")``) and one a user writes by hand must run in ONNX Runtime as
they do in torch (static shapes: the rules only fire on those).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from ultramem.compiler.capture import capture
from ultramem.compiler.onnx.export import export_onnx


class BatchedEinsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.Parameter(
            torch.randn(1, 24, 2, 12, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, q: Tensor) -> Tensor:
        return torch.einsum("pbnhd,hkpd->pbnhk", q.view(2, 2, 16, 1, 12), self.keys)


class HandWrittenBmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(2, 12, 24, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, q: Tensor) -> Tensor:
        x = q.view(2, 2, 16, 1, 12).permute(3, 0, 1, 2, 4).reshape(2, -1, 12)
        return torch.bmm(x, self.weight).reshape(1, 2, 2, 16, 24)


@pytest.mark.parametrize("model_type", [BatchedEinsum, HandWrittenBmm])
def test_a_batched_product_runs_in_onnx_runtime_as_in_torch(
    model_type: type[nn.Module], tmp_path: Path
) -> None:
    from ultramem.compiler.rewrite import rewrite

    model = model_type().eval()
    q = torch.randn(2, 2, 16 * 12, generator=torch.Generator().manual_seed(2))
    captured = capture(model, (q,))  # the view pins both dims: a static capture
    assert not any(a.dynamic for a in captured.axes)
    program = rewrite(model, captured, (q,)).program  # the einsum becomes a bmm
    path = tmp_path / "model.onnx"
    export_onnx(captured, path, program=program)
    session = ort.InferenceSession(str(path))
    [got] = session.run(None, {session.get_inputs()[0].name: q.numpy()})
    with torch.no_grad():
        want = model(q).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
