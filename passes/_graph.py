"""Graph queries shared by the passes: reachability, post-dominators, sub-graphs, values."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node
from torch.utils._pytree import tree_map


def graph_order(graph: Graph) -> dict[Node, int]:
    """Each node's position: the one order passes sort by (never names or set iteration)."""
    return {n: i for i, n in enumerate(graph.nodes)}


def in_graph_order(nodes: Iterable[Node], order: dict[Node, int]) -> list[Node]:
    return sorted(nodes, key=order.__getitem__)


def size_node(graph: Graph, tensor: Node, dim: int) -> Node:
    """A node computing ``tensor.shape[dim]`` (inserted after ``tensor``)."""
    with graph.inserting_after(tensor):
        node = graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
    node.meta["val"] = tensor.meta["val"].shape[dim]
    return node


def node_inputs(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


def ancestors(
    nodes: Iterable[Node], *, through_sizes: bool = True, stop: Iterable[Node] = ()
) -> set[Node]:
    """Every node the given ones are computed from. Without ``through_sizes`` a symbolic
    size is a leaf (a later tensor's ``sym_size`` says nothing about data flow); ``stop``
    nodes are leaves too."""
    leaves = set(stop)
    seen: set[Node] = set()
    stack = [i for n in nodes for i in node_inputs(n)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            if n not in leaves and (through_sizes or not is_symint(n)):
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


def same_size(a: object, b: object) -> bool:
    """Two sizes known equal without adding a guard: the same int, or the same symbol."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return type(a) is int and type(b) is int and a == b


def is_symint(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.SymInt)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def widened(value: Any) -> Any:
    """``value`` in fp32 if it is a half-precision tensor or dtype; else itself."""
    if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
        return value.float()
    if isinstance(value, torch.dtype) and value in HALF_DTYPES:
        return torch.float32
    return value


class WidenedInterpreter(Interpreter):
    """Runs a graph with every half-precision tensor, and every dtype argument that would
    make one, in fp32 (an fp32 graph runs as it is).

    The binders prove that a sub-graph computes an op's maths by evaluating both. In the
    model's own half precision, rounding decides near-ties and adds errors no two
    backends share, so no hypothesis would reproduce the model exactly; the maths is the
    same in every dtype, so it is proven where rounding is negligible, and the fused
    model is then held to the dtype's near-tie rule by parity (``compiler/rewrite.py``).
    A weight written in place is widened once per run, so later reads see the writes.
    """

    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self._weights: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = tree_map(widened, self.fetch_args_kwargs_from_env(n))
            if n.op == "get_attr":
                if n.target not in self._weights:
                    self._weights[str(n.target)] = widened(self.get_attr(n.target, args, kwargs))
                return self._weights[str(n.target)]
            return widened(getattr(self, n.op)(n.target, args, kwargs))


def run_widened(gm: GraphModule, *inputs: Any) -> Any:
    """``gm(*inputs)`` evaluated by :class:`WidenedInterpreter`."""
    with torch.no_grad():
        return WidenedInterpreter(gm).run(*inputs)


def record_values(gm: GraphModule, inputs: tuple[Any, ...], wanted: set[Node]) -> dict[Node, Any]:
    """Run ``gm`` once, widened to fp32 (:class:`WidenedInterpreter`), and keep the values
    of ``wanted`` nodes."""
    values: dict[Node, Any] = {}

    class _Recorder(WidenedInterpreter):
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


VIEW_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.dims,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.t.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.unflatten.int,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.expand_as.default,
    torch.ops.aten.view_as.default,
}

# Their value depends only on their tensor argument's shape, dtype and device.
SHAPE_ONLY_OPS = {
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.new_ones.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_full.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.ones_like.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.full_like.default,
    torch.ops.aten.sym_size.int,
}


def is_pure(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.target in (operator.getitem, operator.mul, operator.add, operator.floordiv)
    return not schema.is_mutable and "rand" not in schema.name


def _returns_alias(node: Node) -> bool:
    """The op's result may be its first argument itself (``x.to(x.device)`` is ``x``): its
    schema says so (``Tensor(a) self -> Tensor(a)``), whatever the op."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or not schema.arguments:
        return False
    out, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return out is not None and first is not None and not out.is_write


def view_base(node: Node) -> Node:
    while (
        node.op == "call_function"
        and (node.target in VIEW_OPS or _returns_alias(node))
        and node.args
    ):
        arg = node.args[0]
        if not isinstance(arg, Node):
            break
        node = arg
    return node


def mutations(graph: Graph) -> dict[Node, list[Node]]:
    """For each tensor (traced back through views) written in place: the ops writing it."""
    out: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        writes = {
            a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
        }
        written = [
            a for a, arg in zip(node.args, schema.arguments, strict=False) if arg.name in writes
        ]
        written += [v for k, v in node.kwargs.items() if k in writes]
        for w in written:
            if isinstance(w, Node):
                out.setdefault(view_base(w), []).append(node)
    return out


def written_through(graph: Graph) -> set[Node]:
    """Every node an in-place write reaches: the written tensor and each view or alias
    between it and its base (``start.clone().to(d).add_(n)`` writes the clone: two such
    clones are two buffers, however equal their creation)."""
    out: set[Node] = set()
    for writers in mutations(graph).values():
        for writer in writers:
            schema = writer.target._schema  # type: ignore[union-attr]
            names = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
            args = dict(zip([a.name for a in schema.arguments], writer.args, strict=False))
            args.update(writer.kwargs)
            for name in names:
                node = args.get(name)
                while isinstance(node, Node) and node not in out:
                    out.add(node)
                    is_alias = node.op == "call_function" and (
                        node.target in VIEW_OPS or _returns_alias(node)
                    )
                    node = node.args[0] if is_alias and node.args else None
    return out


def mutated_bases(graph: Graph) -> set[Node]:
    """Tensors (traced back through views) that some op in the graph writes in place."""
    return set(mutations(graph))


class DataDependence:
    """Whether a node's value depends on the values (not only the shapes) of an input.

    A buffer written in place (``matmul(..., out=buf[i])``, ``buf[:, i] = ...``) holds what
    was written, not what its creation says: it counts as data (conservatively).
    """

    def __init__(self, graph: Graph) -> None:
        self._written = set(mutations(graph))
        self._cache: dict[Node, bool] = {}

    def created_from_data(self, node: Node) -> bool:
        """Whether what created ``node`` depends on data, whatever is written into it later
        (a ``torch.zeros(T, E, D)`` a region scatters into does not)."""
        if node.op == "placeholder":
            return True
        inputs = node.all_input_nodes[1:] if node.target in SHAPE_ONLY_OPS else node.all_input_nodes
        return any(self(a) for a in inputs)

    def __call__(self, node: Node) -> bool:
        if node in self._cache:
            return self._cache[node]
        if node.op == "placeholder" or view_base(node) in self._written:
            result = True
        elif node.op == "get_attr":
            result = False
        elif node.target in SHAPE_ONLY_OPS:  # the first argument lends only its shape
            result = any(self(a) for a in node.all_input_nodes[1:])
        else:
            result = any(self(a) for a in node.all_input_nodes)
        self._cache[node] = result
        return result


class Weights:
    """What counts as a weight, for every pass that treats weights specially: a value
    computed from parameters and buffers alone, whatever the code did to reach it (a slice
    ``keys[:, 0]``, a select, a view, a transpose, a cast, a reshape, a concatenation of
    several), unless something writes it in place (state, not a weight)."""

    def __init__(self, gm: GraphModule) -> None:
        self._gm = gm
        self._written = written_through(gm.graph)
        self._cache: dict[Node, Any] = {}

    def value(self, node: object) -> torch.Tensor | None:
        if not isinstance(node, Node) or node in self._written:
            return None
        # an input's descendant is no weight: known from the ancestry, before any evaluation
        if any(a.op == "placeholder" or a in self._written for a in ancestors([node])):
            return None
        value = evaluate_constant(self._gm, node, self._cache)
        return value if isinstance(value, torch.Tensor) else None


def evaluate_constant(gm: GraphModule, node: Node, cache: dict[Node, Any]) -> Any:
    """The value of a node computed from weights alone (``None`` if it reads an input)."""
    if node in cache:
        return cache[node]
    value: Any = None
    if node.op == "get_attr":
        value = get_attr_value(gm, node)
    elif node.op == "call_function" and node.all_input_nodes and is_pure(node):
        inputs = [evaluate_constant(gm, i, cache) for i in node.all_input_nodes]
        if all(v is not None for v in inputs):
            env = dict(zip(node.all_input_nodes, inputs, strict=True))
            args = tree_map(lambda a: env[a] if isinstance(a, Node) else a, node.args)
            kwargs = tree_map(lambda a: env[a] if isinstance(a, Node) else a, node.kwargs)
            with torch.no_grad():
                value = node.target(*args, **kwargs)
    cache[node] = value
    return value


def size_of_symbol(gm: GraphModule, size: torch.SymInt, before: Node) -> Node | None:
    """A node computing the symbolic size ``size``: one already computed before ``before``,
    else a new ``sym_size`` of a model input with that size (None if neither exists)."""
    expr = str(size.node.expr)
    for node in gm.graph.nodes:
        if node is before:
            break
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and str(val.node.expr) == expr:
            return node
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            for dim, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and str(s.node.expr) == expr:
                    return size_node(gm.graph, node, dim)
    return None


def fill_meta(gm: GraphModule) -> None:
    """Give nodes a rewrite inserted the ``meta["val"]`` the captured ones carry: their
    output computed on the inputs' fake values (symbolic sizes included) in the capture's
    fake mode."""
    from torch._guards import detect_fake_mode

    fakes = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(fakes)
    if mode is None:
        return

    def value(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, Node) else a

    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            args, kwargs = tree_map(value, node.args), tree_map(value, node.kwargs)
            with mode, torch.no_grad():
                node.meta["val"] = node.target(*args, **kwargs)
        elif node.op == "get_attr" and "val" not in node.meta:
            with mode:
                node.meta["val"] = mode.from_tensor(get_attr_value(gm, node))
