"""Train the bundled default model ``builtin:facts`` and save it into ``models/builtin/``.

    python scripts/train_builtin.py            # the bundled weights: seed 0, defaults below

The task (``ultramem.models.facts_task``) is a random knowledge base f(subject, relation)
-> object that is never in the context, so it must be stored in parameters; the memory
layer, one virtual slot per (subject, relation) pair and more, is what stores it. The
memory reads block 0's input and adds its output after block 1 (skip-layer placement);
block 0's input at the relation token knows nothing of the subject, so the causal query
conv is what lets the query see (subject, relation). Deterministic: fixed seeds, two CPU
threads, a seeded data stream.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ultramem.models.builtin import BUILTIN_DIR, save_builtin
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.facts_task import (
    Facts,
    evaluate_accuracy,
    fact_batches,
    facts_loss,
    make_facts,
)
from ultramem.models.lm import UltraMemLM
from ultramem.models.ultramem import UltraMemLayer

log = logging.getLogger("train_builtin")

FACTS_PER_SEQ = 16


def build_model(facts: Facts, seed: int) -> UltraMemLM:
    """A 2-block LM (d=64) with one memory layer of 64² = 4096 virtual slots, 1024 rows."""
    memory = UltraMemConfig(
        d_model=64,
        n_keys=64,
        key_dim=32,
        heads=2,
        tucker_rank=2,
        cores=2,
        topm=8,
        topk=8,
        value_dim=64,
        expansion=4,
        score_activation="none",  # the authors apply no activation to the slot scores
        query_norm="layernorm",
        query_conv=3,
        slot_mapping="shuffle",
    )
    cfg = LMConfig(
        vocab_size=facts.vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        ffn_mult=2,
        max_seq_len=64,
        memory_layers={0: 1},
        memory=memory,
    )
    torch.manual_seed(seed)
    return UltraMemLM(cfg)


@torch.no_grad()
def refresh_rank1_keeping_signs(
    layer: UltraMemLayer, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """``layer.refresh_rank1()``, then undo any sign flip of the SVD by negating that head's keys.

    The SVD fixes ``u, v`` only up to a joint sign. If a refresh flips them, the row/column
    scores ``S · u`` flip and top-m would pick the *worst* candidates. Negating both key
    tables of that head negates ``S_row`` and ``S_col``: ``S · u`` is unchanged and the grid
    ``c_row · C · c_colᵀ`` is unchanged (two sign flips), so the function is exactly the same
    while the buffers stay exactly what ``refresh_rank1`` computes. Adam's first moment of
    the keys is negated with them. Returns how many heads were flipped.
    """
    old_u = layer.row_weight.clone()
    layer.refresh_rank1()
    flipped = (layer.row_weight * old_u).sum(-1) < 0  # [H]
    if flipped.any():
        layer.keys[flipped] = -layer.keys[flipped]
        state = optimizer.state.get(layer.keys, {}) if optimizer is not None else {}
        if "exp_avg" in state:
            state["exp_avg"][flipped] = -state["exp_avg"][flipped]
    return int(flipped.sum())


def refresh_all(model: UltraMemLM, optimizer: torch.optim.Optimizer | None = None) -> int:
    return sum(refresh_rank1_keeping_signs(m, optimizer) for m in model.memories.values())


def make_optimizer(model: UltraMemLM, lr: float, value_lr_mult: float) -> torch.optim.Optimizer:
    """AdamW without weight decay (decay erases facts); value tables get a larger rate.

    A value row only receives gradient when one of its slots is selected, so it is updated
    far less often than the dense weights; the paper raises its learning rate for this.
    """
    values = [p for n, p in model.named_parameters() if n.endswith(".values")]
    value_ids = {id(p) for p in values}
    rest = [p for p in model.parameters() if id(p) not in value_ids]
    return torch.optim.AdamW(
        [{"params": rest, "lr": lr}, {"params": values, "lr": lr * value_lr_mult}],
        weight_decay=0.0,
        betas=(0.9, 0.98),
    )


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    # with 2 threads the value table's gradient (an index backward, accumulate=True) sums
    # in a thread-dependent order; the deterministic kernels cost nothing measurable here
    torch.use_deterministic_algorithms(True)
    facts = make_facts(args.seed, args.entities, args.relations)
    model = build_model(facts, args.seed)
    optimizer = make_optimizer(model, args.lr, args.value_lr_mult)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    batches = fact_batches(facts, args.batch_size, FACTS_PER_SEQ, seed=args.seed)
    flips = 0
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        scale = lr_scale(step, args.steps, args.warmup)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * scale
        loss = facts_loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.refresh_every == 0:
            flips += refresh_all(model, optimizer)
        if (step + 1) % args.log_every == 0:
            log.info(
                "step %d  loss %.4f  %.0f s", step + 1, loss.item(), time.perf_counter() - start
            )
    # the saved buffers must be the leading singular vectors of the saved cores
    flips += refresh_all(model)
    wall = time.perf_counter() - start
    model.eval()
    accuracy = evaluate_accuracy(model, facts, facts_per_seq=FACTS_PER_SEQ)
    ablated = evaluate_accuracy(model, facts, ablate_memory=True, facts_per_seq=FACTS_PER_SEQ)
    log.info(
        "accuracy %.4f  memory ablated %.4f  chance %.4f  (%.0f s, %d sign flips undone)",
        accuracy,
        ablated,
        facts.chance,
        wall,
        flips,
    )
    training = {
        "task": "facts",
        "task_module": "ultramem.models.facts_task",
        "seed": args.seed,
        "entities": args.entities,
        "relations": args.relations,
        "num_facts": facts.num_facts,
        "facts_per_seq": FACTS_PER_SEQ,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "value_lr_mult": args.value_lr_mult,
        "warmup": args.warmup,
        "refresh_rank1_every": args.refresh_every,
        "rank1_sign_flips_undone": flips,
        "final_loss": round(loss.item(), 6),
        "accuracy": accuracy,
        "accuracy_memory_ablated": ablated,
        "chance": facts.chance,
        "wall_time_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": True,
        "torch": torch.__version__,
        "command": "python " + shlex.join(["scripts/train_builtin.py", *sys.argv[1:]]),
    }
    save_builtin(
        model, args.name, example={"batch": 2, "seq": 16}, training=training, directory=args.out_dir
    )
    return training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=96)
    parser.add_argument("--relations", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--value-lr-mult", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--refresh-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--name", default="facts")
    parser.add_argument("--out-dir", type=Path, default=BUILTIN_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
