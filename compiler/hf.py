"""``hf:DIR``: a local Hugging Face ``transformers`` checkpoint as a MODEL.

The checkpoint (``config.json`` and safetensors weights) loads with the auto classes, in
eval mode and in its own dtype, and is wrapped so that the program takes token ids and
returns logits (``use_cache=False``: a plain forward over whole sequences; generation
with a KV cache is a task of its own). Nothing is fetched: the hub is switched off before
``transformers`` is imported, and every file must be in DIR.

Trust: ``config.json`` is read as JSON first. A checkpoint that ships its own modeling
code (``auto_map``, as research forks do) loads only with ``trust_remote_code``, since
loading it imports that code; pickled weights (``pytorch_model.bin``) only with
``allow_unsafe_pickle``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..models.builtin import LoadedModel

PREFIX = "hf:"
EXAMPLE_TOKENS = 16


class HFLoadError(ValueError):
    """A checkpoint that cannot be loaded as asked; one line saying what to do."""


class CausalLMLogits(torch.nn.Module):
    """A causal LM as a function of token ids to logits: the program ultramem captures."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise HFLoadError(f"hf:{directory}: no such folder")
    if not path.is_file():
        raise HFLoadError(f"hf:{directory}: no config.json (save it with save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise HFLoadError(f"{path} does not hold a config object")
    return config


def load_hf(
    directory: Path, trust_remote_code: bool = False, allow_unsafe_pickle: bool = False
) -> LoadedModel:
    config = read_config(directory)
    if config.get("auto_map") and not trust_remote_code:
        raise HFLoadError(
            f"hf:{directory} ships its own modeling code (auto_map in config.json): loading "
            "it imports that code; pass --trust-remote-code if you trust its author"
        )
    safetensors = sorted(directory.glob("*.safetensors"))
    pickled = sorted(directory.glob("*.bin"))
    if not safetensors and not (pickled and allow_unsafe_pickle):
        found = "only pickled *.bin weights" if pickled else "no weights"
        hint = "; convert them to safetensors, or pass --allow-unsafe-pickle" if pickled else ""
        raise HFLoadError(f"hf:{directory}: {found} (*.safetensors){hint}")
    # offline before the import: transformers reads these when it loads
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise HFLoadError("hf: models need transformers: pip install transformers") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype="auto",
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=bool(safetensors),
        )
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise HFLoadError(
            f"hf:{directory} does not load as a causal LM: {type(exc).__name__}: {text}"
        ) from None
    model.eval()
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise HFLoadError(f"hf:{directory}: its config has no vocab_size")
    tokens = torch.randint(
        0, vocab, (2, EXAMPLE_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    metadata: dict[str, Any] = {"hf": {"architectures": config.get("architectures")}}
    if isinstance(limit, int) and limit > 0:
        metadata["max_tokens"] = limit
    source = f"{PREFIX}{directory.resolve()}"
    return LoadedModel(CausalLMLogits(model).eval(), (tokens,), source, metadata)
