"""A causal LM as one decoder program over a static KV cache.

    decoder(input_ids[batch, tokens], attention_mask[batch, total],
            position_ids[batch, tokens],
            past_key_values.<i>.key, past_key_values.<i>.value, ...)
        -> logits[batch, tokens, vocab], present.<i>.key, present.<i>.value, ...

A prompt, one new token, a follow-up turn and a chunk of a long prompt are all the same
call: the new keys and values are written at the cache columns after those already seen,
and every position attends to the cache up to itself. A fresh sequence starts from a cache
of zeros. This is the form of Optimum's and ONNX Runtime GenAI's model builder (one
program, the weights stored once), with their tensor names.

Columns and positions: the sequences of a batch share the cache's columns (its static
cache writes one column for all), so a batch of prompts of different lengths is padded,
as GenAI pads it (on the right: it masks trailing pads, reads each sequence's logits at
its last real token, and continues each sequence after the padding). ``attention_mask``
(1: a token, 0: padding) covers the columns seen so far, new tokens included (``total``
= columns seen + tokens), or the whole cache (GenAI's static mask under graph capture);
columns past it count as unseen. ``position_ids`` are each token's rotary position: the
new tokens are written from column ``max(position_ids[:, -1]) - tokens + 1``, the count
of columns seen, since the longest sequence of a batch is unpadded.

Every cache tensor is ``[batch, kv_heads, max_cache_len, head_dim]``, the length fixed in
the program's own input shapes: that is how a runtime learns it (GenAI reads it there and
then shares one buffer between past and present, its ``past_present_share_buffer``); the
export's ``genai_config.json`` and ONNX ``metadata_props`` say it too. The cache is
``transformers``' own ``StaticCache`` (what its ExecuTorch recipe exports), built inside
each call from the tensors passed in, so the program is a pure function of its inputs: the
model's attention writes the new keys and values (``index_copy_``) and masks the slots past
each position and the padding, exactly as ``generate`` with a static cache does.
Sliding-window layers are accepted when the window holds the whole cache (they are then
full attention); other cache kinds are refused.
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
from ..inputs.options import GENERATION_TASK

TASK = GENERATION_TASK
DEFAULT_MAX_CACHE_LEN = 256
EXAMPLE_BATCH = 2  # not 1: torch.export would pin a size-1 batch
EXAMPLE_TOKENS = 8
INPUTS = ("input_ids", "attention_mask", "position_ids")  # before the cache


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The program's cache inputs and its cache outputs."""
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


class DecoderProgram(torch.nn.Module):
    """New tokens at ``position_ids`` against the cache: their logits, and the new cache.

    ``forward`` takes the cache as one argument per tensor (named in its signature, so that
    ``torch.export`` and the exporters see ``past_key_values_<i>_key``)."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int) -> None:
        super().__init__()
        self.model = model
        self.max_cache_len = max_cache_len

    def step(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
        past: tuple[Tensor, ...],
    ) -> Any:  # fmt: skip
        cache = _static_cache(self.model, self.max_cache_len)
        if len(past) != 2 * len(cache.layers):
            raise ValueError(
                f"the decoder takes {2 * len(cache.layers)} cache tensors, got {len(past)}"
            )
        start = position_ids[:, -1].max() - (input_ids.shape[1] - 1)  # the columns seen
        # the columns past the mask are unseen: the cache's full width, as the model masks it
        mask = torch.nn.functional.pad(
            attention_mask, (0, self.max_cache_len - attention_mask.shape[1])
        )
        for i, layer in enumerate(cache.layers):
            keys, values = past[2 * i].clone(), past[2 * i + 1].clone()  # inputs stay inputs
            layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])
            layer.keys, layer.values = keys, values
            layer.cumulative_length = start.clone()  # where update() writes
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
            use_cache=True,
        )  # fmt: skip
        return (out.logits, *(t for layer in cache.layers for t in (layer.keys, layer.values)))


def _decoder_program(model: torch.nn.Module, max_cache_len: int, layers: int) -> DecoderProgram:
    past, _ = cache_names(layers)
    names = [*INPUTS, *(n.replace(".", "_") for n in past)]

    def forward(self: DecoderProgram, *args: Tensor) -> Any:
        return self.step(args[0], args[1], args[2], args[3:])

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, positional) for n in ("self", *names)]
    )
    cls = type("DecoderProgram", (DecoderProgram,), {"forward": forward})
    return cls(model, max_cache_len)


def _fresh_cache_layout(model: torch.nn.Module, max_cache_len: int) -> list[tuple[Any, ...]]:
    """Each cache tensor's ``(kv_heads, max_cache_len, head_dim)`` and dtype, as the model's
    own attention sizes a static cache (heads and head sizes may differ by layer)."""
    cache = _static_cache(model, max_cache_len)
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long), cache=cache, use_cache=True)
    return [
        (tuple(t.shape[1:]), t.dtype) for layer in cache.layers for t in (layer.keys, layer.values)
    ]


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
            f"exported program does not follow: use a KV cache of at most {original} tokens "
            f"(--max-cache-len {original})"
        )


@dataclass
class GenerationProgram:
    model: torch.nn.Module  # the transformers model, as loaded
    decoder: LoadedModel
    max_cache_len: int
    layers: int  # cache layers: 2 cache tensors each
    eos: frozenset[int]
    cache_layout: list[tuple[Any, ...]]  # per cache tensor: its shape past batch, its dtype

    def empty_cache(self, batch: int) -> tuple[Tensor, ...]:
        """The zeros a fresh sequence starts from (what GenAI allocates)."""
        return empty_cache(self.cache_layout, batch)

    def run(self, input_ids: Tensor, start: int, cache: tuple[Tensor, ...]) -> list[Tensor]:
        """The decoder, eagerly, on ``input_ids`` written from position ``start``."""
        return _run(self.decoder.model, input_ids, start, cache)


def _run(
    decoder: torch.nn.Module, input_ids: Tensor, start: int, cache: tuple[Tensor, ...]
) -> list[Tensor]:
    with torch.no_grad():
        return list(decoder(*decoder_inputs(input_ids, start, cache)))


def decoder_inputs(input_ids: Tensor, start: int, cache: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The decoder's inputs for unpadded ``input_ids`` written from column ``start``."""
    batch, tokens = input_ids.shape
    mask = torch.ones((batch, start + tokens), dtype=torch.long)
    return (input_ids, mask, positions_from(start, input_ids), *cache)


