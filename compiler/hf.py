"""``hf:DIR``: a local Hugging Face ``transformers`` checkpoint as a MODEL.

The checkpoint (``config.json`` and safetensors weights) loads with the auto classes, in
eval mode and in its own dtype, and is wrapped so that the program takes token ids and
returns logits (``use_cache=False``: a plain forward over whole sequences; generation
with a KV cache is a task of its own). Nothing is fetched: the hub is switched off before
``transformers`` is imported, and every file must be in DIR.

Files: every file ``transformers`` will read is in DIR, checked before it is imported:
``config.json``, the weights and their index are no links out of DIR, and the index
(``*.index.json``, read here as JSON) maps tensors to plain file names in DIR only.

Trust: ``config.json`` is read as JSON first. A checkpoint that ships its own modeling
code (``auto_map``, as research forks do) loads only with ``trust_remote_code``, since
loading it imports that code; pickled weights (``pytorch_model.bin``) only with
``allow_unsafe_pickle``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..files import UnreadableFile, plain_name, read_json
from ..models.builtin import LoadedModel
from . import first_line
from .inputs.sources import HF_PREFIX as PREFIX

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


# what ``from_pretrained`` of a causal LM reads from DIR, besides code (``auto_map``)
READ_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.index.json")
CONFIG_MAX_BYTES = 16 << 20  # a config is settings: kilobytes
INDEX_MAX_BYTES = 64 << 20  # a weight map of a million tensors is ~100 MB less than this


def _link_out(directory: Path, path: Path) -> bool:
    """A link that leads out of ``directory``. A snapshot of the Hugging Face cache
    (``models--org--name/snapshots/<rev>/``) is a folder of links into its repository's
    ``blobs/``: those are the checkpoint's own files, where ``huggingface_hub`` keeps them."""
    if not path.is_symlink():
        return False
    target, roots = path.resolve(), [directory.resolve()]
    if directory.resolve().parent.name == "snapshots":
        roots.append(directory.resolve().parent.parent / "blobs")
    return not any(target.is_relative_to(root) for root in roots)


def check_files(directory: Path) -> None:
    """``HFLoadError`` unless every file ``transformers`` would read lies in ``directory``:
    none of them a link out of it, and each weight index (read as JSON, bounded) naming
    only plain file names, none of them a link out either."""
    for pattern in READ_PATTERNS:
        for path in sorted(directory.glob(pattern)):
            if _link_out(directory, path):
                raise HFLoadError(f"hf:{directory}: {path.name} is a link out of the folder")
            if not path.is_file():  # a FIFO would hang the load, a device never end
                raise HFLoadError(f"hf:{directory}: {path.name} is not a regular file")
    for index in sorted(directory.glob("*.index.json")):
        for shard in sorted(set(_weight_map(index).values())):
            if not plain_name(shard) or _link_out(directory, directory / shard):
                raise HFLoadError(
                    f"{index} maps weights to {shard!r}, not a file in hf:{directory}"
                )
            if not (directory / shard).is_file():
                raise HFLoadError(f"{index} maps weights to {shard!r}, not a regular file")


def _weight_map(index: Path) -> dict[str, Any]:
    try:
        data = read_json(index, INDEX_MAX_BYTES, follow_links=True)
    except UnreadableFile as exc:
        raise HFLoadError(f"{exc}: not a weight index") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise HFLoadError(f"{index} has no weight_map object")
    odd = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if odd is not None:
        raise HFLoadError(f"{index} maps weights to {odd!r}, not a file name")
    return weight_map


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        what = "is not a folder" if directory.exists() else "no such folder"
        raise HFLoadError(f"hf:{directory}: {what}")
    if not path.is_file():
        raise HFLoadError(f"hf:{directory}: no config.json (save it with save_pretrained)")
    if _link_out(directory, path):
        raise HFLoadError(f"hf:{directory}: config.json is a link out of the folder")
    try:
        config = read_json(path, CONFIG_MAX_BYTES, follow_links=True)
    except UnreadableFile as exc:
        raise HFLoadError(f"{exc}: not a model config") from None
    if not isinstance(config, dict):
        raise HFLoadError(f"{path} does not hold a config object")
    return config


def _check_size(directory: Path, config: dict[str, Any]) -> None:
    """Refuse, before building anything, a config whose model could not fit in memory (a
    typo of a layer count would otherwise allocate for minutes, then fail)."""
    sizes = {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    sizes["intermediate_size"] = config.get("intermediate_size") or 4 * (sizes["hidden_size"] or 0)
    if not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        return  # transformers' own validation says what is wrong
    d, layers = sizes["hidden_size"], sizes["num_hidden_layers"]
    params = layers * (4 * d * d + 3 * d * sizes["intermediate_size"]) + 2 * sizes["vocab_size"] * d
    available = _available_bytes()
    if available and params * 4 > available:
        raise HFLoadError(
            f"hf:{directory}: its config describes about {params / 1e9:.1f} G parameters "
            f"({layers} layers of hidden size {d}), more than this machine's "
            f"{available / 2**30:.0f} GiB of free memory holds"
        )


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def load_hf(
    directory: Path, trust_remote_code: bool = False, allow_unsafe_pickle: bool = False
) -> LoadedModel:
    config = read_config(directory)
    check_files(directory)
    if config.get("auto_map") and not trust_remote_code:
        raise HFLoadError(
            f"hf:{directory} ships its own modeling code (auto_map in config.json): loading "
            "it imports that code; pass --trust-remote-code if you trust its author"
        )
    safetensors = sorted(directory.glob("*.safetensors"))
    pickled = sorted(directory.glob("*.bin"))
    if not safetensors and not (pickled and allow_unsafe_pickle):
        if pickled:
            raise HFLoadError(
                f"hf:{directory}: its weights are pickled ({pickled[0].name}), which loading "
                "would unpickle; convert them to safetensors, or pass --allow-unsafe-pickle"
            )
        raise HFLoadError(f"hf:{directory}: no weights (*.safetensors)")
    _check_size(directory, config)
    # offline before the import: transformers reads these when it loads
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise HFLoadError("hf: models need transformers: pip install transformers") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load reports are pages; errors come as one line
    hf_logging.disable_progress_bar()  # "Loading weights: 12/12" is a line on stderr too
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype="auto",
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=bool(safetensors),
        )
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        text = first_line(exc, 300)
        raise HFLoadError(
            f"hf:{directory} does not load as a causal LM: {type(exc).__name__}: {text}"
        ) from None
    model.eval()
    notes = []
    if getattr(model.config, "_experts_implementation", None) == "grouped_mm":
        # grouped_mm is a transformers custom op torch.onnx cannot translate; batched_mm
        # is the same experts' maths in stock operators
        try:
            model.set_experts_implementation("batched_mm")
            notes.append("mixture-of-experts layers run transformers' batched_mm experts")
        except Exception as exc:  # an implementation transformers refuses for this model
            notes.append(f"kept grouped_mm experts ({first_line(exc, 120)})")
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise HFLoadError(f"hf:{directory}: its config has no vocab_size")
    tokens = torch.randint(
        0, vocab, (2, EXAMPLE_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    metadata: dict[str, Any] = {
        "hf": {"architectures": config.get("architectures")},
        "notes": notes,
    }
    if isinstance(limit, int) and limit > 0:
        metadata["max_tokens"] = limit
    source = f"{PREFIX}{directory.resolve()}"
    return LoadedModel(CausalLMLogits(model).eval(), (tokens,), source, metadata)
