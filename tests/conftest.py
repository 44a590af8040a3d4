"""Shared fixtures: every test starts from the same global RNG state."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seed_torch() -> None:
    """Seed per test, not at import, so a test's random inputs do not depend on test order."""
    torch.manual_seed(0)
