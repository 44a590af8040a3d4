"""ONNX Runtime GenAI runs a text-generation export as it is, token-exact with ``generate``.

``onnxruntime_genai.Model(folder)`` on the folder ``ultramem export hf:DIR --task
text-generation`` wrote (its ``genai_config.json``, ``model.onnx`` and the checkpoint's
tokenizer files), nothing written by hand; the reference is ``transformers``' own greedy
``generate`` on the checkpoint. Both a checkpoint with two memory layers (shipped as remote
code, every lookup fused into ``ultramem`` ops that GenAI's ONNX Runtime runs through their
function bodies) and a stock Llama. Cases: prompts of 1, 5 and many tokens; a batch of two
prompts of one length, and of two lengths (padded on the right, as GenAI takes them); a
second turn appended after the first. Every step's logits are
compared too (fp32: 1e-4), so a cache written at a wrong position cannot hide behind the
tiny models' repetitive tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ultramem.cli.main import cli
from ultramem.tests.cli.hf import checkpoints
from ultramem.tests.foreign.hf_llama_memory import tiny_llama_config

CACHE = 32
LOGITS_ATOL = 1e-4  # fp32 through ONNX Runtime against eager PyTorch
PAD, EOS = 0, 2  # the checkpoints' (and the tokenizer's)


def _checkpoint(kind: str, directory: Path) -> Path:
    if kind == "memory":
        config = tiny_llama_config()
        config.vocab_size = checkpoints.TOKENIZER_VOCAB
        checkpoints.memory_fork(directory, config=config)
    else:
        checkpoints.llama(directory, vocab_size=checkpoints.TOKENIZER_VOCAB)
    return checkpoints.tokenizer(directory)


@pytest.fixture(scope="module", params=["memory", "llama"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    kind = request.param
    directory = _checkpoint(kind, tmp_path_factory.mktemp(kind))
    out = tmp_path_factory.mktemp(f"{kind}-export") / "out"
    remote = ["--trust-remote-code"] if kind == "memory" else []
    result = CliRunner().invoke(cli, [
        "export", f"hf:{directory}", *remote, "--task", "text-generation",
        "--max-cache-len", str(CACHE), "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0 and "parity PASSED" in result.output, result.output
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=bool(remote))
    return kind, out, model.eval(), og.Model(str(out))


def _reference(model: torch.nn.Module, prompts: list[list[int]], new: int):
    """``generate``'s greedy tokens and the logits that chose them, per step; a sequence
    ends at the checkpoint's end token (then pads), as GenAI's does."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompts), max_new_tokens=new, do_sample=False, eos_token_id=EOS,
            pad_token_id=PAD, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[:, len(prompts[0]) :].tolist()
    return tokens, [step.float().numpy() for step in out.logits]


def _genai_steps(generator: og.Generator, batch: int, new: int) -> tuple[list[list[int]], list]:
    tokens: list[list[int]] = [[] for _ in range(batch)]
    logits = []
    for _ in range(new):
        if generator.is_done():  # every sequence reached the end token
            break
        logits.append(np.asarray(generator.get_logits()).reshape(batch, -1))
        generator.generate_next_token()
        for row, token in zip(tokens, generator.get_next_tokens(), strict=True):
            row.append(int(token))
    return tokens, logits


def _genai(model: og.Model, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list]:
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=len(prompts), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, dtype=np.int32))
    return _genai_steps(generator, len(prompts), new)


def _assert_same(got: tuple, want: tuple) -> None:
    assert got[0] == want[0]
    for step, (ours, theirs) in enumerate(zip(got[1], want[1], strict=True)):
        assert np.abs(ours - theirs).max() <= LOGITS_ATOL, f"step {step}"


@pytest.mark.parametrize("length", [1, 5, 20])
def test_genai_generates_what_generate_does(exported: tuple, length: int) -> None:
    _, _, model, genai = exported
    prompt = [[(7 * i + 11) % 250 + 3 for i in range(length)]]
    new = 8
    _assert_same(_genai(genai, prompt, new), _reference(model, prompt, new))


