"""Write a Llama checkpoint with product-key memories in two MLP slots, as a research fork
ships it (its modeling file and ``auto_map``), for trying ``--task text-generation``.

    python scripts/make_memory_llama.py OUT [--size tiny|small]

tiny: the tests' model (4 layers, D 64, 32 x 32 keys). small: 4 layers, D 256, vocab 4096,
memories of 128 x 128 = 16,384 slots (4 heads, top 16, values of 256), about 12 M
parameters. Weights are random (seed 0): the figures it gives are of the compute, not of
a trained model's text.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ultramem.tests.cli.hf.checkpoints import memory_fork
from ultramem.tests.foreign.hf_llama_memory import tiny_llama_config


def small_config():  # type: ignore[no-untyped-def]
    config = tiny_llama_config()
    config.update(
        {
            "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
            "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
            "memory_num_heads": 4, "memory_num_keys": 128, "memory_key_dim": 64,
            "memory_top_k": 16, "memory_value_dim": 256,
        }
    )  # fmt: skip
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    config = small_config() if args.size == "small" else None
    memory_fork(args.out, config)
    print(f"wrote {args.out}: ultramem export hf:{args.out} --trust-remote-code ...")


if __name__ == "__main__":
    main()
