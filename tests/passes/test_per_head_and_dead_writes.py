"""Per-head pooling as the plain aggregate op, and dead writes into fresh buffers.

``per_head_slots`` must make one ``aggregate`` over H·E groups equal H separate per-head
aggregates (the reference, run head by head). ``finish`` may drop an in-place write only
when it writes a fresh buffer that nothing reads.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ultramem.compiler.capture import capture
from ultramem.kernels import aggregate_reference
from ultramem.passes.base import finish
from ultramem.passes.lookup_binding import per_head_slots


@pytest.mark.parametrize("mapping", ["mod", "div"])
@pytest.mark.parametrize("pooling", ["add", "scatter"])
@pytest.mark.parametrize("with_map", [False, True])
def test_per_head_slots_pool_each_head_apart(mapping: str, pooling: str, with_map: bool) -> None:
    tokens, heads, k, cores, rows, dim, expansion = 5, 3, 6, 2, 10, 8, 4
    slot_count = rows * expansion
    values = torch.randn(rows, dim)
    scores = torch.randn(tokens, heads, k, cores)
    slots = torch.randint(0, slot_count, (tokens, heads, k))
    slots[:, :, -1] = slots[:, :, 0]  # repeats inside a head: scatter's "last wins" matters
    smap = torch.randperm(slot_count) if with_map else None
    want = torch.stack(
        [
            aggregate_reference(
                values, scores[:, h : h + 1], slots[:, h : h + 1], smap, expansion, mapping, pooling
            )
            for h in range(heads)
        ],
        dim=1,
    )  # [T, H, E, Dv]
    moved, offsets = per_head_slots(smap, heads, slot_count, rows, expansion, mapping)
    got = aggregate_reference(
        values, scores, slots + offsets.view(1, -1, 1), moved, heads * expansion, mapping, pooling
    ).view(tokens, heads, expansion, dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


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
