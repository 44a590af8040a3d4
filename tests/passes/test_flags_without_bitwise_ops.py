"""``flags_without_bitwise_ops``: an exclusive-or of 0/1 flags becomes ``!=`` or a cast of
a negation (TensorRT's ONNX parser refuses ``BitwiseXor``); an exclusive-or of arbitrary
integers is left as written. The reference is the module itself."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.export import Dim

from ultramem.passes.base import PassContext
from ultramem.passes.flags_without_bitwise_ops import flags_without_bitwise_ops


class Flags(nn.Module):
    def forward(self, mask: Tensor, other: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        padding = mask.long() ^ 1  # RNA-MSM's padding mask from an attention mask
        kept = mask.long() ^ 0
        either = mask ^ other
        hashed = ids ^ 5  # not flags: stays a bitwise op
        return padding, kept, either, hashed


def _inputs(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, n, generator=gen) > 0.5
    other = torch.rand(2, n, generator=gen) > 0.5
    return mask, other, torch.randint(0, 64, (2, n), generator=gen)


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_flags_lose_their_exclusive_or_and_keep_their_values() -> None:
    model = Flags()
    n = Dim("n", min=2)
    dims = ({1: n}, {1: n}, {1: n})
    gm = torch.export.export(model, _inputs(5, 0), dynamic_shapes=dims).module()
    result = flags_without_bitwise_ops(gm, PassContext(()))
    assert len(result.changed) == 3, result
    assert [r.reason for r in result.refused] == ["operands not known to hold 0 and 1"]
    assert sum("xor" in t for t in _targets(gm)) == 1  # the hash of ids only
    for size, seed in ((2, 1), (9, 2)):
        inputs = _inputs(size, seed)
        for got, want in zip(gm(*inputs), model(*inputs), strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=0, rtol=0)
