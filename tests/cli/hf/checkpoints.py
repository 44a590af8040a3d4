"""Tiny ``transformers`` checkpoints written with ``save_pretrained`` (nothing downloaded).

- ``llama``: a plain ``LlamaForCausalLM``;
- ``memory_fork``: a research fork's Llama with product-key memories in two MLP slots,
  shipped as remote code (its modeling file beside the weights, ``auto_map`` in config);
- ``tokenizer``: a byte-level BPE tokenizer (``tokenizer.json``) saved beside one;
- ``olmoe``: an ``OlmoeForCausalLM`` (the paper authors' code is an OLMoE fork), with
  experts = top-k² as the real OLMoE's 64 experts, top 8.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ultramem.tests.foreign.hf_llama_memory import tiny_llama_config

FORK = Path(__file__).with_name("modeling_memllama.py")


def llama(directory: Path, vocab_size: int = 128) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def memory_fork(
    directory: Path,
    config: LlamaConfig | None = None,
    memory_layers: tuple[int, ...] = (1, 3),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """``config``: a ``LlamaConfig`` with the ``memory_*`` attributes of
    ``tiny_llama_config`` (the default); ``dtype``: the weights' as saved (a bf16
    checkpoint is what ``save_pretrained`` writes of a model trained in bf16)."""
    spec = importlib.util.spec_from_file_location("modeling_memllama", FORK)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    config = module.MemLlamaConfig(**(config or tiny_llama_config()).to_dict())
    config.memory_layers = list(memory_layers)
    torch.manual_seed(0)
    model = module.MemLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sub_keys"):  # torch.empty in the fork's layer
                p.normal_(0, p.shape[-1] ** -0.5)
    model.to(dtype).save_pretrained(directory)
    shutil.copy(FORK, directory / FORK.name)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text())
    saved["auto_map"] = {
        "AutoConfig": "modeling_memllama.MemLlamaConfig",
        "AutoModelForCausalLM": "modeling_memllama.MemLlamaForCausalLM",
    }
    config_path.write_text(json.dumps(saved))
    return directory


def olmoe(directory: Path) -> Path:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    OlmoeForCausalLM(config).eval().save_pretrained(directory)
    return directory


TOKENIZER_VOCAB = 272  # 256 bytes, 4 special tokens, a few merges: within the model's


def tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, saved into ``directory`` as
    ``transformers`` saves one (``<pad>``, ``<s>``, ``</s>`` are ids 0, 1, 2, as in the
    checkpoints' configs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    made = Tokenizer(models.BPE(unk_token="<unk>"))
    made.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    made.decoder = decoders.ByteLevel()
    corpus = [
        "the memory layer keeps the top slots of a product key table",
        "each token scores keys and sums the values of the slots it keeps",
    ] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    made.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=made, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(directory)
    return directory
