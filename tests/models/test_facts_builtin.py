"""The bundled default model ``builtin:facts`` is trained, and its memory is what it learned.

The knowledge base is re-created from the seed and sizes saved in the model's JSON, so
these tests score the shipped weights on exactly the facts they were trained on.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ultramem.models.builtin import DEFAULT_BUILTIN, LoadedModel, load_builtin
from ultramem.models.facts_task import Facts, evaluate_accuracy, make_facts
from ultramem.models.ultramem import UltraMemLayer, leading_singular_vectors

# The evaluation is deterministic, but another CPU or BLAS may round a few near-tied logits
# differently: allow one percentage point below what training recorded.
MARGIN = 0.01


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_builtin("facts")


@pytest.fixture(scope="module")
def training(loaded: LoadedModel) -> dict[str, Any]:
    return loaded.metadata["training"]


@pytest.fixture(scope="module")
def facts(training: dict[str, Any]) -> Facts:
    return make_facts(training["seed"], training["entities"], training["relations"])


def test_facts_is_the_default_and_matches_its_task(
    loaded: LoadedModel, training: dict[str, Any], facts: Facts
) -> None:
    assert DEFAULT_BUILTIN == "facts"
    assert training["task"] == "facts"
    assert loaded.model.cfg.vocab_size == facts.vocab_size
    assert training["num_facts"] == facts.num_facts
    assert training["chance"] == pytest.approx(facts.chance)
    assert training["command"].startswith("python scripts/train_builtin.py")
    assert len(loaded.model.memories) >= 1


def test_trained_model_knows_the_facts(
    loaded: LoadedModel, training: dict[str, Any], facts: Facts
) -> None:
    accuracy = evaluate_accuracy(loaded.model, facts, facts_per_seq=training["facts_per_seq"])
    assert accuracy >= training["accuracy"] - MARGIN, (
        f"accuracy {accuracy:.4f} is below the recorded {training['accuracy']:.4f}; "
        "retrain with the command in models/builtin/facts.json"
    )
    assert accuracy >= 0.9
    assert accuracy >= 20 * facts.chance


def test_ablating_memory_drops_accuracy_towards_chance(
    loaded: LoadedModel, training: dict[str, Any], facts: Facts
) -> None:
    per_seq = training["facts_per_seq"]
    accuracy = evaluate_accuracy(loaded.model, facts, facts_per_seq=per_seq)
    ablated = evaluate_accuracy(loaded.model, facts, ablate_memory=True, facts_per_seq=per_seq)
    assert ablated == pytest.approx(training["accuracy_memory_ablated"], abs=MARGIN)
    assert ablated <= accuracy - 0.5, "the memory layer should hold most of the facts"
    assert ablated < 10 * facts.chance
    # the hooks are removed afterwards: the model is whole again
    assert evaluate_accuracy(loaded.model, facts, facts_per_seq=per_seq) == accuracy


def test_saved_rank1_buffers_are_the_leading_singular_vectors(loaded: LoadedModel) -> None:
    for name, layer in loaded.model.memories.items():
        assert isinstance(layer, UltraMemLayer)
        u, v = leading_singular_vectors(layer.cores.detach())
        torch.testing.assert_close(layer.row_weight, u, atol=1e-6, rtol=0, msg=f"row {name}")
        torch.testing.assert_close(layer.col_weight, v, atol=1e-6, rtol=0, msg=f"col {name}")
        # exactly what the layer's own refresh writes, signs included
        refreshed = copy.deepcopy(layer)
        refreshed.refresh_rank1()
        torch.testing.assert_close(refreshed.row_weight, layer.row_weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(refreshed.col_weight, layer.col_weight, atol=1e-6, rtol=0)


def test_memory_layer_uses_the_papers_features(loaded: LoadedModel) -> None:
    cfg = loaded.model.cfg
    mem = cfg.memory
    assert (mem.heads, mem.cores, mem.tucker_rank) == (2, 2, 2)
    assert mem.expansion == 4 and mem.slot_mapping == "shuffle"
    assert mem.score_activation == "none" and mem.query_norm == "layernorm"
    # skip-layer placement: read before block 0, added after block 1; block 0's input at a
    # relation token knows nothing of the subject, so the causal query conv must supply it
    assert mem.query_conv >= 2
    assert cfg.memory_layers == {0: 1}
