"""A research fork's modeling file: Llama with product-key memories in some MLP slots.

Shipped inside a checkpoint (``auto_map``), as forks ship theirs; importing it leaves a
marker file when ``MEMLLAMA_IMPORT_MARKER`` names one, so a test can tell whether it ran.
"""

import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from ultramem.tests.foreign.hf_llama_memory import LlamaProductKeyMemoryMLP

if os.environ.get("MEMLLAMA_IMPORT_MARKER"):
    Path(os.environ["MEMLLAMA_IMPORT_MARKER"]).touch()


class MemLlamaConfig(LlamaConfig):
    model_type = "memllama"


class MemLlamaForCausalLM(LlamaForCausalLM):
    config_class = MemLlamaConfig

    def __init__(self, config: MemLlamaConfig) -> None:
        super().__init__(config)
        for i in config.memory_layers:
            self.model.layers[i].mlp = LlamaProductKeyMemoryMLP(config)
        self.post_init()
