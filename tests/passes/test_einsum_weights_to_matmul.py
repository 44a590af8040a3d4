"""``einsum_weights_to_matmul``: an einsum of an activation with a weight becomes one ``mm``
(``bmm`` where both share a batch index) with the weight laid out once, whatever view of a
parameter the code passed; everything else is left as it is, with its reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from ultramem.passes.base import PassContext
from ultramem.passes.einsum_weights_to_matmul import _explicit, einsum_weights_to_matmul


class OneEinsum(nn.Module):
    def __init__(self, equation: str, weight_shape: tuple[int, ...], weight_first: bool) -> None:
        super().__init__()
        self.equation, self.weight_first = equation, weight_first
        self.weight = nn.Parameter(torch.randn(*weight_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        operands = (self.weight, x) if self.weight_first else (x, self.weight)
        return torch.einsum(self.equation, *operands)


REWRITTEN = [
    ("td,hndr->thnr", (5, 8), (2, 3, 8, 2), False),  # product-key scoring
    ("btd,de->bte", (2, 5, 8), (8, 6), False),
    ("de,btd->bte", (2, 5, 8), (8, 6), True),  # weight first
    ("td,ed->te", (5, 8), (6, 8), False),  # a transposed weight
    ("td,dn->nt", (5, 8), (8, 6), False),  # the output permuted
    ("tdr,hdr->th", (5, 8, 2), (3, 8, 2), False),  # two contracted indices
    ("btd,dn->nbt", (2, 5, 8), (8, 6), False),
    ("thd,hde->the", (5, 3, 8), (3, 8, 6), False),  # a batch index: bmm
    ("tsd,hsndr->tshnr", (5, 2, 8), (3, 2, 4, 8, 2), False),  # the authors' one einsum
    ("hsndr,tsd->shtnr", (5, 2, 8), (3, 2, 4, 8, 2), True),
    ("...d,hndr->...hnr", (5, 8), (2, 3, 8, 2), False),  # an ellipsis
    ("...d,hndr->...hnr", (2, 5, 8), (2, 3, 8, 2), False),
    ("td,nd", (5, 8), (6, 8), False),  # implicit output: "nt"
]
LEFT = [
    ("td,de->t", (5, 8), (8, 6), False, "summed out of one operand"),
    ("td,hn->tdhn", (5, 8), (3, 6), False, "nothing contracted"),
]


def _token_dim(equation: str, weight_first: bool) -> int:
    """The activation's dynamic axis: its ``t``, else its first (an ellipsis's)."""
    act = equation.split("->")[0].split(",")[1 if weight_first else 0]
    return act.index("t") if "t" in act else 0


def _graph(model: OneEinsum, x: torch.Tensor) -> torch.fx.GraphModule:
    dims = {_token_dim(model.equation, model.weight_first): Dim("t", min=2)}
    return torch.export.export(model.eval(), (x,), dynamic_shapes=(dims,)).module()


def _einsums(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is torch.ops.aten.einsum.default for n in gm.graph.nodes)


@pytest.mark.parametrize(("equation", "x_shape", "w_shape", "weight_first"), REWRITTEN)
def test_a_weight_einsum_becomes_one_mm_with_the_same_numbers(
    equation: str, x_shape: tuple, w_shape: tuple, weight_first: bool
) -> None:
    torch.manual_seed(0)
    model = OneEinsum(equation, w_shape, weight_first)
    gm = _graph(model, torch.randn(*x_shape))
    result = einsum_weights_to_matmul(gm, PassContext(()))
    assert len(result.changed) == 1 and not result.refused
    assert _einsums(gm) == 0
    products = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    assert sum(n.target in products for n in gm.graph.nodes) == 1
    for tokens in (2, 3, 11):
        shape = list(x_shape)
        shape[_token_dim(equation, weight_first)] = tokens
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("equation", "x_shape", "w_shape", "weight_first", "reason"), LEFT)
def test_what_is_not_a_gemm_is_left_with_its_reason(
    equation: str, x_shape: tuple, w_shape: tuple, weight_first: bool, reason: str
) -> None:
    model = OneEinsum(equation, w_shape, weight_first)
    x = torch.randn(*x_shape)
    gm = _graph(model, x)
    result = einsum_weights_to_matmul(gm, PassContext(()))
    assert not result.changed and _einsums(gm) == 1
    assert reason in result.refused[0].reason
    torch.testing.assert_close(gm(x), model(x))


def test_two_activations_are_left_alone() -> None:
    class Bilinear(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.einsum("td,te->tde", a, b)

    a, b = torch.randn(4, 3), torch.randn(4, 5)
    gm = torch.export.export(Bilinear(), (a, b)).module()
    result = einsum_weights_to_matmul(gm, PassContext(()))
    assert not result.changed and "one activation and one weight" in result.refused[0].reason


class ViewsOfParameters(nn.Module):
    """Weights as research code reaches them: slices, selects, transposes, casts and a
    concatenation of parameters, and a buffer it writes in place (state: no weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(3, 2, 6, 8))
        self.proj = nn.Parameter(torch.randn(6, 8))
        self.extra = nn.Parameter(torch.randn(2, 8))
        self.register_buffer("state", torch.randn(8, 4))

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        left = torch.einsum("thd,hnd->thn", q, self.keys[:, 0])
        right = torch.einsum("thd,hdn->thn", q, self.keys.select(1, 1).transpose(1, 2))
        cast = torch.einsum("thd,nd->thn", q, self.proj.to(torch.float64).to(q.dtype))
        joined = torch.einsum("thd,nd->thn", q, torch.cat([self.proj, self.extra]))
        self.state.mul_(1.0)
        stateful = torch.einsum("thd,dn->thn", q, self.state)
        return left, right, cast, joined, stateful


def test_every_weight_only_expression_is_a_weight_and_state_is_not() -> None:
    torch.manual_seed(0)
    model = ViewsOfParameters().eval()
    q = torch.randn(5, 3, 8)
    gm = torch.export.export(model, (q,), dynamic_shapes=({0: Dim("t", min=2)},)).module()
    result = einsum_weights_to_matmul(gm, PassContext(()))
    assert len(result.changed) == 4, result.changed
    assert [r.reason for r in result.refused] == ["not one activation and one weight"]
    for tokens in (2, 7):
        x = torch.randn(tokens, 3, 8)
        with torch.no_grad():
            for got, want in zip(gm(x), model(x), strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("...d,hndr->...hnr", [(5, 8), (2, 3, 8, 2)]),
        ("...d,hndr->...hnr", [(4, 5, 8), (2, 3, 8, 2)]),
        ("...ij,...jk", [(2, 3, 4), (4, 5)]),
        ("td,nd", [(5, 8), (6, 8)]),
        ("bij,jk", [(2, 3, 4), (4, 5)]),
    ],
)
def test_spelled_out_equations_are_einsums_own_reading(equation: str, shapes: list) -> None:
    operands = [torch.randn(*s) for s in shapes]
    spelled = _explicit(equation, [len(s) for s in shapes])
    assert "..." not in spelled and "->" in spelled
    torch.testing.assert_close(torch.einsum(spelled, *operands), torch.einsum(equation, *operands))
