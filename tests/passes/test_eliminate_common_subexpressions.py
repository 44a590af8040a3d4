"""eliminate_common_subexpressions: equal pure calls merge, buffers written in place never do.

The reference is the model itself: the pass must leave its numbers bit for bit, on the
example and on other sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ultramem.compiler.capture import capture
from ultramem.compiler.rewrite import op_counts, rewrite
from ultramem.passes.base import PassContext
from ultramem.passes.eliminate_common_subexpressions import eliminate_common_subexpressions


class TwoBuffersFilledInPlace(nn.Module):
    """Two ``new_zeros`` buffers with equal creation arguments, each filled by a different
    matmul through a view: merging them (as an earlier version did) adds the second
    product into the first buffer and changes the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Parameter(torch.randn(2, 8, 4))
        self.b = nn.Parameter(torch.randn(2, 8, 4))

    def forward(self, x: Tensor) -> Tensor:
        first = x.new_zeros(x.shape[0], 2, 4)
        second = x.new_zeros(x.shape[0], 2, 4)
        for i in range(2):
            torch.matmul(x, self.a[i], out=first[:, i])
            torch.matmul(x, self.b[i], out=second[:, i])
        return first * 2 + second


class SameSelectTwice(nn.Module):
    """``s[0]`` read in two places: two select nodes that should become one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.w = nn.Parameter(torch.randn(8, 2, 6))

    def forward(self, x: Tensor) -> Tensor:
        s = torch.einsum("td,dse->ste", x, self.w)
        return s[0].relu() + s[0].sigmoid() + s[1]


def _run(module: nn.Module | torch.fx.GraphModule, x: Tensor) -> Tensor:
    with torch.no_grad():  # out= writes, which autograd refuses on leaf views
        return module(x)


def test_buffers_written_in_place_are_not_merged() -> None:
    model = TwoBuffersFilledInPlace().eval()
    x = torch.randn(5, 8)
    gm = capture(model, (x,)).program.module()
    zeros_before = sum("new_zeros" in str(n.target) for n in gm.graph.nodes)
    result = eliminate_common_subexpressions(gm, PassContext((x,)))
    assert zeros_before == 2
    assert sum("new_zeros" in str(n.target) for n in gm.graph.nodes) == 2, result.changed
    for tokens in (5, 3, 9):
        x = torch.randn(tokens, 8)
        assert torch.equal(_run(gm, x), _run(model, x))


def test_in_place_buffers_survive_the_whole_pipeline() -> None:
    model = TwoBuffersFilledInPlace().eval()
    x = torch.randn(5, 8)
    cap = capture(model, (x,))
    res = rewrite(model, cap, (x,))
    # nothing to disable: the pass no longer changes the model's numbers
    assert not res.disabled_passes and res.parity is not None and res.parity.passed
    x = torch.randn(7, 8)
    assert torch.equal(_run(res.program.module(), x), _run(model, x))


def test_equal_pure_calls_merge() -> None:
    model = SameSelectTwice().eval()
    x = torch.randn(4, 8)
    gm = capture(model, (x,)).program.module()
    result = eliminate_common_subexpressions(gm, PassContext((x,)))
    assert len(result.changed) == 1 and result.nodes_after < result.nodes_before
    assert op_counts(capture(gm, (x,)).program).get("select.int") == 2  # s[0] once, s[1]
    x = torch.randn(6, 8)
    assert torch.equal(gm(x), model(x))


class CountersThroughAliases(nn.Module):
    """What ``transformers``' static cache does per layer: a counter made by one call,
    passed through ``.to(device)`` (which returns the tensor itself) or ``.clone()``, then
    advanced in place; the layers' counters are equal at creation, not after. Merging them
    (as an earlier version did, seeing no write on the nodes themselves) advanced one
    counter once per layer."""

    def forward(self, x: Tensor) -> Tensor:
        start = x[0, 0].long()
        out = x
        for _ in range(3):
            counter = torch.zeros((), dtype=torch.long).to(x.device)
            counter.add_(x.shape[1])
            offset = start.clone().to(x.device)
            offset.add_(1)
            out = out + counter + offset
        return out


def test_tensors_written_through_an_alias_are_not_merged() -> None:
    model = CountersThroughAliases().eval()
    x = torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    eliminate_common_subexpressions(gm, PassContext((x,)))
    for shape in ((4, 6), (2, 3), (5, 9)):
        x = torch.randn(shape) * 10
        assert torch.equal(_run(gm, x), _run(model, x))
