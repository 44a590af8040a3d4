"""An aggregation binding: the tables, the per-selection weight factors, the row and group
maps, and how the pooled node lays out the op's ``[T, groups, Dv]`` result.

The pooled node's layout names its groups by where they come from: ``HEAD_GROUP`` (one
group per head, heads pooled apart) and ``SCATTER_GROUP`` (the groups a scatter pools
into), beside ``VALUE`` (the value dim) and tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.fx import Node

from ....kernels import aggregate_reference
from ..layouts import Layout
from ..records import AggregationSummary

HEAD_GROUP, SCATTER_GROUP, VALUE = "head_group", "scatter_group", "value"
POOLED_ROLES = (HEAD_GROUP, SCATTER_GROUP, VALUE)


@dataclass
class WeightFactor:
    """A per-selection weight the rows are multiplied by, viewed as [T, H, k, (M)]."""

    node: Node
    subs: list[list[tuple[str, int]]]  # per dim of the node: its (role, size) sub-dims
    layout: Layout  # over the split shape: roles t, h, k, c, *
    core: int | None  # a factor of one core only (a table per core)

    @property
    def split(self) -> list[int]:
        return [size for dim in self.subs for _, size in dim]

    def canonical(self, x: Tensor, heads: int) -> Tensor:
        """[T, H, k, M] (M = 1 for a factor every core shares)."""
        return self.layout.canonical(x.reshape(self.split), {"h": heads})


@dataclass(frozen=True)
class GroupSizes:
    """How many groups of each kind the pooled node holds (the op pools head × scatter)."""

    heads: int
    scatter: int

    @property
    def total(self) -> int:
        return self.heads * self.scatter


@dataclass
class AggregationBinding:
    sources: list[Node]  # retrieve calls, in the global head order
    heads: list[int]
    slot_count: int
    reads: list[Node]
    values: Tensor | None  # a table built for the op (tables per core side by side)
    table: Node | None  # or the model's own table (viewed [H·R, Dv] when per head)
    factors: list[WeightFactor]
    row_map: Tensor | None
    group_map: Tensor | None
    pooling: str
    pooled: Node
    pooled_layout: Layout  # over the pooled node: tokens and POOLED_ROLES
    group_sizes: GroupSizes
    verified_max_abs: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def groups(self) -> int:
        return self.group_sizes.total

    @property
    def total_heads(self) -> int:
        return sum(self.heads)

    @property
    def per_core(self) -> bool:
        """One table per core, each weighted by its own core's factor."""
        return len(self.reads) > 1 and all(f.core is not None for f in self.factors)

    def summary(self, shared_with: tuple[str, ...]) -> AggregationSummary:
        return AggregationSummary(
            tables=len(self.reads),
            value_dim=int(self.value_dim),
            groups=self.groups,
            pooling=self.pooling,
            row_map=None if self.row_map is None else tuple(self.row_map.shape),
            group_map=None if self.group_map is None else tuple(self.group_map.shape),
            weights=tuple(f.node.name for f in self.factors) or ("ones",),
            selections=len(self.sources),
            shared_with=shared_with,
        )

    @property
    def value_dim(self) -> int:
        if self.values is not None:
            return int(self.values.shape[1])
        return int(self.table.meta["val"].shape[-1])  # type: ignore[union-attr]

    @property
    def pooled_shape(self) -> list[int]:
        """The op's result per token as the pooled layout names it."""
        return [self.group_sizes.heads, self.group_sizes.scatter, self.value_dim]

    def weights(self, factor_values: list[Tensor], like: Tensor) -> Tensor:
        """The op's weights [T, H, k, M] from the factors' values."""
        heads = self.total_heads
        if not self.factors:
            return torch.ones_like(like, dtype=torch.float32).unsqueeze(-1)
        parts = [f.canonical(v, heads) for f, v in zip(self.factors, factor_values, strict=True)]
        if self.per_core:  # one factor per core, a table each
            return torch.cat(parts, dim=-1)
        out = parts[0]
        for p in parts[1:]:
            out = out * p
        return out

    def run(self, table: Tensor, slots: list[Tensor], factor_values: list[Tensor]) -> Tensor:
        merged = torch.cat(slots, dim=1)
        pooled = aggregate_reference(
            table, self.weights(factor_values, merged).to(table.dtype), merged,
            self.row_map, self.group_map, self.groups, self.pooling,
        )  # fmt: skip
        tokens, dim = pooled.shape[0], pooled.shape[-1]
        return pooled.reshape(tokens, self.group_sizes.heads, self.group_sizes.scatter, dim)
