"""Which operators a graph may call: pure tensor maths, decided from the operator's
namespace and schema (no free-form string, no Python object, not called for a side effect),
the higher-order operators torch.export writes, and a few pure Python functions; each looked
up as torch's deserializer would, without calling anything."""

from __future__ import annotations

import functools
import math
import operator
import re
from typing import Any

import torch

from .common import UnsafeArchive, words

# Python functions a graph may call besides operators: pure, and unable to reach anything
SAFE_OPERATOR_FUNCTIONS = words(
    "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge "
    "and_ or_ xor not_ invert lshift rshift"
)
SAFE_TORCH_FUNCTIONS = words(
    "sym_int sym_float sym_max sym_min sym_not sym_ite sym_sqrt sym_sum sym_fresh_size"
)
SAFE_MATH_FUNCTIONS = words("ceil floor trunc sqrt exp log sin cos tan tanh fabs")

# Operators: namespaces of tensor maths (ATen, its primitives, our fused ops in kernels/);
# every other namespace (debugprims.load_tensor, profiler, c10d, custom libraries) is refused
PURE_NAMESPACES = words("aten prims ultramem")
# schema types an operator may take or return: tensors, numbers and lists of them. Not
# Python objects (Any, classes, dicts, futures), storages, streams or TorchScript's generics
DATA_TYPE_KINDS = words(
    "TensorType IntType SymIntType FloatType SymFloatType BoolType SymBoolType ComplexType "
    "NumberType NoneType DeviceObjType GeneratorType QSchemeType ListType TupleType "
    "OptionalType StringType"
)
# string arguments that pick one of a few fixed behaviours; any other string is free text,
# as a path or a message is (from_file's filename, save's filename, _print's s, warn's message)
ENUM_STRING_ARGUMENTS = words(
    "reduce rounding_mode approximate mode side interpolation norm driver UPLO ord p padding "
    "equation indexing padding_side pad_mode activation algorithm pooling"
)
# they only raise, and torch.export writes them itself; the message is text for the error
ASSERTION_OPERATORS = words(
    "_assert_scalar _assert_async _assert_tensor_metadata _functional_assert_async "
    "_functional_assert_scalar sym_constrain_range sym_constrain_range_for_size "
    "_functional_sym_constrain_range _functional_sym_constrain_range_for_size "
    "_linalg_check_errors _validate_compressed_sparse_indices _validate_sparse_coo_tensor_args "
    "_validate_sparse_compressed_tensor_args _validate_sparse_csr_tensor_args "
    "_validate_sparse_csc_tensor_args _validate_sparse_bsr_tensor_args "
    "_validate_sparse_bsc_tensor_args"
)
_FILE_WORDS = re.compile(r"(^|_)(file|save|load|pickle|mmap|dlpack|ipc)(_|$)")
DENIED_OPERATORS = {
    **dict.fromkeys(words("_print warn _test_warn_in_autograd"), "it writes to the console"),
    **dict.fromkeys(
        words(
            "manual_seed seed initial_seed set_grad_enabled record_stream wait _set_item "
            "_cufft_set_plan_cache_max_size _cufft_clear_plan_cache backward _backward "
            "dist_backward set_data _debug_has_internal_overlap"
        ),
        "it acts on process state, not on tensors",
    ),
}
# higher-order operators torch.export writes for control flow, grad/autocast regions and
# functionalized mutation; their subgraphs and operator arguments are checked like the graph
PURE_HIGHER_ORDER = words(
    "cond while_loop while_loop_stack_output map_impl scan associative_scan "
    "wrap_with_set_grad_enabled wrap_with_autocast auto_functionalized auto_functionalized_v2 "
    "invoke_subgraph out_dtype flex_attention hints_wrapper"
)
DENIED_HIGHER_ORDER = {
    "print": "it writes to the console",
    "with_effects": "it runs an operator for its side effect",
    "executorch_call_delegate": "it calls a compiled backend",
    "aoti_call_delegate": "it calls a compiled backend",
    "inductor_compiled_code": "it runs compiled code",
    "inline_asm_elementwise": "it runs inline assembly",
    "triton_kernel_wrapper_mutation": "it launches a Triton kernel",
    "triton_kernel_wrapper_functional": "it launches a Triton kernel",
    "call_torchbind": "it calls a Python object",
    "flat_apply": "it calls a Python function",
    "invoke_leaf_function": "it calls a Python function",
}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_operator(target: Any, role: str) -> None:
    if not isinstance(target, str):
        raise UnsafeArchive(f"{role} {target!r} is not an operator name")
    why = _impurity(target)
    if why:
        raise UnsafeArchive(f"{role} {target!r} is not a pure tensor operator ({why})")


