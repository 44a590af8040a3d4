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


def raises():
    raise RuntimeError("the checkpoint server is down")


def exits():
    raise SystemExit("usage: train.py --data DIR")


not_callable = 3


class _Broken(torch.nn.Module):
    def forward(self, tokens):
        return tokens.float() @ torch.ones(3, 3)  # wrong shapes: always fails


def forward_fails():
    return _Broken(), (torch.randint(0, 64, (2, 16)),)


def bare_with_example():
    model = _lm(0)
    model.example_inputs = lambda: (torch.randint(0, 64, (1, 8)),)
    return model


def layer():
    # one memory layer on features: the fastest model with a lookup to capture
    from ultramem.models.ultramem import UltraMemLayer

    torch.manual_seed(0)
    cfg = UltraMemConfig(d_model=32, n_keys=8, key_dim=16, value_dim=32, topm=4, topk=4)
    return UltraMemLayer(cfg).eval(), (torch.randn(2, 8, 32),)


def nan_weights():
    model, example = _lm(0), (torch.randint(0, 64, (2, 16)),)
    with torch.no_grad():
        memory = next(iter(model.memories.values()))
        memory.values[:, 0] = float("nan")
    return model, example
"""


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Name of an importable module holding the factories above."""
    (tmp_path / "user_models_cli.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models_cli"
