"""What every pass takes and returns.

Passes rewrite the *unlifted* graph module of a captured program (``program.module()``:
weights are ``get_attr`` nodes, so a pass can read them, fold them and add new ones);
the pipeline (``ultramem.compiler.rewrite``) re-captures the result with ``torch.export``.
One signature for all::

    def fold_constants(gm: GraphModule, ctx: PassContext) -> PassResult
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch.fx import GraphModule, Node

from ._graph import SHAPE_ONLY_OPS


@dataclass
class PassContext:
    """Inputs a pass may need besides the graph."""

    example_inputs: tuple[Any, ...]
    # memory layers (named by their final top-k node) that must stay unfused, e.g. after
    # their fusion failed parity and was rolled back
    skip_layers: set[str] = field(default_factory=set)
    # passes (by function name) left out, e.g. after one changed the model's numbers
    disabled_passes: set[str] = field(default_factory=set)


@dataclass
class Refusal:
    """A subgraph a pass looked at and left alone, and why."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass
class PassResult:
    gm: GraphModule
    name: str
    matched: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    # what else the pass found; typed records in it (``to_json``) become JSON in ``to_json``
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "matched": self.matched,
            "changed": self.changed,
            "refused": [{"node": r.node, "reason": r.reason} for r in self.refused],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            **({"details": _jsonable(self.details)} if self.details else {}),
        }


def _jsonable(value: Any) -> Any:
    """``value`` with every typed record in it (anything with ``to_json``) as JSON."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Pass(Protocol):
    __name__: str

    def __call__(self, gm: GraphModule, ctx: PassContext) -> PassResult: ...


def calls_to(gm: GraphModule, targets: Collection[Any]) -> list[Node]:
    """The graph's calls to any of ``targets``, listed first (a pass may rewrite them)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def count_nodes(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def finish(gm: GraphModule) -> None:
    """End every pass the same way: drop dead code, lint, recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=_has_visible_effect)
    gm.graph.lint()
    gm.recompile()


def _has_visible_effect(node: Node) -> bool:
    """Impure, unless it only writes into a fresh buffer that nothing else reads
    (``x.new_zeros(...).scatter_(...)`` whose result a fusion replaced)."""
    if not node.is_impure():
        return False
    schema = getattr(node.target, "_schema", None)
    written = node.args[0] if node.args else None
    if schema is None or not schema.is_mutable or not isinstance(written, Node):
        return True
    fresh = written.op == "call_function" and written.target in SHAPE_ONLY_OPS
    return not (fresh and set(written.users) == {node} and not node.users)
