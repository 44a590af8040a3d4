"""What an LLM runtime looks for beside a text-generation export, written into it.

ONNX Runtime GenAI, Optimum and ``transformers`` read a model folder's ``config.json``,
``generation_config.json`` and tokenizer files; the checkpoint's own are copied (byte for
byte, as artifacts the manifest lists and hashes). GenAI reads ``genai_config.json``,
written here from the program itself (its cache layout, names and length) and the
checkpoint's config. ``model.onnx`` says what it is in ONNX's ``metadata_props``: the
producer, the task, the static cache's length, the cache layers and the end tokens. The
manifest stays the one record ``check`` trusts: it holds the same values and hashes the
files that carry them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ... import __version__
from ...files import UnreadableFile, read_small_file
from ..artifacts import ArtifactWriter
from ..inputs.sources import HF_PREFIX
from .programs import GenerationProgram

# a checkpoint's files a runtime reads besides the weights (tokenizers of every kind)
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)
CHECKPOINT_FORMAT = "checkpoint-file"
GENAI_CONFIG = "genai_config.json"
GENAI_FORMAT = "genai-config"
FILE_MAX_BYTES = 256 << 20  # a tokenizer of a few hundred thousand tokens is ~20 MB


def copy_checkpoint_files(source: str, writer: ArtifactWriter) -> list[str]:
    """Copy the runtime files of the ``hf:DIR`` checkpoint ``source`` into the export's
    root; return their names. Only regular files in DIR (its links were vetted when it
    loaded) are copied; a name the checkpoint lacks is skipped."""
    if not source.startswith(HF_PREFIX):
        return []
    directory = Path(source.removeprefix(HF_PREFIX))
    copied = []
    for name in CHECKPOINT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = read_small_file(path, FILE_MAX_BYTES, follow_links=True)
        except UnreadableFile:
            continue  # not one a runtime could read either
        writer.path(name).write_bytes(data)
        writer.add(name, CHECKPOINT_FORMAT)
        copied.append(name)
    return copied


def program_metadata(generation: dict[str, Any]) -> dict[str, str]:
    """``metadata_props`` of the decoder's ONNX file, from the manifest's generation
    section (the values ``check`` holds to what the model gives)."""
    return {
        "producer": f"ultramem {__version__}",
        "ultramem.task": "text-generation",
        "ultramem.program": "decoder",
        "ultramem.max_cache_len": str(generation["max_cache_len"]),
        "ultramem.cache_layers": str(generation["cache_layers"]),
        "ultramem.eos_token_ids": ",".join(map(str, generation["eos_token_ids"])),
    }


def stamp_metadata(path: Path, props: dict[str, str]) -> None:
    """Set ``props`` in the ONNX file's ``metadata_props`` (others kept); the weights, in
    the file or its external data, are left as they are."""
    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _token_ids(value: Any) -> int | list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return value[0] if len(value) == 1 else value
    return None


def genai_config(program: GenerationProgram, onnx_file: str) -> dict[str, Any]:
    """ONNX Runtime GenAI's ``genai_config.json`` for the decoder in ``onnx_file``.

    ``type: decoder`` is GenAI's generic decoder-only LLM. The cache's length is the
    program's own fixed cache dimension (GenAI reads it from the inputs' shapes and shares
    one buffer for past and present); ``context_length`` and ``max_length`` say the same.
    Greedy search, as ``generate``'s default; the checkpoint's end and pad tokens."""
    config = program.model.config.get_text_config()
    (kv_heads, _, head_size), _ = program.cache_layout[0]
    eos = sorted(program.eos)
    pad = _token_ids(getattr(config, "pad_token_id", None))
    bos = _token_ids(getattr(config, "bos_token_id", None))
    names = {
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    return {
        "model": {
            "type": "decoder",
            "context_length": program.max_cache_len,
            "vocab_size": int(config.vocab_size),
            "bos_token_id": bos if bos is not None else (eos[0] if eos else 0),
            "eos_token_id": eos[0] if len(eos) == 1 else eos or 0,
            "pad_token_id": pad if isinstance(pad, int) else (eos[0] if eos else 0),
            "decoder": {
                "filename": onnx_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": int(head_size),
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads),
                "num_key_value_heads": int(kv_heads),
                "num_hidden_layers": program.layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    **names,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": program.max_cache_len,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
