"""What an LLM runtime looks for beside a text-generation export, written into it.

ONNX Runtime GenAI, Optimum and ``transformers`` read a model folder's ``config.json``,
``generation_config.json`` and tokenizer files; the checkpoint's own are copied (byte for
byte, as artifacts the manifest lists and hashes). Each program's ``model.onnx`` says what
it is in ONNX's ``metadata_props``: the producer, the task, the program, the static cache's
length, the cache layers and the end tokens, which before lived only in our manifest. The
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


def program_metadata(program: str, generation: dict[str, Any]) -> dict[str, str]:
    """``metadata_props`` of one program's ONNX file, from the manifest's generation
    section (the values ``check`` holds to what the model gives)."""
    return {
        "producer": f"ultramem {__version__}",
        "ultramem.task": "text-generation",
        "ultramem.program": program,
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
