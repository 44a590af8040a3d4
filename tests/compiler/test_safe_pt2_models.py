"""What ordinary models export loads through the untrusted-``.pt2`` loader unrefused.

The operator allow-list must not cost a real user their model: each model here is exported
with ``torch.export.export``, saved with ``torch.export.save``, loaded with
``load_untrusted_pt2`` and run, and its output is compared with the eager model's. Between
them they call the operators with enum-like string arguments (gelu's ``approximate``,
``rounding_mode``, ``reduce``, ``padding="same"``, interpolation and pad modes, einsum), the
higher-order operators torch.export writes (cond, map, scan, while_loop, grad and autocast
regions) and the assertions it writes for data-dependent sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.map import map as hop_map
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

from ultramem.compiler.safe_pt2 import load_untrusted_pt2


class Block(nn.Module):
    """A pre-norm transformer block: attention, layer norm, tanh-approximated GELU."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 8, mode="mean")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding="same")
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)
        y = F.interpolate(y, scale_factor=2, mode="bilinear")
        return F.pad(y, (1, 1, 1, 1), mode="reflect")


class Cond(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: x.sin(), lambda x: x.cos() * 2, (x,))


class Gather(nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        values, index = x.topk(3, -1)
        picked = x.gather(-1, index)
        scattered = torch.zeros_like(x).scatter_reduce(-1, index, values, reduce="amax")
        floored = torch.div(scattered, 0.3, rounding_mode="floor")
        floored = torch.where((x > 0) & (x < 1), floored, -floored)  # aten.__and__
        return torch.einsum("bij,jk->bik", floored + picked.sum(-1, keepdim=True), w)


class Bf16(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).softmax(-1)


class Regions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.linear(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.linear(y)
        return z.float()


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = (x > 0).sum().item()
        torch._check(n <= x.numel())
        return torch.nonzero(x > 0).float().sum(0) + x.new_ones(n).sum()


class Loops(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        doubled = hop_map(lambda row: row * 2 + 1, x)

        def step(carry: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return carry + row, (carry * row).clone()

        carry, ys = scan(step, torch.zeros_like(x[0]), doubled)
        _, halved = while_loop(
            lambda i, a: i < 3, lambda i, a: (i + 1, a * 0.5), (torch.tensor(0), carry)
        )
        return halved + ys.sum(0)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "transformer block": lambda: (Block(), (torch.randn(2, 5, 16),)),
    "embedding bag": lambda: (Bag(), (torch.randint(0, 50, (3, 4)),)),
    "conv": lambda: (Conv(), (torch.randn(1, 3, 8, 8),)),
    "torch.cond": lambda: (Cond(), (torch.randn(4),)),
    "topk gather scatter": lambda: (Gather(), (torch.randn(2, 3, 6), torch.randn(6, 5))),
    "bf16": lambda: (Bf16(), (torch.randn(2, 8, dtype=torch.bfloat16),)),
    "no_grad and autocast": lambda: (Regions(), (torch.randn(2, 8),)),
    "data-dependent size": lambda: (DataDependent(), (torch.randn(3, 4),)),
    "map scan while_loop": lambda: (Loops(), (torch.randn(3, 4),)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_an_ordinary_exported_model_loads_and_matches_eager(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model, example = MODELS[name]()
    model.eval()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, example), str(path))
    loaded = load_untrusted_pt2(path)  # raises UnsafeArchive if the allow-list is too tight
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(*example), model(*example))
