"""Bundled models: ``builtin:<name>`` loads ``builtin/<name>.json``, with its weights.

A trained model's JSON holds ``config`` (an :class:`LMConfig` as a dict), ``example`` (the
batch and sequence length of the example input used for capture) and ``training`` (how
the weights were made and the quality they reached); the weights are ``<name>.safetensors``.

A generated model's JSON holds ``generated`` instead: a layer config, a seed and a dtype
from which the weights are drawn at load time, the same bits every time (random weights
need no file, and a paper-scale layer's would be hundreds of MB). ``example`` then gives
the batch and tokens of the example input (``[batch, seq, d_model]`` floats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .catalog import BUILTIN_DIR, DEFAULT_BUILTIN
from .catalog import list_builtins as list_builtins
from .config import LMConfig, UltraMemConfig
from .lm import UltraMemLM
from .ultramem import UltraMemLayer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    source: str
    metadata: dict[str, Any]


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
    known = list_builtins(directory)
    # only a name from the listing: "../x" must not reach outside the folder
    if name not in known:
        raise KeyError(f"unknown builtin model {name!r}; known: {', '.join(known) or 'none'}")
    meta_path = directory / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    if "generated" in meta:
        return _load_generated(name, meta)
    cfg = LMConfig.from_dict(meta["config"])
    model = UltraMemLM(cfg)
    model.load_state_dict(load_file(str(directory / f"{name}.safetensors")))
    model.eval()
    example = meta.get("example", {"batch": 2, "seq": 16})
    tokens = example_tokens(cfg, example["batch"], example["seq"])
    # positions past max_seq_len have no embedding: the capture must not admit them
    return LoadedModel(model, (tokens,), f"builtin:{name}", {**meta, "max_tokens": cfg.max_seq_len})


def generated_layer(cfg: UltraMemConfig, seed: int = 0, dtype: str = "float32") -> UltraMemLayer:
    """An :class:`UltraMemLayer` with random weights that depend on ``seed`` only."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype")
    # the layer draws keys, cores, values and its shuffle from its own seeded generator,
    # but nn.Linear draws from the global one: seed that too, in a fork, so loading a
    # builtin neither depends on nor disturbs the caller's random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = UltraMemLayer(cfg, seed=seed)
    return layer.to(torch_dtype).eval()


def _load_generated(name: str, meta: dict[str, Any]) -> LoadedModel:
    spec = meta["generated"]
    if spec.get("kind") != "ultramem-layer":
        raise ValueError(f"builtin {name}: unknown generated kind {spec.get('kind')!r}")
    cfg = UltraMemConfig(**spec["layer"])
    seed = int(spec.get("seed", 0))
    dtype = spec.get("dtype", "float32")
    layer = generated_layer(cfg, seed, dtype)
    example = meta.get("example", {"batch": 1, "seq": 16})
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(example["batch"], example["seq"], cfg.d_model, generator=gen)
    # meta's optional max_tokens bounds the tokens axis the capture admits
    return LoadedModel(layer, (x.to(getattr(torch, dtype)),), f"builtin:{name}", meta)
