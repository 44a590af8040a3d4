"""The "facts" task of the bundled default model: a knowledge base only a memory can hold.

A fixed random function ``f(subject, relation) -> object`` over ``entities`` entity tokens
and ``relations`` relation tokens (vocabulary = entities, then relations). A sequence is
``facts_per_seq`` random facts written back to back, ``a b c a' b' c' ...``; the loss is on
each object ``c`` predicted at its relation token ``b``. Facts are independent of each
other, so the context never reveals an object: the model must store the whole table in its
parameters, and a memory layer with one slot per (subject, relation) pair is the part that
can. Ablating the memory layers therefore drops accuracy towards chance.

Everything is a pure function of the seed, so tests re-create the exact knowledge base and
evaluation order the bundled model was trained and scored on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Sequence layout: subject at 3i, relation at 3i + 1, object at 3i + 2. The object is
# predicted from the logits at the relation token.
FACT_LEN = 3
PREDICT_OFFSET = 1


@dataclass(frozen=True)
class Facts:
    """The knowledge base: one row per (subject, relation) pair, as token ids."""

    seed: int
    entities: int
    relations: int
    subjects: Tensor  # [N] in [0, entities)
    relation_tokens: Tensor  # [N] in [entities, entities + relations)
    objects: Tensor  # [N] in [0, entities)

    @property
    def vocab_size(self) -> int:
        return self.entities + self.relations

    @property
    def num_facts(self) -> int:
        return int(self.subjects.numel())

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the possible objects."""
        return 1.0 / self.entities


def make_facts(seed: int, entities: int = 96, relations: int = 32) -> Facts:
    """Every (subject, relation) pair gets an object drawn uniformly from the entities."""
    if entities < 2 or relations < 1:
        raise ValueError(f"need entities >= 2 and relations >= 1, got {entities}, {relations}")
    gen = torch.Generator().manual_seed(seed)
    subjects = torch.arange(entities).repeat_interleave(relations)
    relation_tokens = entities + torch.arange(relations).repeat(entities)
    objects = torch.randint(0, entities, (entities * relations,), generator=gen)
    return Facts(seed, entities, relations, subjects, relation_tokens, objects)


def fact_sequences(facts: Facts, order: Tensor, facts_per_seq: int) -> Tensor:
    """Token sequences [len(order) // facts_per_seq, 3 · facts_per_seq] for facts ``order``."""
    usable = (order.numel() // facts_per_seq) * facts_per_seq
    order = order[:usable]
    triples = torch.stack(
        [facts.subjects[order], facts.relation_tokens[order], facts.objects[order]], dim=-1
    )
    return triples.reshape(-1, FACT_LEN * facts_per_seq)


def fact_batches(facts: Facts, batch_size: int, facts_per_seq: int, seed: int) -> Iterator[Tensor]:
    """Endless training batches [batch_size, 3 · facts_per_seq]: epochs of shuffled facts.

    Each epoch is a fresh permutation of all facts, so every fact is seen once per epoch
    in a new context; the generator is seeded, so the stream is reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    per_batch = batch_size * facts_per_seq
    while True:
        order = torch.randperm(facts.num_facts, generator=gen)
        for start in range(0, facts.num_facts - per_batch + 1, per_batch):
            yield fact_sequences(facts, order[start : start + per_batch], facts_per_seq)


def evaluation_sequences(facts: Facts, facts_per_seq: int) -> Tensor:
    """Every fact exactly once, in a fixed shuffled order (a training-like context).

    The order comes from ``seed + 1`` so it is independent of the training stream; a
    remainder that does not fill a sequence is padded with facts from the start.
    """
    gen = torch.Generator().manual_seed(facts.seed + 1)
    order = torch.randperm(facts.num_facts, generator=gen)
    pad = (-order.numel()) % facts_per_seq
    return fact_sequences(facts, torch.cat([order, order[:pad]]), facts_per_seq)


def object_logits_and_targets(model: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Logits at every relation token [N, vocab] and the objects they must predict [N]."""
    logits = model(tokens)
    at = torch.arange(PREDICT_OFFSET, tokens.shape[1], FACT_LEN, device=tokens.device)
    return logits[:, at].flatten(0, 1), tokens[:, at + 1].flatten()


def facts_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Cross-entropy on objects only: subjects and relations are random, not learnable."""
    logits, targets = object_logits_and_targets(model, tokens)
    return F.cross_entropy(logits, targets)


@contextmanager
def memory_ablated(model: nn.Module) -> Iterator[None]:
    """Zero every memory layer's output (forward hooks on ``model.memories``) inside the block."""
    memories = getattr(model, "memories", None)
    if not isinstance(memories, nn.ModuleDict) or not memories:
        raise ValueError(f"{type(model).__name__} has no memory layers to ablate")
    handles = [
        layer.register_forward_hook(lambda _mod, _inp, out: torch.zeros_like(out))
        for layer in memories.values()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    facts: Facts,
    ablate_memory: bool = False,
    facts_per_seq: int = 16,
    batch_size: int = 64,
) -> float:
    """Fraction of facts whose object is the argmax over the whole vocabulary."""
    was_training = model.training
    model.eval()
    sequences = evaluation_sequences(facts, facts_per_seq)
    hits = []
    try:
        with memory_ablated(model) if ablate_memory else nullcontext():
            for start in range(0, sequences.shape[0], batch_size):
                logits, targets = object_logits_and_targets(
                    model, sequences[start : start + batch_size]
                )
                hits.append(logits.argmax(-1) == targets)
    finally:
        model.train(was_training)
    # sequences are in fact order, so the padding repeats sit at the end: score each fact once
    return float(torch.cat(hits)[: facts.num_facts].float().mean())
