"""Whether ONNX Runtime has a kernel for every node of a file, in the file's own types.

ONNX Runtime's CPU provider has no bfloat16 kernel for many operators (TopK, Einsum below
opset 28, ReduceSum ...): a bf16 model's file cannot load there. That is no verdict on the
file, so parity reports the stage as not executed, decided here from the file and the
runtime's own kernel registry (``get_all_opkernel_def``), never from an error message.
Float16 needs no kernel of its own: the CPU provider casts a float16 node without one to
float32 and back (its InsertCastTransformer), except where it registers a kernel that
then refuses the type at run time (``REFUSED_AT_RUN``: a scatter with a reduction).
"""

from __future__ import annotations

import functools

import onnx
from onnx import TensorProto, inliner, shape_inference

# element types a provider may lack kernels for, and no transformer casts around
UNCAST_TYPES = {TensorProto.BFLOAT16: "tensor(bfloat16)"}
# kernels the CPU provider registers for a type but refuses when they run, by attribute
# (onnxruntime/core/providers/cpu/tensor/scatter.cc: "MLFloat16 data type is not
# supported with ScatterElements opset 16 when reduction is 'add'"); registered, so no
# cast is inserted around them either
REFUSED_AT_RUN = {
    ("ScatterElements", "reduction"): {TensorProto.FLOAT16},
    ("ScatterND", "reduction"): {TensorProto.FLOAT16},
}
HALF_TYPES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@functools.cache
def _kernel_types(provider: str) -> dict[tuple[str, str], list[tuple[int, int, set[str]]]]:
    """(domain, op) -> [(first opset, last opset, every type any constraint admits)]."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    table: dict[tuple[str, str], list[tuple[int, int, set[str]]]] = {}
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider != provider:
            continue
        admitted = {t for types in kernel.type_constraints.values() for t in types}
        first, last = kernel.version_range
        table.setdefault((kernel.domain, kernel.op_name), []).append((first, last, admitted))
    return table


def missing_kernels(model: onnx.ModelProto, provider: str = "CPUExecutionProvider") -> list[str]:
    """``"Op (type)"`` for every standard operator of ``model`` (model-local functions
    inlined) that reads or writes a tensor of a type in ``UNCAST_TYPES`` for which the
    provider registers no kernel at the model's opset, or that ``REFUSED_AT_RUN`` lists;
    empty when every node runs."""
    if not any(_holds_half(model.graph)):
        return []
    try:
        model = shape_inference.infer_shapes(inliner.inline_local_functions(model))
    except Exception:  # onnx cannot type it: the runtime's own load decides
        return []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = _value_types(model.graph)
    table = _kernel_types(provider)
    missing: dict[str, None] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        used = {types.get(name) for name in [*node.input, *node.output] if name}
        for (op, attribute), refused in REFUSED_AT_RUN.items():
            reduced = any(a.name == attribute and a.s not in (b"", b"none") for a in node.attribute)
            for elem in refused & used if node.op_type == op and reduced else ():
                missing[f"{op} with {attribute} ({HALF_TYPES[elem]})"] = None
        for elem, name in UNCAST_TYPES.items():
            if elem not in used:
                continue
            kernels = table.get(("", node.op_type), [])
            if not any(lo <= opset <= hi and name in ok for lo, hi, ok in kernels):
                missing[f"{node.op_type} ({name.removeprefix('tensor(').rstrip(')')})"] = None
    return list(missing)


def _holds_half(graph: onnx.GraphProto) -> list[bool]:
    values = [*graph.input, *graph.output, *graph.value_info]
    found = [v.type.tensor_type.elem_type in HALF_TYPES for v in values]
    return [*found, *(t.data_type in HALF_TYPES for t in graph.initializer)]


def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:  # constants carry their type in the attribute
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
    return types
