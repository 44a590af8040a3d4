"""Configuration of the reference UltraMem layer and the small language model around it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ScoreActivation = Literal["none", "relu", "softmax"]
QueryNorm = Literal["none", "layernorm", "rmsnorm"]
SlotMapping = Literal["shuffle", "identity"]


@dataclass(frozen=True)
class UltraMemConfig:
    """Sizes and variant switches of one UltraMem layer (symbols of docs/ultramem.md).

    ``n_keys`` is n (keys per side, so n² virtual slots); the value table has
    ``n_keys**2 // expansion`` physical rows.
    """

    d_model: int = 64
    n_keys: int = 32
    key_dim: int = 32
    heads: int = 1
    tucker_rank: int = 2
    cores: int = 1
    topm: int = 8
    topk: int = 8
    value_dim: int = 64
    expansion: int = 1
    score_activation: ScoreActivation = "none"
    query_norm: QueryNorm = "layernorm"
    key_norm: bool = True
    query_conv: int = 0  # kernel size of a causal depthwise conv before Wq; 0 = none
    output_proj: bool = True
    slot_mapping: SlotMapping = "shuffle"
    # The authors keep the leading singular vectors of the summed Tucker core as buffers;
    # others call an SVD inside forward. Both are weight-only maths a compiler must fold.
    rank1_from_svd_in_forward: bool = False

    def __post_init__(self) -> None:
        slots = self.n_keys**2
        if slots % self.expansion:
            raise ValueError(
                f"n_keys**2 = {slots} must be divisible by expansion = {self.expansion}"
            )
        if self.value_dim % self.cores:
            raise ValueError(
                f"value_dim = {self.value_dim} must split into cores = {self.cores} equal chunks"
            )
        if not 1 <= self.topm <= self.n_keys:
            raise ValueError(f"topm = {self.topm} must lie in [1, n_keys = {self.n_keys}]")
        if not 1 <= self.topk <= self.topm**2:
            raise ValueError(f"topk = {self.topk} must lie in [1, topm**2 = {self.topm**2}]")
        if not self.output_proj and self.expansion * self.value_dim != self.d_model:
            raise ValueError(
                "without an output projection expansion * value_dim must equal d_model, "
                f"got {self.expansion} * {self.value_dim} != {self.d_model}"
            )

    @property
    def value_rows(self) -> int:
        return self.n_keys**2 // self.expansion

    @property
    def sqrt_expansion(self) -> float:
        return math.sqrt(self.expansion)


@dataclass(frozen=True)
class LMConfig:
    """A small decoder-only LM; ``memory_layers`` maps block index → where its memory output lands.

    ``memory_layers = {1: 1}`` puts a memory layer in block 1 whose output is added in
    block 1 (the ordinary placement); ``{0: 2}`` reads block 0's input and adds the result
    in block 2 (the paper's skip-layer placement).
    """

    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: int = 2
    max_seq_len: int = 256
    memory_layers: dict[int, int] = field(default_factory=lambda: {1: 1})
    memory: UltraMemConfig = field(default_factory=UltraMemConfig)

    def __post_init__(self) -> None:
        if self.memory.d_model != self.d_model:
            raise ValueError(
                f"memory.d_model = {self.memory.d_model} differs from d_model = {self.d_model}"
            )
        for src, dst in self.memory_layers.items():
            if not 0 <= src <= dst < self.n_layers:
                raise ValueError(
                    f"memory layer {src} -> {dst} must satisfy 0 <= src <= dst < n_layers"
                )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_layers"] = {str(k): v for k, v in self.memory_layers.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        data = dict(data)
        data["memory"] = UltraMemConfig(**data.get("memory", {}))
        data["memory_layers"] = {int(k): int(v) for k, v in data.get("memory_layers", {}).items()}
        return cls(**data)