def _impurity(target: str) -> str | None:
    """Why calling ``target`` could act outside its tensors, or None when it cannot."""
    parts = target.split(".")
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5):
        namespace = parts[2]
        if namespace != "higher_order" and namespace not in PURE_NAMESPACES:
            return f"namespace {namespace!r} is not ATen's, prims' or ultramem's"
    resolved = _resolve(target)
    if isinstance(resolved, torch._ops.OpOverload):
        return _operator_impurity(resolved)
    if isinstance(resolved, torch._ops.HigherOrderOperator):
        return _higher_order_impurity(resolved.name())
    if resolved is not None:
        module, attr = resolved
        if (
            (module is operator and attr in SAFE_OPERATOR_FUNCTIONS)
            or (module is torch and attr in SAFE_TORCH_FUNCTIONS)
            or (module is math and attr in SAFE_MATH_FUNCTIONS)
        ):
            return None
    return "not an operator torch.export writes"


@functools.lru_cache(maxsize=4096)  # a graph calls a few operators, many times each
def _operator_impurity(op: torch._ops.OpOverload) -> str | None:
    name = op._schema.name.split("::", 1)[1]
    if _FILE_WORDS.search(name):
        return "it reads or writes files"
    if name in DENIED_OPERATORS:
        return DENIED_OPERATORS[name]
    for argument in op._schema.arguments:
        why = _type_impurity(argument.type, argument.name)
        if why and not (name in ASSERTION_OPERATORS and why.startswith("free-form")):
            return f"its argument {argument.name!r} is {why}"
    for returned in op._schema.returns:
        why = _type_impurity(returned.type, "")
        if why:
            return f"it returns {why}"
    if name not in ASSERTION_OPERATORS and not op._schema.returns and not _writes_a_tensor(op):
        return "it returns nothing and writes no tensor: it is called for a side effect"
    return None


def _type_impurity(kind: Any, argument: str) -> str | None:
    """Why a schema type is not tensor data; a string only as a named choice."""
    if kind.kind() not in DATA_TYPE_KINDS:
        return f"of type {kind}, not tensor data"
    if kind.kind() == "StringType" and argument not in ENUM_STRING_ARGUMENTS:
        return "free-form text, as a path or a message is"
    for contained in kind.containedTypes():
        why = _type_impurity(contained, argument)
        if why:
            return why
    return None


def _writes_a_tensor(op: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _higher_order_impurity(name: str) -> str | None:
    if name in PURE_HIGHER_ORDER:
        return None
    if name in DENIED_HIGHER_ORDER:
        return DENIED_HIGHER_ORDER[name]
    return "a higher-order operator torch.export does not write for tensor maths"


def _resolve(target: str) -> Any:
    """What torch's deserializer would resolve ``target`` to, looked up without calling
    anything: an operator object, or (module, attribute) for a plain function."""
    parts = target.split(".")
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5):
        return _resolve_operator(parts[2:])
    if any(not IDENTIFIER.fullmatch(p) or p.startswith("__") for p in parts):
        return None
    modules = {"_operator": operator, "torch": torch, "math": math}
    if len(parts) == 2 and parts[0] in modules:
        return modules[parts[0]], parts[1]
    return None


def _resolve_operator(parts: list[str]) -> Any:
    """``torch.ops.NAMESPACE.NAME[.OVERLOAD]``; NAME may be a dunder (``aten.__and__``), as
    it is looked up only among the namespace's operators."""
    namespace, name = parts[0], parts[1]
    if not all(IDENTIFIER.fullmatch(p) for p in parts) or any(
        p.startswith("__") for p in (namespace, *parts[2:])
    ):
        return None
    if namespace == "higher_order":
        hop = torch._ops._higher_order_ops.get(name)
        return hop if len(parts) == 2 and not name.startswith("__") else None
    operators = getattr(torch.ops, namespace)
    if hasattr(type(operators), name):  # the namespace object's own attributes (__class__)
        return None
    try:
        # plain getattr, as the deserializer does: it caches the one packet whose overloads
        # decomposition tables are keyed by
        packet = getattr(operators, name)
        op = getattr(packet, parts[2]) if len(parts) == 3 else None
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    return op if isinstance(op, torch._ops.OpOverload) else None
