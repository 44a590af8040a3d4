"""The ``ultramem`` ONNX domain: op schemas, the exporter's translation, function bodies.

Version 1 of the domain has two ops, one per fused ``torch.library`` op:

``ultramem::Retrieve`` (row_scores, col_scores, row_weight, col_weight, cores) -> (scores, slots)
    attributes ``topm`` (int), ``topk`` (int), ``activation`` ("none" | "relu" | "softmax")
``ultramem::Aggregate`` (values, scores, slots, [slot_map]) -> pooled
    attributes ``expansion`` (int), ``mapping`` ("mod" | "div"), ``pooling`` ("add" |
    "scatter"), ``row_offset`` (int)

Shapes, dtypes and semantics are those of ``ultramem::retrieve`` / ``ultramem::aggregate``
(``kernels/``). Each node also names an ``overload`` (one per attribute set) whose
model-local function holds the same computation in standard ONNX (``onnx_bodies``):
stock ONNX Runtime runs that body, a runtime with our kernel can run the node itself,
and ``portable`` files have the bodies inlined for tools that do not read functions.

The exporter only emits a custom node for an op that has a registered ``OpSchema``, so
``register_schemas`` runs before every export.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx import defs, helper, inliner
from onnx.defs import OpSchema
from onnxscript.values import Opset

import ultramem.kernels  # noqa: F401  (registers torch.ops.ultramem)
from ultramem.compiler.onnx_bodies import aggregate_body, retrieve_body

DOMAIN = "ultramem"
VERSION = 1
FORMS = ("custom", "portable")

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_INDICES = ["tensor(int64)", "tensor(int32)"]
_Param = OpSchema.FormalParameter
_Attr = OpSchema.Attribute
_INT, _STRING = OpSchema.AttrType.INT, OpSchema.AttrType.STRING
_OPTIONAL = OpSchema.FormalParameterOption.Optional

RETRIEVE_INPUTS = ["row_scores", "col_scores", "row_weight", "col_weight", "cores"]
RETRIEVE_OUTPUTS = ["scores", "slots"]
AGGREGATE_INPUTS = ["values", "scores", "slots", "slot_map"]
AGGREGATE_OUTPUTS = ["pooled"]


def _schemas() -> list[OpSchema]:
    retrieve = OpSchema(
        "Retrieve",
        DOMAIN,
        VERSION,
        doc="Candidate top-m per side, Tucker-core grid scores, top-k; see kernels/retrieve.py.",
        inputs=[_Param(name, "T", "") for name in RETRIEVE_INPUTS],
        outputs=[_Param("scores", "T", "[T, H, k, M]"), _Param("slots", "I", "[T, H, k]")],
        type_constraints=[("T", _FLOATS, "score dtype"), ("I", ["tensor(int64)"], "slot ids")],
        attributes=[
            _Attr("topm", _INT, "candidates kept per side"),
            _Attr("topk", _INT, "slots kept per head"),
            _Attr("activation", _STRING, "none, relu or softmax (over the k)"),
        ],
    )
    aggregate = OpSchema(
        "Aggregate",
        DOMAIN,
        VERSION,
        doc="Gather value rows, weight by core, pool per expansion id; see kernels/aggregate.py.",
        inputs=[
            _Param("values", "T", "[R, Dv]"),
            _Param("scores", "T", "[T, H, k, M]"),
            _Param("slots", "I", "[T, H, k]"),
            _Param("slot_map", "tensor(int64)", "", param_option=_OPTIONAL),
        ],
        outputs=[_Param("pooled", "T", "[T, E, Dv]")],
        type_constraints=[("T", _FLOATS, "value dtype"), ("I", _INDICES, "slot ids")],
        attributes=[
            _Attr("expansion", _INT, "E, virtual slots per value row"),
            _Attr("mapping", _STRING, "mod or div: virtual slot -> (row, group)"),
            _Attr("pooling", _STRING, "add or scatter (last wins)"),
            _Attr("row_offset", _INT, "rotation of the table's rows"),
        ],
    )
    return [retrieve, aggregate]


def register_schemas() -> None:
    """Make the exporter (onnxscript) and the checker know the ops; idempotent."""
    for schema in _schemas():
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


_OPSET = Opset(DOMAIN, VERSION)


def _retrieve(
    row_scores: Any,
    col_scores: Any,
    row_weight: Any,
    col_weight: Any,
    cores: Any,
    topm: int,
    topk: int,
    activation: str = "none",
) -> Any:
    return _OPSET.Retrieve(
        row_scores,
        col_scores,
        row_weight,
        col_weight,
        cores,
        topm=topm,
        topk=topk,
        activation=activation,
    )


def _aggregate(
    values: Any,
    scores: Any,
    slots: Any,
    slot_map: Any,
    expansion: int,
    mapping: str = "mod",
    pooling: str = "add",
    row_offset: int = 0,
) -> Any:
    return _OPSET.Aggregate(
        values,
        scores,
        slots,
        slot_map,
        expansion=expansion,
        mapping=mapping,
        pooling=pooling,
        row_offset=row_offset,
    )


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: one custom node per op."""
    register_schemas()
    return {
        torch.ops.ultramem.retrieve.default: _retrieve,
        torch.ops.ultramem.aggregate.default: _aggregate,
    }


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, strings decoded."""
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _function_for(node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
    a = node_attributes(node)
    if node.op_type == "Retrieve":
        activation = a.get("activation", "none")
        overload = f"m{a['topm']}_k{a['topk']}_{activation}"
        body = retrieve_body(a["topm"], a["topk"], activation)
        inputs, outputs = RETRIEVE_INPUTS, RETRIEVE_OUTPUTS
    elif node.op_type == "Aggregate":
        mapping, pooling = a.get("mapping", "mod"), a.get("pooling", "add")
        offset = a.get("row_offset", 0)
        has_map = len(node.input) > 3 and bool(node.input[3])
        overload = f"e{a['expansion']}_{mapping}_{pooling}_o{offset}" + ("_map" if has_map else "")
        body = aggregate_body(a["expansion"], mapping, pooling, offset, has_map)
        inputs, outputs = AGGREGATE_INPUTS, AGGREGATE_OUTPUTS
    else:
        raise ValueError(f"{DOMAIN}::{node.op_type} is not an op of domain version {VERSION}")
    return helper.make_function(
        DOMAIN,
        node.op_type,
        inputs,
        outputs,
        body,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=sorted(a),
        overload=overload,
        doc_string=f"reference semantics of {DOMAIN}::{node.op_type} for these attributes",
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_functions(model: onnx.ModelProto) -> int:
    """Give every ``ultramem`` node its overload and the model its function; return the count."""
    opset = default_opset(model)
    known = {(f.domain, f.name, f.overload) for f in model.functions}
    count = 0
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        function = _function_for(node, opset)
        node.overload = function.overload
        count += 1
        if (DOMAIN, node.op_type, function.overload) not in known:
            model.functions.append(function)
            known.add((DOMAIN, node.op_type, function.overload))
    if count:
        model.ir_version = max(model.ir_version, 10)  # node overloads need IR 10
    return count


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The portable form: every function call replaced by its body, the domain dropped."""
    inlined = inliner.inline_local_functions(model)
    if not any(node.domain == DOMAIN for node in inlined.graph.node):
        kept = [o for o in inlined.opset_import if o.domain != DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(kept)
    return inlined
