"""The ``ultramem`` ONNX domain: op schemas, the exporter's translation, function bodies.

One node per fused ``torch.library`` op, with the op's inputs, outputs and attributes as the
contract declares them (``kernels/contract.py``: names, order, dtypes, defaults, choices):
``ultramem::Retrieve`` and ``ultramem::Aggregate``, domain version ``DOMAIN_VERSION``.
Each set of attributes (and of optional inputs present) is a variant with a model-local
function of its own name, ``<Op>_<variant>`` (``Retrieve_topm8_topk8_none``), holding the
same computation in standard ONNX (``bodies``): stock ONNX Runtime runs that body, a
runtime with our kernel can run the node itself (``base_op`` gives the op), and
``portable`` files have the bodies inlined for tools that do not read functions. The name,
not the ONNX ``overload`` field, tells variants apart: onnxslim and onnx-graphsurgeon drop
``overload``, and a file with two variants of one op then ran one variant's body for both
(onnxslim, silently) or was refused ("Duplicate model-local function").

The exporter only emits a custom node for an op that has a registered ``OpSchema``, so
``register_schemas`` runs before every export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from onnx import defs, helper, inliner
from onnx.defs import OpSchema
from onnxscript.values import Opset

from ...kernels import DOMAIN, DOMAIN_VERSION, OPS, OpSpec, op_overload, op_spec
from .bodies import BODIES

_TYPES = {
    "float": ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
    "index": ["tensor(int64)", "tensor(int32)"],
}
_ATTR_TYPES = {int: OpSchema.AttrType.INT, str: OpSchema.AttrType.STRING}


def schema_for(spec: OpSpec) -> OpSchema:
    """The ``OpSchema`` of one op, from its contract. Every input of a dtype class gets its
    own type variable (the torch op lets int32 maps meet int64 slots); an output typed
    ``like:<input>`` shares that input's."""
    var = {t.name: f"T_{t.name}" for t in spec.inputs if t.dtype in _TYPES}
    inputs = []
    for t in spec.inputs:
        option = OpSchema.FormalParameterOption.Optional if t.optional else None
        kwargs = {"param_option": option} if option is not None else {}
        type_str = var.get(t.name, f"tensor({t.dtype})")
        inputs.append(OpSchema.FormalParameter(t.name, type_str, t.doc, **kwargs))
    outputs = []
    for t in spec.outputs:
        type_str = var.get(t.dtype.removeprefix("like:"), f"tensor({t.dtype})")
        outputs.append(OpSchema.FormalParameter(t.name, type_str, f"{t.shape_doc()} {t.doc}"))
    attributes = []
    for a in spec.attributes:
        doc = a.doc + (f" ({', '.join(a.choices)})" if a.choices else "")
        if a.required:
            attributes.append(OpSchema.Attribute(a.name, _ATTR_TYPES[a.kind], doc, required=True))
        else:
            default = helper.make_attribute(a.name, a.default)
            attributes.append(OpSchema.Attribute(a.name, default, doc))
    by_name = {t.name: t for t in spec.inputs}
    return OpSchema(
        spec.onnx_name,
        DOMAIN,
        DOMAIN_VERSION,
        doc=f"{spec.doc} {spec.shapes_doc()}",
        inputs=inputs,
        outputs=outputs,
        type_constraints=[
            (v, _TYPES[by_name[name].dtype], f"{name} dtype") for name, v in var.items()
        ],
        attributes=attributes,
    )


def register_schemas() -> None:
    """Make the exporter (onnxscript) and the checker know the ops; idempotent."""
    for spec in OPS:
        if not defs.has(spec.onnx_name, DOMAIN):
            defs.register_schema(schema_for(spec))


def _translation(spec: OpSpec) -> Callable[..., Any]:
    """The exporter's translation of one op: one custom node, arguments bound by name."""
    node = getattr(Opset(DOMAIN, DOMAIN_VERSION), spec.onnx_name)

    def translate(*args: Any, **kwargs: Any) -> Any:
        bound = spec.bind(*args, **kwargs)
        tensors = [bound[name] for name in spec.input_names]
        return node(*tensors, **{name: bound[name] for name in spec.attribute_names})

    translate.__name__ = f"translate_{spec.name}"
    return translate


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: one custom node per op."""
    register_schemas()
    return {op_overload(spec): _translation(spec) for spec in OPS}


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, strings decoded."""
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def base_op(node: onnx.NodeProto) -> str | None:
    """The op an ``ultramem`` node runs (``Retrieve`` for ``Retrieve_topm8_topk8_none``),
    or None for a node of another domain or op."""
    if node.domain != DOMAIN:
        return None
    for spec in OPS:
        if node.op_type == spec.onnx_name or node.op_type.startswith(f"{spec.onnx_name}_"):
            return spec.onnx_name
    return None


def node_arguments(node: onnx.NodeProto) -> dict[str, Any]:
    """An ``ultramem`` node's attributes by name with the contract's defaults, and which
    optional inputs it has (``has_<name>``)."""
    spec = op_spec(base_op(node) or node.op_type)
    given = node_attributes(node)
    out: dict[str, Any] = {a.name: given.get(a.name, a.default) for a in spec.attributes}
    for i, t in enumerate(spec.inputs):
        if t.optional:
            out[f"has_{t.name}"] = len(node.input) > i and bool(node.input[i])
    return out


def variant_name(node: onnx.NodeProto) -> str:
    """One variant per attribute set and set of optional inputs present, e.g.
    ``topm8_topk8_none`` or ``groups4_add_row_map_group_map``."""
    parts = []
    for key, value in node_arguments(node).items():
        if key.startswith("has_"):
            parts += [key.removeprefix("has_")] if value else []
        else:
            parts.append(value if isinstance(value, str) else f"{key}{value}")
    return "_".join(parts)


def _function_for(node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
    op = base_op(node)
    if op is None or op not in BODIES:
        raise ValueError(
            f"{node.domain}::{node.op_type} is not an op of domain version {DOMAIN_VERSION}"
        )
    spec = op_spec(op)
    return helper.make_function(
        DOMAIN,
        f"{op}_{variant_name(node)}",
        list(spec.input_names),
        list(spec.output_names),
        BODIES[op](**node_arguments(node)),
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=sorted(node_attributes(node)),
        doc_string=f"reference semantics of {DOMAIN}::{op} for these attributes",
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_functions(model: onnx.ModelProto) -> int:
    """Name every ``ultramem`` node after its variant and give the model that variant's
    function; return the count of nodes."""
    opset = default_opset(model)
    known = {(f.domain, f.name) for f in model.functions}
    count = 0
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        function = _function_for(node, opset)
        node.op_type, node.overload = function.name, ""
        count += 1
        if (DOMAIN, function.name) not in known:
            model.functions.append(function)
            known.add((DOMAIN, function.name))
    if count:
        model.ir_version = max(model.ir_version, 8)  # model-local functions need IR 8
    return count


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The portable form: every function call replaced by its body, the domain dropped."""
    inlined = inliner.inline_local_functions(model)
    if not any(node.domain == DOMAIN for node in inlined.graph.node):
        kept = [o for o in inlined.opset_import if o.domain != DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(kept)
    return inlined
