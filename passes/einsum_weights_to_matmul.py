"""Turn an einsum of an activation with a weight into one matrix product.

Rewrite: ``einsum("td,hndr->thnr", x, W)`` with ``W`` a weight (anything computed from
parameters and buffers alone: ``keys[:, 0]``, a transpose, a cast; see ``Weights``) and a
plain contraction → ``mm(x', W')`` and a reshape (and a permute where the output's order
asks for one), where ``W'`` is a new weight: ``W`` permuted to ``[contracted..., kept...]``
and flattened to 2-D once, at compile time. An index both operands and the output share (the
paper authors' ``einsum("tsd,hsndr->tshnr", q, keys)`` scores both sides at once) is a
batch: ``bmm`` with ``W'`` laid out ``[batch, contracted, kept]`` once. Memory layers score
their product keys this way; an einsum kernel (ONNX Runtime's, or torch's when the weight's
layout is not the GEMM's) re-lays the weight out on every call, which at decode sizes costs
more than the product itself (80 % of ONNX Runtime's time for the paper-scale layer at one
token).

Constraints: two operands, exactly one of them a weight; no ellipsis, no index repeated
within an operand, no index summed out of one operand alone, something contracted (each
is left as it is, and counted as refused with its reason). The product is the same sum
with another association order, so the pipeline's parity run of the rewritten program is
what proves it, as for every pass.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from ._graph import Weights
from .base import PassContext, PassResult, Refusal, count_nodes, finish

_EINSUM = torch.ops.aten.einsum.default
_ATEN = torch.ops.aten


def _explicit(equation: str, ranks: list[int]) -> str:
    """``equation`` with its ellipses spelled out as letters (from the operands' ranks) and
    its output written (einsum's rule: the indices seen once, in alphabetical order)."""
    equation = equation.replace(" ", "")
    inputs, arrow, out = equation.partition("->")
    operands = inputs.split(",")
    if len(operands) != len(ranks):
        return equation
    unused = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    widest = max(
        (r - len(t) + 3 for t, r in zip(operands, ranks, strict=True) if "..." in t), default=0
    )
    spelled = "".join(unused[:widest])
    # ellipsis dims broadcast right-aligned: an operand with fewer takes the last letters
    operands = [
        t.replace("...", spelled[widest - (r - len(t) + 3) :]) if "..." in t else t
        for t, r in zip(operands, ranks, strict=True)
    ]
    if arrow:
        out = out.replace("...", spelled)
    else:
        letters = "".join(operands)
        out = spelled + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1 and c not in spelled)
        )
    return ",".join(operands) + "->" + out


def _plan(equation: str, weight_first: bool) -> tuple[str, str, str] | str:
    """(activation's indices, weight's, output's), or why the einsum is not a GEMM."""
    if "..." in equation or "->" not in equation:
        return "ellipsis or implicit output"
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return "not two operands"
    weight, act = (operands[0], operands[1]) if weight_first else (operands[1], operands[0])
    for term in (act, weight, out):
        if len(set(term)) != len(term):
            return f"index repeated in {term!r}"
    if not (set(act) & set(weight)) - set(out):
        return "nothing contracted"
    if (set(act) ^ set(weight)) - set(out) or set(out) - set(act) - set(weight):
        return "an index summed out of one operand alone"
    return act, weight, out


def _call(gm: GraphModule, target: object, *args: object) -> Node:
    return gm.graph.call_function(target, tuple(args))


def _rewrite(gm: GraphModule, node: Node, x: Node, weight: torch.Tensor, plan: tuple) -> str:
    act, w_terms, out = plan
    batch = [c for c in w_terms if c in act and c in out]
    contracted = [c for c in act if c in w_terms and c not in out]
    kept_act = [c for c in act if c not in w_terms]
    kept_w = [c for c in w_terms if c not in act]
    w_size = dict(zip(w_terms, weight.shape, strict=True))
    inner = math.prod(w_size[c] for c in contracted)
    batches = math.prod(w_size[c] for c in batch)
    flat = weight.permute([w_terms.index(c) for c in batch + contracted + kept_w])
    flat = flat.reshape(*([batches] if batch else []), inner, -1).contiguous()
    name = f"_einsum_weight_{node.name}"
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, flat)
    with gm.graph.inserting_before(node):
        lhs = x
        order = [act.index(c) for c in batch + kept_act + contracted]
        if order != list(range(len(act))):
            lhs = _call(gm, _ATEN.permute.default, lhs, order)
        sizes = [_call(gm, _ATEN.sym_size.int, x, act.index(c)) for c in kept_act]
        if batch:
            lhs = _call(gm, _ATEN.reshape.default, lhs, [batches, -1, inner])
            product = _call(gm, _ATEN.bmm.default, lhs, gm.graph.get_attr(name))
        else:
            lhs = _call(gm, _ATEN.reshape.default, lhs, [-1, inner])
            product = _call(gm, _ATEN.mm.default, lhs, gm.graph.get_attr(name))
        shape = [*(w_size[c] for c in batch), *sizes, *(w_size[c] for c in kept_w)]
        result = _call(gm, _ATEN.reshape.default, product, shape)
        produced = batch + kept_act + kept_w
        order = [produced.index(c) for c in out]
        if order != list(range(len(out))):
            result = _call(gm, _ATEN.permute.default, result, order)
    node.replace_all_uses_with(result)
    kind = "bmm" if batch else "mm"
    return f"{node.name}: {node.args[0]} -> {kind} with {name} {tuple(flat.shape)}"


def einsum_weights_to_matmul(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult(gm, "einsum_weights_to_matmul", nodes_before=count_nodes(gm))
    weights = Weights(gm)
    for node in list(gm.graph.nodes):
        if node.target is not _EINSUM or len(node.args) < 2:
            continue
        equation, operands = node.args[0], node.args[1]
        if not isinstance(equation, str) or not isinstance(operands, (list, tuple)):
            continue
        result.matched.append(node.name)
        values = [weights.value(o) for o in operands]
        if len(operands) != 2 or sum(v is not None for v in values) != 1:
            result.refused.append(Refusal(node.name, "not one activation and one weight"))
            continue
        first = values[0] is not None
        ranks = [
            len(o.meta["val"].shape) if isinstance(o, Node) and "val" in o.meta else -1
            for o in operands
        ]
        if min(ranks) >= 0 and ("..." in equation or "->" not in equation):
            equation = _explicit(equation, ranks)
        plan = _plan(equation, weight_first=first)
        if isinstance(plan, str):
            result.refused.append(Refusal(node.name, f"{equation!r}: {plan}"))
            continue
        weight, x = (values[0], operands[1]) if first else (values[1], operands[0])
        if weight is None or not isinstance(x, Node):
            result.refused.append(Refusal(node.name, "the activation is not a tensor"))
            continue
        result.changed.append(_rewrite(gm, node, x, weight.detach(), plan))
    finish(gm)
    result.nodes_after = count_nodes(gm)
    return result
