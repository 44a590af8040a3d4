"""Bundled, trained models: ``builtin:<name>`` loads ``builtin/<name>.json`` + ``.safetensors``.

The JSON holds ``config`` (an :class:`LMConfig` as a dict), ``example`` (the batch and
sequence length of the example input used for capture) and ``training`` (how the
weights were made and the quality they reached).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import LMConfig
from .lm import UltraMemLM

BUILTIN_DIR = Path(__file__).parent / "builtin"
DEFAULT_BUILTIN = "facts"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    source: str
    metadata: dict[str, Any]


def list_builtins() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def example_tokens(cfg: LMConfig, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)


def save_builtin(
    model: UltraMemLM,
    name: str,
    example: dict[str, int],
    training: dict[str, Any],
    directory: Path = BUILTIN_DIR,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / f"{name}.safetensors"))
    meta = {"config": model.cfg.to_dict(), "example": example, "training": training}
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_builtin(name: str = DEFAULT_BUILTIN, directory: Path = BUILTIN_DIR) -> LoadedModel:
    known = sorted(p.stem for p in directory.glob("*.json"))
    # only a name from the listing: "../x" must not reach outside the folder
    if name not in known:
        raise KeyError(f"unknown builtin model {name!r}; known: {', '.join(known) or 'none'}")
    meta_path = directory / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    cfg = LMConfig.from_dict(meta["config"])
    model = UltraMemLM(cfg)
    model.load_state_dict(load_file(str(directory / f"{name}.safetensors")))
    model.eval()
    example = meta.get("example", {"batch": 2, "seq": 16})
    tokens = example_tokens(cfg, example["batch"], example["seq"])
    # positions past max_seq_len have no embedding: the capture must not admit them
    return LoadedModel(model, (tokens,), f"builtin:{name}", {**meta, "max_tokens": cfg.max_seq_len})
