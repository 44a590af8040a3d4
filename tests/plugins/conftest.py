"""One small kernel bundle per test session, compiled for sm_80, sm_90 and sm_120 on CPU.

Specialisations: a small fp32 binding that takes the other branches of every constexpr
(relu, div mapping, scatter pooling, no slot map), and the bundled model's binding
(``models/builtin/facts.json``) in fp32 and bf16: 6 kernels × 3 architectures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ultramem.models
from ultramem.plugins.bundle import KernelSpec, build_bundle, specs_for_layers
from ultramem.plugins.metadata import BundleManifest

BUNDLE_SMS = (80, 90, 120)

SMALL_BINDING = {
    "heads": 1, "n_keys": 16, "tucker_rank": 2, "cores": 1, "topm": 4, "topk": 4,
    "activation": "relu", "expansion": 2, "mapping": "div", "pooling": "scatter",
    "slot_map": False,
}  # fmt: skip
SMALL_VALUE_DIM = 24  # not a power of two: the last column block is partial


def model_binding() -> tuple[dict[str, Any], int]:
    """The builtin model's memory layer as ``Binding.describe()`` gives it, and value_dim."""
    facts = Path(ultramem.models.__file__).parent / "builtin" / "facts.json"
    mem = json.loads(facts.read_text())["config"]["memory"]
    binding = {
        "heads": mem["heads"], "n_keys": mem["n_keys"], "tucker_rank": mem["tucker_rank"],
        "cores": mem["cores"], "topm": mem["topm"], "topk": mem["topk"],
        "activation": mem["score_activation"], "expansion": mem["expansion"],
        # the layer's implicit value expansion: a shuffle, then row = j mod R, scatter-add
        "mapping": "mod", "pooling": "add", "slot_map": mem["slot_mapping"] == "shuffle",
    }  # fmt: skip
    return binding, mem["value_dim"]


@pytest.fixture
def small_binding() -> dict[str, Any]:
    return dict(SMALL_BINDING)


@pytest.fixture(scope="session")
def bundle_specs() -> list[KernelSpec]:
    binding, value_dim = model_binding()
    return specs_for_layers(
        [
            (SMALL_BINDING, torch.float32, SMALL_VALUE_DIM),
            (binding, torch.float32, value_dim),
            (binding, torch.bfloat16, value_dim),
        ]
    )


@pytest.fixture(scope="session")
def bundle(
    bundle_specs: list[KernelSpec], tmp_path_factory: pytest.TempPathFactory
) -> BundleManifest:
    return build_bundle(bundle_specs, BUNDLE_SMS, tmp_path_factory.mktemp("bundle"))
