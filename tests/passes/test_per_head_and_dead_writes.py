"""Per-head pooling as the plain aggregate op, and dead writes into fresh buffers.

An ``aggregate`` whose group map sends head h to its own groups h·E .. h·E + E - 1 must
equal H separate per-head aggregates (the reference, run head by head): per-head pooling
needs no op of its own. ``finish`` may drop an in-place write only when it writes a fresh
buffer that nothing reads.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ultramem.compiler.capture import capture
from ultramem.kernels import aggregate_reference
from ultramem.passes.base import finish


@pytest.mark.parametrize("pooling", ["add", "scatter"])
@pytest.mark.parametrize("per_head_rows", [False, True])
def test_a_per_head_group_map_pools_each_head_apart(pooling: str, per_head_rows: bool) -> None:
    tokens, heads, k, cores, rows, dim, expansion, slot_count = 5, 3, 6, 2, 10, 8, 4, 40
    values = torch.randn(rows, dim)
    weights = torch.randn(tokens, heads, k, cores)
    slots = torch.randint(0, slot_count, (tokens, heads, k))
    slots[:, :, -1] = slots[:, :, 0]  # repeats inside a head: scatter's "last wins" matters
    row_map = torch.randint(0, rows, (heads if per_head_rows else 1, slot_count))
    group_map = torch.randint(0, expansion, (heads, slot_count))
    want = torch.stack(
        [
            aggregate_reference(
                values,
                weights[:, h : h + 1],
                slots[:, h : h + 1],
                row_map[h : h + 1] if per_head_rows else row_map,
                group_map[h : h + 1],
                expansion,
                pooling,
            )
            for h in range(heads)
        ],
        dim=1,
    )  # [T, H, E, Dv]
    moved = group_map + torch.arange(heads).view(-1, 1) * expansion
    got = aggregate_reference(values, weights, slots, row_map, moved, heads * expansion, pooling)
    torch.testing.assert_close(got.view(tokens, heads, expansion, dim), want, atol=1e-6, rtol=1e-6)


class _Writes(nn.Module):
    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        buf = x.new_zeros(x.shape[0], 4)
        buf.scatter_(1, torch.zeros_like(x[:, :1], dtype=torch.long), x[:, :1])
        return (x * 2, buf) if self.keep else x * 2


def _scatters(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is torch.ops.aten.scatter_.src for n in gm.graph.nodes)


@pytest.mark.parametrize("keep", [False, True])
def test_dead_write_into_a_fresh_buffer_goes_and_a_read_one_stays(keep: bool) -> None:
    x = torch.randn(3, 5)
    gm = capture(_Writes(keep).eval(), (x,)).program.graph_module
    assert _scatters(gm) == 1
    finish(gm)
    assert _scatters(gm) == (1 if keep else 0)
