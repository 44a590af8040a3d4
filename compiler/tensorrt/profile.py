"""Optimization profiles: the min/opt/max of an engine's dynamic axes."""

from __future__ import annotations

from dataclasses import dataclass

from .package import TensorRTError


def parse_range(text: str) -> tuple[int, int, int]:
    """``"1,64,256"`` -> (min, opt, max); one number means a static size."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected 'min,opt,max' integers, got {text!r}") from None
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"expected 'min,opt,max' with 1 <= min <= opt <= max, got {text!r}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of the dynamic axes; an engine accepts only shapes inside them. Keep
    ``tokens`` within what the capture admits (the model's ``max_seq_len``)."""

    batch: tuple[int, int, int] = (1, 1, 8)
    tokens: tuple[int, int, int] = (1, 64, 256)

    def __post_init__(self) -> None:
        for axis in (self.batch, self.tokens):
            parse_range(",".join(map(str, axis)))

    @classmethod
    def parse(cls, batch: str | None = None, tokens: str | None = None) -> ShapeProfile:
        default = cls()
        return cls(
            batch=parse_range(batch) if batch else default.batch,
            tokens=parse_range(tokens) if tokens else default.tokens,
        )

    def axis_range(self, name: str, position: int) -> tuple[int, int, int]:
        """By the ONNX dim name, else by position (0 batch, 1 tokens) as capture assigns them."""
        key = name if name in ("batch", "tokens") else {0: "batch", 1: "tokens"}.get(position)
        if key is None:
            raise TensorRTError(
                f"dynamic axis {position} ({name or 'unnamed'}) is neither batch nor tokens; "
                "export with the other axes static"
            )
        return getattr(self, key)
