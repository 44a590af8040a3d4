"""Graph queries shared by the passes: reachability, post-dominators, sub-graphs, values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node


def node_inputs(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


def ancestors(nodes: Iterable[Node]) -> set[Node]:
    seen: set[Node] = set()
    stack = [i for n in nodes for i in node_inputs(n)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(node_inputs(n))
    return seen


def descendants(nodes: Iterable[Node]) -> set[Node]:
    seen: set[Node] = set()
    stack = [u for n in nodes for u in n.users]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def common_post_dominator(graph: Graph, sources: list[Node]) -> Node | None:
    """The first node (in graph order) that every path from ``sources`` to the output crosses."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    output = next(n for n in graph.nodes if n.op == "output")
    reach = descendants(sources)
    last_source = max(order[s] for s in sources)
    for cand in sorted(reach, key=order.__getitem__):
        if order[cand] <= last_source or cand is output:
            continue
        if not _reaches_avoiding(sources, output, cand):
            return cand
    return None


def _reaches_avoiding(sources: list[Node], target: Node, blocked: Node) -> bool:
    seen: set[Node] = set()
    stack = [s for s in sources if s is not blocked]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        for u in n.users:
            if u is not blocked and u not in seen:
                seen.add(u)
                stack.append(u)
    return False


def is_symint(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.SymInt)


def record_values(gm: GraphModule, inputs: tuple[Any, ...], wanted: set[Node]) -> dict[Node, Any]:
    """Run ``gm`` once and keep the values of ``wanted`` nodes."""
    values: dict[Node, Any] = {}

    class _Recorder(Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return values


def extract_subgraph(
    gm: GraphModule, inputs: list[Node], outputs: list[Node], region: set[Node]
) -> GraphModule:
    """A module computing ``outputs`` from ``inputs`` with the region's nodes; weights shared."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for i, n in enumerate(inputs):
        env[n] = graph.placeholder(f"in_{i}")
    for n in gm.graph.nodes:
        if n in env:
            continue
        weight_read = n.op == "get_attr" and any(u in region for u in n.users)
        if n in region or weight_read:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[o] for o in outputs))
    return GraphModule(gm, graph)


def get_attr_value(gm: GraphModule, node: Node) -> torch.Tensor:
    target = gm
    for part in str(node.target).split("."):
        target = getattr(target, part)
    return target  # type: ignore[return-value]