def test_genai_generates_a_batch_of_two_prompts(exported: tuple) -> None:
    _, _, model, genai = exported
    prompts = [[5, 17, 3, 99, 42], [200, 7, 64, 8, 31]]
    _assert_same(_genai(genai, prompts, 6), _reference(model, prompts, 6))


def test_genai_generates_a_padded_batch_of_two_lengths(exported: tuple) -> None:
    """GenAI takes a batch of prompts of two lengths padded on the right with the pad
    token of ``genai_config.json`` (it masks trailing pads and reads each sequence's
    logits at its last real token): each sequence generates what it does alone."""
    _, out, model, genai = exported
    pad = json.loads((out / "genai_config.json").read_text())["model"]["pad_token_id"]
    short, long = [5, 17], [200, 7, 64, 8, 31]
    tokens, logits = _genai(genai, [short + [pad] * 3, long], 6)
    for row, prompt in enumerate((short, long)):
        want_tokens, want_logits = _reference(model, [prompt], 6)
        assert tokens[row][: len(want_tokens[0])] == want_tokens[0], row  # then it pads
        for step, theirs in enumerate(want_logits):
            assert np.abs(logits[step][row] - theirs[0]).max() <= LOGITS_ATOL, (row, step)


def test_genai_continues_a_second_turn_from_its_cache(exported: tuple) -> None:
    """The second turn is appended to the generator that ran the first: the program
    writes it after the cached tokens. The reference generates from the whole context.
    GenAI runs a sampled token through the model only when the next logits are asked for,
    and keeps no end token in the sequence: the context is its sequence, and unless the
    first turn ended, ``get_logits`` first puts its last token in the cache (as with any
    GenAI model: otherwise that slot stays empty, and the next turn attends to zeros)."""
    _, _, model, genai = exported
    first, second = [[5, 17, 3, 99, 42]], [9, 250, 4]
    params = og.GeneratorParams(genai)
    params.set_search_options(do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(np.array(first, dtype=np.int32))
    turn_one = _genai_steps(generator, 1, 4)
    _assert_same(turn_one, _reference(model, first, 4))
    if not generator.is_done():
        generator.get_logits()
    context = [[int(t) for t in generator.get_sequence(0)] + second]
    assert context[0][: len(first[0])] == first[0]
    generator.append_tokens(np.array([second], dtype=np.int32))
    _assert_same(_genai_steps(generator, 1, 5), _reference(model, context, 5))


def test_genai_tokenizes_with_the_checkpoints_tokenizer(exported: tuple) -> None:
    """og.Tokenizer reads the tokenizer files copied beside the program: it encodes and
    decodes a text as ``transformers`` does with the same files, and GenAI generates from
    those ids what ``generate`` does. (The tiny model's tokens are random bytes, so only
    the text of the prompt is decoded.)"""
    _, out, model, genai = exported
    text = "each token scores the memory"
    theirs = PreTrainedTokenizerFast.from_pretrained(out)  # the folder's files, no model code
    tokenizer = og.Tokenizer(genai)
    ids = [int(t) for t in tokenizer.encode(text)]
    assert ids == theirs(text)["input_ids"]
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == theirs.decode(ids) == text
    assert _genai(genai, [ids], 6)[0] == _reference(model, [ids], 6)[0]


def test_the_export_is_one_program_with_its_runtime_files(exported: tuple) -> None:
    kind, out, _, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"model.onnx", "genai_config.json", "config.json", "tokenizer.json"} <= paths
    assert not any("/" in p for p in paths)  # no prefill/ and decode/ copies
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["context_length"] == CACHE
    assert config["search"]["past_present_share_buffer"] is True
    if kind == "memory":
        after = manifest["ops"]["after"]
        assert after.get("ultramem.retrieve") == 2 and after.get("ultramem.aggregate") == 2
