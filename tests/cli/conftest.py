"""User-written model modules for ``package.module:factory`` tests."""

from __future__ import annotations

from pathlib import Path

import pytest

FACTORY_MODULE = """
import torch
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM


def _lm(seed):
    torch.manual_seed(seed)
    cfg = LMConfig(
        memory=UltraMemConfig(heads=2, cores=2, expansion=4, query_conv=3),
        memory_layers={0: 1, 1: 1},
        max_seq_len=64,
    )
    return UltraMemLM(cfg).eval()


def two_layers():
    return _lm(0), (torch.randint(0, 64, (2, 16)),)


def two_layers_other_weights():
    return _lm(1), (torch.randint(0, 64, (2, 16)),)


def bare_module():
    return _lm(0)


def not_a_module():
    return 42, None
"""


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Name of an importable module holding the factories above."""
    (tmp_path / "user_models_cli.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models_cli"
