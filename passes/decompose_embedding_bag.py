"""Write an ``embedding_bag`` of equal-size bags as a gather and a reduction.

Rewrite: ``embedding_bag(W, idx.reshape(-1), arange(0, N, n), mode, psw.reshape(-1))``,
what ``F.embedding_bag`` / ``nn.EmbeddingBag`` record for a 2-D ``idx`` [B, n], →
``reduce(W[idx] * psw[..., None], dim=1)`` with the mode's reduction (sum, mean, max).
The fusion replaces the embedding bags that pool a lookup's rows; this pass runs after it,
on those left (a lookup not fused, an embedding bag of something else): torch.onnx writes
an ``embedding_bag`` as a ``Loop`` over ``SequenceEmpty``/``ConcatFromSequence``, which
TensorRT's ONNX parser refuses ("node SequenceEmpty: false") and ONNX Runtime runs bag by
bag; a gather and a reduction are what both run well.

Constraints: offsets from an ``arange`` starting at 0 whose step is the bags' size and the
indices a flattened 2-D tensor of that width; no ``include_last_offset``, no
``padding_idx``, no ``scale_grad_by_freq`` (training only). The reduction sums in another
order than ``embedding_bag``'s loop, so the pipeline's parity run is what proves it.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ._graph import fill_meta, same_size
from .base import PassContext, PassResult, Refusal, calls_to, count_nodes, finish

aten = torch.ops.aten
_BAGS = (aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default)
_REDUCE = {0: aten.sum.dim_IntList, 1: aten.mean.dim, 2: aten.amax.default}


def _arg(node: Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _same_size(size: object, width: object) -> bool:
    """Whether two sizes are one (ints, or the same symbol: no guard is added); ``width``
    may be the node of a symbolic size."""
    if isinstance(width, Node):
        width = width.meta.get("val")
    return same_size(size, width)


def _flattened_from(node: object, width: object) -> Node | None:
    """The 2-D tensor of last dim ``width`` that ``node`` flattens, if it is one."""
    if not isinstance(node, Node) or node.target not in (aten.reshape.default, aten.view.default):
        return None
    source = node.args[0]
    if list(node.args[1]) != [-1] or not isinstance(source, Node):
        return None
    shape = source.meta["val"].shape if "val" in source.meta else None
    if shape is None or len(shape) != 2:
        return None
    return source if _same_size(shape[1], width) else None


def _plan(node: Node) -> tuple[Node, Node, Node | None, int] | str:
    """(table, 2-D ids, 2-D per-sample weights or None, mode), or why not."""
    offsets = _arg(node, 2, "offsets", None)
    if (
        not isinstance(offsets, Node)
        or offsets.target is not aten.arange.start_step
        or offsets.args[0] != 0
        or len(offsets.args) < 3
    ):
        return "offsets are not arange(0, N, bag size)"
    width = offsets.args[2]
    if _arg(node, 3, "scale_grad_by_freq", False) or _arg(node, 7, "include_last_offset", False):
        return "scale_grad_by_freq or include_last_offset"
    if _arg(node, 8, "padding_idx", None) not in (None, -1):
        return "a padding_idx"
    mode = _arg(node, 4, "mode", 0)
    if mode not in _REDUCE:
        return f"mode {mode}"
    ids = _flattened_from(node.args[1], width)
    if ids is None:
        return "the ids are not a flattened [bags, bag size] tensor"
    weights = _arg(node, 6, "per_sample_weights", None)
    per_sample = _flattened_from(weights, width) if weights is not None else None
    if weights is not None and per_sample is None:
        return "the per-sample weights are not a flattened [bags, bag size] tensor"
    read = [u for u in node.users if u.target is not operator.getitem or u.args[1] != 0]
    if any(u.users or u.target is not operator.getitem for u in read):
        return "its offsets, bag sizes or max indices are read"
    return node.args[0], ids, per_sample, mode  # type: ignore[return-value]


def decompose_embedding_bag(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "decompose_embedding_bag", nodes_before=count_nodes(gm))
    graph = gm.graph
    for node in calls_to(gm, _BAGS):
        result.matched.append(node.name)
        plan = _plan(node)
        if isinstance(plan, str):
            result.refused.append(Refusal(node.name, plan))
            continue
        table, ids, per_sample, mode = plan
        with graph.inserting_before(node):
            rows = graph.call_function(aten.embedding.default, (table, ids))
            if per_sample is not None:
                scale = graph.call_function(aten.unsqueeze.default, (per_sample, -1))
                rows = graph.call_function(aten.mul.Tensor, (rows, scale))
            pooled = graph.call_function(_REDUCE[mode], (rows, [1]))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(pooled)
        result.changed.append(f"{node.name}: mode {mode} over bags of {ids.name}")
    finish(gm)
    fill_meta(gm)
    result.nodes_after = count_nodes(gm)
    return result
