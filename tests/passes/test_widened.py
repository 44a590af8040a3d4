"""``WidenedInterpreter``: a half-precision graph evaluated in fp32, dtype arguments too,
against the same maths written in fp32 by hand."""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule

from ultramem.passes._graph import record_values, run_widened


class _Half(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8).bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.w).to(torch.bfloat16)  # a cast the model spells out
        return y + torch.full_like(y, 0.1, dtype=torch.bfloat16)  # a dtype argument


def test_every_half_tensor_and_dtype_argument_runs_in_fp32() -> None:
    module = _Half()
    gm = torch.fx.symbolic_trace(module)
    x = torch.randn(4, 8).bfloat16()
    got = run_widened(gm, x)
    want = x.float() @ module.w.float() + 0.1  # fp32 throughout: no rounding to bf16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(got, module(x).float())  # the model itself rounds


def test_a_weight_written_in_place_is_read_back_written() -> None:
    root = torch.nn.Module()
    root.register_buffer("buf", torch.zeros(3, dtype=torch.float16))
    graph = Graph()
    x = graph.placeholder("x")
    graph.call_method("copy_", (graph.get_attr("buf"), x))
    later = graph.get_attr("buf")  # a second read of the same buffer
    graph.output(graph.call_function(torch.mul, (later, 2)))
    gm = GraphModule(root, graph)
    out = run_widened(gm, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16))
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0, 6.0]))
    assert torch.equal(root.buf, torch.zeros(3, dtype=torch.float16))  # the model's untouched
    values = record_values(gm, (torch.ones(3, dtype=torch.float16),), {later})
    assert values[later].dtype == torch.float32
