"""A causal LM as two programs over a static KV cache: prefill and decode.

    prefill(input_ids[batch, tokens]) -> logits, present.<i>.key, present.<i>.value, ...
    decode(input_ids[batch, 1], position_ids[batch, 1], past_key_values.<i>.key, ...)
        -> logits, present.<i>.key, present.<i>.value, ...

Every cache tensor is ``[batch, kv_heads, max_cache_len, head_dim]``. The cache is
``transformers``' own ``StaticCache`` (what its ExecuTorch recipe exports), built inside
each call from the tensors passed in, so both programs are pure functions of their inputs:
the model's attention writes the new keys and values at the position (``index_copy_``) and
masks the slots past it, exactly as ``generate`` with a static cache does. The names are
Optimum's and ONNX Runtime GenAI's (past and present share the static shape, GenAI's
``past_present_share_buffer``).

A batch's sequences share one position (the cache writes one column for all of them):
prompts of one length, or one prompt per call. Sliding-window layers are accepted when the
window holds the whole cache (they are then full attention); other cache kinds are refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...models.builtin import LoadedModel
from .. import first_line
from ..capture import DEFAULT_MAX_BATCH, DynamicAxis, ProgramSpec
from ..inputs.errors import GenerationError
from ..inputs.options import GENERATION_PROGRAMS, GENERATION_TASK

TASK = GENERATION_TASK
PROGRAMS = GENERATION_PROGRAMS
DEFAULT_MAX_CACHE_LEN = 256
EXAMPLE_BATCH = 2  # not 1: torch.export would pin a size-1 batch
EXAMPLE_TOKENS = 8


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The decode program's cache inputs and both programs' cache outputs."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def _static_cache(model: torch.nn.Module, max_cache_len: int) -> Any:
    from transformers.cache_utils import StaticCache, StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=max_cache_len)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticSlidingWindowLayer):
            window = int(layer.max_cache_len)  # min(window, max_cache_len), as it sizes itself
            if window < max_cache_len:
                raise GenerationError(
                    f"layer {i} attends to a sliding window of {window} tokens; export with "
                    f"--max-cache-len {window} or less (the window then holds the whole cache)"
                )
            cache.layers[i] = StaticLayer(max_cache_len)
        elif type(layer) is not StaticLayer:
            raise GenerationError(
                f"layer {i} keeps a {type(layer).__name__} cache; text-generation export "
                "supports key/value attention caches only"
            )
    return cache


def _present(cache: Any) -> list[Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class PrefillProgram(torch.nn.Module):
    """Prompt tokens into an empty cache: logits at every position, and the filled cache."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int) -> None:
        super().__init__()
        self.model = model
        self.max_cache_len = max_cache_len

    def forward(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        cache = _static_cache(self.model, self.max_cache_len)
        for layer in cache.layers:
            # a fresh tensor per call: the layer's own is a constant it would add_ into
            layer.cumulative_length = torch.zeros((), dtype=torch.long, device=input_ids.device)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        return (out.logits, *_present(cache))


class DecodeProgram(torch.nn.Module):
    """One token per sequence at ``position_ids`` against the cache: logits, new cache.

    ``forward`` takes the cache as one argument per tensor (named in its signature, so that
    ``torch.export`` and the exporters see ``past_key_values_<i>_key``)."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int) -> None:
        super().__init__()
        self.model = model
        self.max_cache_len = max_cache_len

    def step(self, input_ids: Tensor, position_ids: Tensor, past: tuple[Tensor, ...]) -> Any:
        cache = _static_cache(self.model, self.max_cache_len)
        if len(past) != 2 * len(cache.layers):
            raise ValueError(f"decode takes {2 * len(cache.layers)} cache tensors, got {len(past)}")
        start = position_ids[0, 0]
        for i, layer in enumerate(cache.layers):
            keys, values = past[2 * i].clone(), past[2 * i + 1].clone()  # inputs stay inputs
            layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])
            layer.keys, layer.values = keys, values
            layer.cumulative_length = start.clone()  # where update() writes
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True
        )
        return (out.logits, *_present(cache))


def _decode_program(model: torch.nn.Module, max_cache_len: int, layers: int) -> DecodeProgram:
    past, _ = cache_names(layers)
    names = ["input_ids", "position_ids", *(n.replace(".", "_") for n in past)]

    def forward(self: DecodeProgram, *args: Tensor) -> Any:
        return self.step(args[0], args[1], args[2:])

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, positional) for n in ("self", *names)]
    )
    cls = type("DecodeProgram", (DecodeProgram,), {"forward": forward})
    return cls(model, max_cache_len)


def _check_rope(model: torch.nn.Module, length: int) -> None:
    """Rotary embeddings that switch their frequencies past a length (longrope, dynamic NTK)
    did not reproduce generate's numbers past it (Phi-3 longrope: logits off by 1e-3 once
    positions pass ``original_max_position_embeddings``); refuse a cache that reaches it."""
    config = model.config.get_text_config()
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, dict):
        return
    kind = parameters.get("rope_type") or parameters.get("type")
    original = parameters.get("original_max_position_embeddings")
    if kind in ("longrope", "dynamic") and isinstance(original, int) and length > original:
        raise GenerationError(
            f"its {kind} rotary embeddings change past {original} positions, which the "
            f"exported programs do not follow: use a KV cache of at most {original} tokens "
            f"(--max-cache-len {original})"
        )


@dataclass
class GenerationPrograms:
    model: torch.nn.Module  # the transformers model, as loaded
    prefill: LoadedModel
    decode: LoadedModel
    max_cache_len: int
    layers: int  # cache layers: 2 cache tensors each
    eos: frozenset[int]

    def loaded(self, name: str) -> LoadedModel:
        return self.prefill if name == "prefill" else self.decode


def max_cache_limit(model: torch.nn.Module) -> int | None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def default_max_cache_len(model: torch.nn.Module) -> int:
    return min(DEFAULT_MAX_CACHE_LEN, max_cache_limit(model) or DEFAULT_MAX_CACHE_LEN)


def build_programs(hf: LoadedModel, max_cache_len: int | None = None) -> GenerationPrograms:
    """The prefill and decode programs of an ``hf:DIR`` model, each with its example,
    axes, names and real parity inputs (decode's caches filled by an eager prefill)."""
    model = getattr(hf.model, "model", None)
    if model is None or not hasattr(model, "generate"):
        raise GenerationError(f"--task {TASK} applies to hf:DIR causal LMs, not {hf.source}")
    limit = max_cache_limit(model)
    length = max_cache_len or default_max_cache_len(model)
    if limit is not None and limit < 2:
        raise GenerationError(f"the checkpoint's max_position_embeddings is {limit}: too short")
    if length < 2 or (limit is not None and length > limit):
        raise GenerationError(
            f"a KV cache of {length} tokens: the checkpoint admits 2..{limit or 'any'} (its "
            "max_position_embeddings)"
        )
    _check_rope(model, length)
    vocab = int(model.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(0)

    def tokens(batch: int, count: int) -> Tensor:
        return torch.randint(0, vocab, (batch, count), generator=gen)

    prefill = PrefillProgram(model, length).eval()
    sizes = [(EXAMPLE_BATCH, min(EXAMPLE_TOKENS, length)), (1, 1), (3, 5), (1, length)]
    prompts = [tokens(b, min(t, length)) for b, t in sizes]
    try:
        with torch.no_grad():
            filled = [prefill(p) for p in prompts]
    except GenerationError:
        raise
    except Exception as exc:  # an architecture whose forward takes no static cache
        raise GenerationError(
            f"{hf.source} does not run with transformers' StaticCache: "
            f"{type(exc).__name__}: {first_line(exc, 200)}"
        ) from None
    layers = (len(filled[0]) - 1) // 2
    past, present = cache_names(layers)
    batch = [DynamicAxis(0, 0, "batch", 1, DEFAULT_MAX_BATCH, "named")]
    prefill_spec = ProgramSpec(
        [*batch, DynamicAxis(0, 1, "tokens", 1, length, "named")],
        [(p,) for p in prompts],
        ["input_ids"],
        ["logits", *present],
    )
    decode = _decode_program(model, length, layers).eval()
    decode_inputs = []
    for prompt, outputs in zip(prompts, filled, strict=True):
        fill = min(prompt.shape[1], length - 1)  # a full prefill: write its last slot again
        positions = torch.full((prompt.shape[0], 1), fill, dtype=torch.long)
        decode_inputs.append((tokens(prompt.shape[0], 1), positions, *outputs[1:]))
    decode_spec = ProgramSpec(
        [DynamicAxis(i, 0, "batch", 1, DEFAULT_MAX_BATCH, "named") for i in range(2 + len(past))],
        decode_inputs,
        ["input_ids", "position_ids", *past],
        ["logits", *present],
    )
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos or []])

    def program(module: torch.nn.Module, spec: ProgramSpec, name: str) -> LoadedModel:
        metadata = {**hf.metadata, "program_spec": spec, "program": name, "max_tokens": length}
        return LoadedModel(module, spec.inputs[0], hf.source, metadata)

    return GenerationPrograms(
        model,
        program(prefill, prefill_spec, "prefill"),
        program(decode, decode_spec, "decode"),
        length,
        layers,
        eos_ids,
    )