def empty_cache(layout: list[tuple[Any, ...]], batch: int) -> tuple[Tensor, ...]:
    return tuple(torch.zeros((batch, *shape), dtype=dtype) for shape, dtype in layout)


def positions_from(start: int, input_ids: Tensor) -> Tensor:
    """``position_ids`` of ``input_ids`` written from ``start``, one row per sequence."""
    batch, tokens = input_ids.shape
    return (torch.arange(tokens, dtype=torch.long) + start).expand(batch, tokens).contiguous()


def max_cache_limit(model: torch.nn.Module) -> int | None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def default_max_cache_len(model: torch.nn.Module) -> int:
    return min(DEFAULT_MAX_CACHE_LEN, max_cache_limit(model) or DEFAULT_MAX_CACHE_LEN)


def _cache_length(model: torch.nn.Module, max_cache_len: int | None) -> int:
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
    return length


def build_program(hf: LoadedModel, max_cache_len: int | None = None) -> GenerationProgram:
    """The decoder program of an ``hf:DIR`` model, with its example, axes, names and real
    parity inputs: prompts from an empty cache, single steps and a follow-up chunk against
    caches an eager run of the program filled."""
    model = getattr(hf.model, "model", None)
    if model is None or not hasattr(model, "generate"):
        raise GenerationError(f"--task {TASK} applies to hf:DIR causal LMs, not {hf.source}")
    length = _cache_length(model, max_cache_len)
    try:
        layout = _fresh_cache_layout(model, length)
    except GenerationError:
        raise
    except Exception as exc:  # an architecture whose forward takes no static cache
        raise GenerationError(
            f"{hf.source} does not run with transformers' StaticCache: "
            f"{type(exc).__name__}: {first_line(exc, 200)}"
        ) from None
    layers = len(layout) // 2
    decoder = _decoder_program(model, length, layers).eval()
    inputs = _parity_inputs(decoder, layout, int(model.config.get_text_config().vocab_size))
    past, present = cache_names(layers)
    count = len(INPUTS) + len(past)
    axes = [DynamicAxis(i, 0, "batch", 1, DEFAULT_MAX_BATCH, "named") for i in range(count)]
    axes += [DynamicAxis(i, 1, "tokens", 1, length, "named") for i in (0, 2)]
    axes += [DynamicAxis(1, 1, "total", 1, length, "named")]
    spec = ProgramSpec(axes, inputs, [*INPUTS, *past], ["logits", *present])
    metadata = {**hf.metadata, "program_spec": spec, "program": "decoder", "max_tokens": length}
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos or []])
    return GenerationProgram(
        model, LoadedModel(decoder, inputs[0], hf.source, metadata), length, layers, eos_ids,
        layout,
    )  # fmt: skip


def _parity_inputs(
    decoder: DecoderProgram, layout: list[tuple[Any, ...]], vocab: int
) -> list[tuple[Tensor, ...]]:
    """The capture's example first (two sequences, several tokens: no axis pinned at 1),
    then prompts from an empty cache (one token, a few, a full cache), single steps and a
    follow-up chunk at positions an eager run of the program filled up to. No padded
    batch: a padding position attends to nothing, and what each runtime makes of such a
    row differs (no later position reads it); padded batches are compared where only real
    positions count, in generation (``tests/cli/test_genai.py``)."""
    length = decoder.max_cache_len
    gen = torch.Generator().manual_seed(0)

    def tokens(batch: int, count: int) -> Tensor:
        return torch.randint(0, vocab, (batch, count), generator=gen)

    example_tokens = min(EXAMPLE_TOKENS, max(2, length - 1))
    out: list[tuple[Tensor, ...]] = []
    for batch, count in ((EXAMPLE_BATCH, example_tokens), (1, 1), (3, min(5, length)), (1, length)):
        out.append(decoder_inputs(tokens(batch, count), 0, empty_cache(layout, batch)))
    for batch, filled in ((EXAMPLE_BATCH, min(example_tokens, length - 1)), (1, length - 1)):
        cache = _run(decoder, tokens(batch, filled), 0, empty_cache(layout, batch))[1:]
        out.append(decoder_inputs(tokens(batch, 1), filled, tuple(cache)))
    chunk = min(3, length - example_tokens)
    if chunk >= 1:  # a follow-up turn of several tokens after a prompt
        cache = _run(decoder, out[0][0], 0, empty_cache(layout, EXAMPLE_BATCH))[1:]
        out.append(decoder_inputs(tokens(EXAMPLE_BATCH, chunk), example_tokens, tuple(cache)))
    return out
