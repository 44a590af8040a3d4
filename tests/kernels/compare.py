"""What the kernel tests compare with: allclose that says where and by how much."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


def assert_close(name: str, got: Tensor, want: Tensor, atol: float, rtol: float) -> None:
    """allclose with a report: mismatch count, the first few indices with both values."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{name}: NaN/Inf differ"
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        pairs = [(i, float(got[tuple(i)]), float(want[tuple(i)])) for i in where]
        pytest.fail(f"{name}: {int(bad.sum())}/{bad.numel()} mismatched; first {pairs}")
