"""Load a ``.pt2`` from an untrusted source without running any of its code.

``torch.export.load`` trusts the archive: it unpickles sample inputs, pickled weights and
constants (``weights_only=False`` as a fallback), ``sympify``s (``eval``s) the symbolic
shape strings, resolves node targets by ``getattr`` from ``torch`` (so ``torch.os.system``
or ``torch.ops.load_library`` are reachable), and compiles the ``guards_code`` strings and
the graph's generated Python (which embeds node names and stack traces) with ``exec``.

Before torch sees the file, this module reads the archive as data and accepts it only when
every one of those holds what ``torch.export.save`` writes:

- every operator the graph calls (node targets, and operators passed as arguments) is pure
  tensor maths: an ATen, ``prims`` or ``ultramem`` operator that takes no free-form string
  (a path, a message), no Python object, and is not called for a side effect (files,
  console, process state); a higher-order operator torch.export writes for control flow
  or functionalization; or a short list of pure Python functions (``operator.getitem``,
  arithmetic, ``torch.sym_*``, ``math``). This is checked before anything runs, since
  ``aten::from_file`` alone creates, grows or reads any file it names;
- symbolic expressions use only sympy's constructors for integers, symbols and arithmetic,
  and ask no more of sympy than torch.export's own do (``sympify`` evaluates every number
  an expression spells): int64 literals, no power of a power nor one by more than a small
  literal or a size, a bounded length, depth and count of terms; their hints and the range
  constraints' bounds are int64s;
- names are identifiers, and no string holds a control character (stack traces are
  dropped: they are comments in generated code, and only for humans);
- every pickle (sample inputs, weights, constants) loads under ``weights_only=True``;
  custom-object and opaque-object constants are refused;
- ``guards_code`` (input-shape checks as Python source) is dropped: the capture re-derives
  its own guards;
- what the archive inflates to is bounded by its declared sizes before anything is inflated
  (``torch.export.save`` stores members uncompressed, so a large ratio is a zip bomb), and
  again while each member is copied, so a header that lies cannot inflate past it.

The sanitised archive is then loaded with ``torch.load`` forced to ``weights_only=True`` and
Python's ``pickle.loads`` disabled, so a check missed here still cannot run a payload.
Anything else is refused with the reason (``UnsafeArchive``; ``OversizedArchive`` for a
bomb, ``CorruptArchive`` for a file that is no archive).
"""

from __future__ import annotations

import ast
import functools
import io
import json
import math
import operator
import pickle
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

MAX_MEMBERS = 100_000
# torch.export.save stores every member uncompressed (ratio 1); deflated float weights stay
# near 1 too. Only runs of one byte (a zero buffer) compress past this, and such a member
# can be stored as it is
MAX_MEMBER_RATIO = 200
MAX_TOTAL_RATIO = 20
# below this an archive or a member is never refused for its ratio: small JSON compresses well
RATIO_FREE_BYTES = 1 << 20
TOTAL_RATIO_FREE_BYTES = 64 << 20
# the JSON parsed into Python objects (about ten times its size in memory)
MAX_JSON_BYTES = 64 << 20
COPY_CHUNK = 1 << 20


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Python functions a graph may call besides operators: pure, and unable to reach anything
SAFE_OPERATOR_FUNCTIONS = _words(
    "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge "
    "and_ or_ xor not_ invert lshift rshift"
)
SAFE_TORCH_FUNCTIONS = _words(
    "sym_int sym_float sym_max sym_min sym_not sym_ite sym_sqrt sym_sum sym_fresh_size"
)
SAFE_MATH_FUNCTIONS = _words("ceil floor trunc sqrt exp log sin cos tan tanh fabs")

# Operators: namespaces of tensor maths (ATen, its primitives, our fused ops in kernels/);
# every other namespace (debugprims.load_tensor, profiler, c10d, custom libraries) is refused
PURE_NAMESPACES = _words("aten prims ultramem")
# schema types an operator may take or return: tensors, numbers and lists of them. Not
# Python objects (Any, classes, dicts, futures), storages, streams or TorchScript's generics
DATA_TYPE_KINDS = _words(
    "TensorType IntType SymIntType FloatType SymFloatType BoolType SymBoolType ComplexType "
    "NumberType NoneType DeviceObjType GeneratorType QSchemeType ListType TupleType "
    "OptionalType StringType"
)
# string arguments that pick one of a few fixed behaviours; any other string is free text,
# as a path or a message is (from_file's filename, save's filename, _print's s, warn's message)
ENUM_STRING_ARGUMENTS = _words(
    "reduce rounding_mode approximate mode side interpolation norm driver UPLO ord p padding "
    "equation indexing padding_side pad_mode activation algorithm pooling"
)
# they only raise, and torch.export writes them itself; the message is text for the error
ASSERTION_OPERATORS = _words(
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
    **dict.fromkeys(_words("_print warn _test_warn_in_autograd"), "it writes to the console"),
    **dict.fromkeys(
        _words(
            "manual_seed seed initial_seed set_grad_enabled record_stream wait _set_item "
            "_cufft_set_plan_cache_max_size _cufft_clear_plan_cache backward _backward "
            "dist_backward set_data _debug_has_internal_overlap"
        ),
        "it acts on process state, not on tensors",
    ),
}
# higher-order operators torch.export writes for control flow, grad/autocast regions and
# functionalized mutation; their subgraphs and operator arguments are checked like the graph
PURE_HIGHER_ORDER = _words(
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

# what torch.export writes into symbolic expressions (sympy srepr and printed forms)
SYMPY_NAMES = _words(
    "Symbol Integer Rational Float Mul Add Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge And Or Not "
    "Equality Unequality GreaterThan StrictGreaterThan LessThan StrictLessThan "
    "FloorDiv CeilDiv ModularIndexing CleanDiv PythonMod IntTrueDiv FloatTrueDiv ToFloat "
    "TruncToInt FloorToInt CeilToInt RoundToInt RoundDecimal PowByNatural FloatPow "
    "BitwiseFn_bitwise_and BitwiseFn_bitwise_or Identity OpaqueUnaryFn_sqrt "
    "true false True False positive integer nonnegative negative real finite infinite "
    "precision oo zoo nan"
)
_EXPR_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?(?:e[-+]?\d+)?)|([A-Za-z_]\w*)|('[^']*')|(\S))", re.ASCII
)
# no "^": sympify reads it as "**"
_EXPR_PUNCTUATION = set("()[],=+-*/%<>!&|")
# How much sympy is asked to compute. torch.export writes a few symbols, small integers
# and int64 bounds, powers by a literal (Pow(s0, 2)) or a size (PowByNatural(2, s0 + 1)),
# a few levels deep; sympify evaluates whatever numbers an expression spells, and a power
# of a power (9**9**99999) or a shift (1 << 10**18) never finishes
MAX_EXPRESSION_CHARS = 10_000
MAX_EXPRESSION_DEPTH = 32  # brackets; sympy's parser and simplifiers recurse on them
MAX_EXPRESSION_TERMS = 256  # calls, names, literals and operators
MAX_MIN_MAX_ARGUMENTS = 16  # Max and Min compare every pair of their arguments
MAX_LITERAL_DIGITS = 19  # an int64: sizes, strides, bounds
MAX_EXPONENT = 64
MAX_FLOAT_PRECISION = 64  # bits; torch writes a double's 53
# an unbacked range-constraint key's number is counted up to, one by one, at load
MAX_UNBACKED_INDEX_DIGITS = 6
POWERS = _words("Pow PowByNatural FloatPow")
ASSUMPTIONS = _words("positive integer nonnegative negative real finite infinite")
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_FLOAT_TEXT = re.compile(r"-?\d{1,20}(\.\d{0,20})?(e[-+]?\d{1,3})?", re.ASCII)
_UNBACKED_KEY = re.compile(r"(zuf|u)(.*)", re.DOTALL)
# torch.export names every symbol a short prefix and a number (s0, u3, zuf1); requiring
# the number keeps every Python builtin (exec, open, chr) out of what sympify evaluates
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}_?\d+(_\d+)?", re.ASCII)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeArchive(ValueError):
    """A ``.pt2`` that holds something ``torch.export.save`` does not write: code, or a
    Python object only a full unpickler would make."""


class CorruptArchive(ValueError):
    """A file that is no readable ``.pt2`` at all (not a zip, truncated, missing parts)."""


class OversizedArchive(ValueError):
    """A ``.pt2`` that would inflate far past its own size (a zip bomb), or past the room
    there is to copy it."""


def load_untrusted_pt2(path: Path) -> ExportedProgram:
    """``torch.export.load`` of ``path`` after the checks above; ``UnsafeArchive``,
    ``OversizedArchive`` or ``CorruptArchive`` when it is not what torch.export.save writes."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptArchive(f"not a torch.export archive (zip): {exc}") from None
    with archive, tempfile.TemporaryDirectory(prefix="ultramem-pt2-") as tmp:
        clean = Path(tmp) / "program.pt2"
        _check_sizes(archive.infolist(), path.stat().st_size, shutil.disk_usage(tmp).free)
        try:
            _sanitised_copy(archive, clean)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            # a member whose bytes do not match its header (CRC, length, method)
            raise CorruptArchive(f"a member cannot be read: {exc}") from None
        with _no_unsafe_unpickling():
            return torch.export.load(str(clean))


def _check_sizes(infos: list[zipfile.ZipInfo], archive_bytes: int, free_bytes: int) -> None:
    """Refuse, from the declared sizes alone, an archive that inflates too far."""
    if len(infos) > MAX_MEMBERS:
        raise UnsafeArchive(f"{len(infos)} members; a torch.export archive has far fewer")
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and lzma inflate a whole chunk at once; torch.export.save never writes them
            raise CorruptArchive(
                f"member {info.filename!r} uses compression method {info.compress_type}, "
                "which torch.export.save does not write"
            )
        if info.flag_bits & 0x1:
            raise CorruptArchive(f"member {info.filename!r} is encrypted")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FREE_BYTES and ratio > MAX_MEMBER_RATIO:
            raise OversizedArchive(
                f"the archive inflates to {_total(infos)} bytes from {archive_bytes}: member "
                f"{info.filename!r} alone is {info.file_size} bytes from {info.compress_size}"
            )
    if sum(i.compress_size for i in infos) > archive_bytes:
        raise CorruptArchive("its members claim more compressed bytes than the file holds")
    total = _total(infos)
    if total > TOTAL_RATIO_FREE_BYTES and total > MAX_TOTAL_RATIO * archive_bytes:
        raise OversizedArchive(
            f"the archive inflates to {total} bytes from {archive_bytes}; torch.export.save "
            "stores its members uncompressed"
        )
    if total > free_bytes:
        raise OversizedArchive(
            f"the archive inflates to {total} bytes from {archive_bytes}, more than the "
            f"{free_bytes} bytes free for its checked copy"
        )


def _total(infos: list[zipfile.ZipInfo]) -> int:
    return sum(i.file_size for i in infos)


def _sanitised_copy(archive: zipfile.ZipFile, out: Path) -> None:
    infos = archive.infolist()
    _check_member_names(infos)
    by_name = {i.filename: i for i in infos}
    models = [n for n in by_name if re.search(r"(^|/)models/[^/]+\.json$", n)]
    if not models:
        raise CorruptArchive("no models/*.json: not written by torch.export.save")
    for model in models:
        sample = re.sub(r"models/([^/]+)\.json$", r"data/sample_inputs/\1.pt", model)
        if sample not in by_name:
            # torch.export.load fails on it with a message that points at nothing
            raise CorruptArchive(f"{sample} is missing: not written by torch.export.save")
    # the graphs first: they decide whether anything here is meant to act on the machine
    programs = {
        m: _sanitised_program(m, _read(archive, by_name[m], MAX_JSON_BYTES)) for m in models
    }
    for name in _pickled_members(archive, by_name):
        _check_weights_only(name, _read(archive, by_name[name], by_name[name].file_size))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as copy:
        for info in infos:
            if info.filename in programs:
                copy.writestr(_stored(info), programs[info.filename])
            else:
                _copy_member(archive, info, copy)


def _check_member_names(infos: list[zipfile.ZipInfo]) -> None:
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in Path(name).parts or _CONTROL.search(name):
            raise UnsafeArchive(f"member name {name!r} escapes the archive")
        if name in seen:
            # readers disagree on which copy counts: the one checked may not be the one loaded
            raise UnsafeArchive(f"member {name!r} appears twice")
        seen.add(name)


def _stored(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename)  # no date or attributes of the original's
    copy.compress_type = zipfile.ZIP_STORED
    copy.file_size = info.file_size  # decides zip64 before the first byte is written
    return copy


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, never more than ``limit`` or its declared size inflated."""
    if info.file_size > limit:
        raise OversizedArchive(
            f"member {info.filename!r} inflates to {info.file_size} bytes, more than the "
            f"{limit} read into memory"
        )
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)
    _check_length(info, len(data))
    return data


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, copy: zipfile.ZipFile) -> None:
    written = 0
    with archive.open(info) as src, copy.open(_stored(info), "w") as dst:
        while chunk := src.read(COPY_CHUNK):
            written += len(chunk)
            _check_length(info, written)
            dst.write(chunk)
    _check_length(info, written, exact=True)


def _check_length(info: zipfile.ZipInfo, length: int, exact: bool = False) -> None:
    """Inflating stops at the declared size: a header that lies about it is refused."""
    if length > info.file_size:
        raise OversizedArchive(
            f"member {info.filename!r} inflates past the {info.file_size} bytes it declares"
        )
    if exact and length != info.file_size:
        raise CorruptArchive(f"member {info.filename!r} is shorter than it declares")


def _pickled_members(archive: zipfile.ZipFile, by_name: dict[str, zipfile.ZipInfo]) -> list[str]:
    """Every member torch would unpickle; refuses the object kinds it would unpickle freely."""
    out = [n for n in by_name if n.endswith(".pt")]  # sample inputs, legacy weights/constants
    for config_name in [n for n in by_name if n.endswith("_config.json")]:
        data = _read(archive, by_name[config_name], MAX_JSON_BYTES)
        try:
            config = json.loads(data).get("config", {})
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
            raise CorruptArchive(f"{config_name} is not a payload config: {exc}") from None
        folder = config_name.rsplit("/", 1)[0]
        for fqn, meta in config.items():
            path_name = str(meta.get("path_name", ""))
            if path_name.startswith(("custom_obj", "opaque_obj")):
                raise UnsafeArchive(
                    f"constant {fqn!r} is a pickled Python object ({path_name}), which "
                    "torch unpickles without restriction"
                )
            if meta.get("use_pickle"):
                out.append(f"{folder}/{path_name}")
    missing = [n for n in out if n not in by_name]
    if missing:
        raise CorruptArchive(f"payloads listed but absent: {missing[:3]}")
    return out


def _check_weights_only(name: str, data: bytes) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeArchive(f"{name} holds more than tensors ({pickle_refusal(exc)})") from None
    except Exception as exc:  # a corrupt payload: torch raises many types
        raise CorruptArchive(f"{name} cannot be read as tensors: {exc}") from None


def pickle_refusal(exc: pickle.UnpicklingError) -> str:
    """The part of torch's weights-only refusal that names what the pickle asked for."""
    text = str(exc)
    found = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+)", text)
    if found:
        return found.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:120] if lines else type(exc).__name__


def _sanitised_program(name: str, data: bytes) -> bytes:
    try:
        program = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArchive(f"{name} is not JSON: {exc}") from None
    if not isinstance(program, dict) or "graph_module" not in program:
        raise CorruptArchive(f"{name} is not a serialized ExportedProgram")
    program["guards_code"] = []
    constraints = program.get("range_constraints") or {}
    if not isinstance(constraints, dict):
        raise CorruptArchive(f"{name}: range_constraints is not a mapping")
    for key, bounds in constraints.items():
        _check_range_constraint(key, bounds)
    _walk(program, name)
    return json.dumps(program).encode()


def _walk(value: Any, where: str) -> None:
    if isinstance(value, dict):
        # only graph nodes have a "target" in the schema; a missing "inputs" must not hide one
        if "target" in value:
            _check_operator(value["target"], "node target")
        metadata = value.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("stack_trace", None)
        for key, item in value.items():
            if key in ("name", "as_name") and isinstance(item, str):
                _check_identifier(item)
            elif key == "expr_str" and isinstance(item, str):
                _check_expression(item)
                _check_hint(value.get("hint"), item)
            elif key in ("custom_obj_values", "as_custom_obj") and item:
                raise UnsafeArchive("the graph holds custom Python objects")
            elif key == "as_operator":  # the operator auto_functionalized calls, for one
                _check_operator(item, "operator argument")
            _check_string(key, where)
            _walk(item, where)
    elif isinstance(value, list):
        for item in value:
            _walk(item, where)
    elif isinstance(value, str):
        _check_string(value, where)


def _check_string(text: str, where: str) -> None:
    if _CONTROL.search(text):
        raise UnsafeArchive(f"{where}: a string holds a control character: {text[:60]!r}")


def _check_identifier(name: str) -> None:
    if name == "":  # a higher-order operator's arguments are positional, named ""
        return
    if not _IDENTIFIER.fullmatch(name) or name.startswith("__"):
        raise UnsafeArchive(f"{name!r} is not a plain identifier, as graph names are")


def _check_operator(target: Any, role: str) -> None:
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
    if any(not _IDENTIFIER.fullmatch(p) or p.startswith("__") for p in parts):
        return None
    modules = {"_operator": operator, "torch": torch, "math": math}
    if len(parts) == 2 and parts[0] in modules:
        return modules[parts[0]], parts[1]
    return None


def _resolve_operator(parts: list[str]) -> Any:
    """``torch.ops.NAMESPACE.NAME[.OVERLOAD]``; NAME may be a dunder (``aten.__and__``), as
    it is looked up only among the namespace's operators."""
    namespace, name = parts[0], parts[1]
    if not all(_IDENTIFIER.fullmatch(p) for p in parts) or any(
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


def _check_range_constraint(key: str, bounds: Any) -> None:
    """A symbol (or a derived one: ``2*s0``) and its int64 bounds; ``None`` is unbounded.
    Torch never sympifies the key, but counts up to the number in an unbacked one (``u3``)."""
    _check_expression(key)
    unbacked = _UNBACKED_KEY.fullmatch(key)
    if unbacked and not re.fullmatch(rf"\d{{1,{MAX_UNBACKED_INDEX_DIGITS}}}", unbacked[2]):
        raise UnsafeArchive(
            f"range constraint {key[:60]!r} is not an unbacked symbol's name ({unbacked[1]} "
            f"and at most {MAX_UNBACKED_INDEX_DIGITS} digits)"
        )
    fields = ("min_val", "max_val")
    if not isinstance(bounds, dict) or not all(
        bounds.get(f) is None or _is_small_int(bounds[f]) for f in fields
    ):
        raise UnsafeArchive(
            f"range constraint {key[:60]!r} has bounds {str(bounds)[:60]}, not integers "
            f"of at most {MAX_LITERAL_DIGITS} digits"
        )


def _check_hint(hint: Any, expression: str) -> None:
    """The value an expression had when exported: an int64, a float or a bool."""
    if hint is None:
        return
    if not (isinstance(hint, dict) and len(hint) == 1 and _is_hint(*next(iter(hint.items())))):
        raise UnsafeArchive(
            f"symbolic expression {expression[:60]!r} has the hint {str(hint)[:60]}, not an "
            f"integer of at most {MAX_LITERAL_DIGITS} digits, a float or a bool"
        )


def _is_hint(kind: str, value: Any) -> bool:
    if kind == "as_int":
        return _is_small_int(value)
    if kind == "as_float":
        return type(value) is float or _is_small_int(value)
    return kind == "as_bool" and type(value) is bool


def _is_small_int(value: Any) -> bool:
    return type(value) is int and abs(value) < 10**MAX_LITERAL_DIGITS


def _check_expression(text: str) -> None:
    """Sympy's constructors for integers, symbols and arithmetic, spelled as torch.export
    spells them, and no more than sympy evaluates at once: refused before anything parses
    it (sympify evaluates the numbers it spells, however large)."""

    def refuse(why: str) -> None:
        raise UnsafeArchive(f"symbolic expression {text[:60]!r} {why}")

    if "__" in text or len(text) > MAX_EXPRESSION_CHARS:
        refuse("is not sympy's")
    depth = 0
    for number, word, quoted, other in _EXPR_TOKEN.findall(text):
        if number:
            _check_number_text(number, refuse)
        if word and word not in SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(word):
            refuse(f"names {word!r}")
        if quoted and re.match(r"'-?\d", quoted):  # Float('1.5', precision=53)
            _check_number_text(quoted[1:-1], refuse)
        elif quoted and not _SYMBOL_NAME.fullmatch(quoted[1:-1]):
            refuse(f"names {quoted[:30]}")
        if other and other not in _EXPR_PUNCTUATION:
            refuse(f"holds {other!r}")
        if other in ("(", "["):
            depth += 1
            if depth > MAX_EXPRESSION_DEPTH:
                refuse(f"nests more than {MAX_EXPRESSION_DEPTH} brackets deep")
        elif other in (")", "]"):
            depth -= 1
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        refuse("is not an expression")
    _ExpressionShape(refuse).check(tree.body)


def _check_number_text(number: str, refuse: Any) -> None:
    """A literal as spelled: sympify makes an Integer or Float of the text itself."""
    if number.isdigit():
        if len(number.lstrip("0")) > MAX_LITERAL_DIGITS:
            refuse(f"holds a literal of more than {MAX_LITERAL_DIGITS} digits")
    elif not _FLOAT_TEXT.fullmatch(number) or not math.isfinite(float(number)):
        refuse(f"holds the number {number[:30]}, not a finite double")


class _ExpressionShape:
    """Walks the parsed (never evaluated) expression: only calls of the names the token
    check let through, arithmetic and comparisons; literals of at most 19 digits; at most
    ``MAX_EXPRESSION_TERMS`` terms and ``MAX_MIN_MAX_ARGUMENTS`` Max/Min arguments; and
    powers (``Pow``, ``PowByNatural``, ``FloatPow``, ``**``) that never nest, raised to a
    literal of at most ``MAX_EXPONENT``, or (``PowByNatural``, ``FloatPow``) to a size
    expression that cannot collapse to a number: torch bounds those itself (``safe_pow``,
    a double), where sympy's ``Pow`` of two integers computes the whole number.

    So nothing sympy evaluates exceeds about ``terms * 64 * MAX_EXPONENT`` bits even with
    every symbol replaced by an int64."""

    def __init__(self, refuse: Any) -> None:
        self.refuse = refuse
        self.terms = 0
        self.min_max_arguments = 0

    def check(self, node: ast.expr, in_power: str = "") -> None:
        self.terms += 1
        if self.terms > MAX_EXPRESSION_TERMS:
            self.refuse(f"has more than {MAX_EXPRESSION_TERMS} terms")
        if isinstance(node, ast.Constant):
            if type(node.value) is str or not self._is_number(node.value):
                self.refuse(f"holds the literal {str(node.value)[:30]!r} there")
        elif isinstance(node, ast.Name):
            pass  # a symbol or a sympy name, as the token check made sure
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            self.check(node.operand, in_power)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            self._power("**", node.left, node.right, in_power)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            self.check(node.left, in_power)
            self.check(node.right, in_power)
        elif isinstance(node, ast.Compare) and all(isinstance(o, _COMPARISONS) for o in node.ops):
            for operand in [node.left, *node.comparators]:
                self.check(operand, in_power)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            self._call(node.func.id, node, in_power)
        else:
            self.refuse(f"holds {_unparse(node)!r}, which is not sympy arithmetic")

    def _call(self, name: str, node: ast.Call, in_power: str) -> None:
        args, keywords = node.args, node.keywords
        if name == "Symbol":
            if not (
                len(args) == 1
                and _string_constant(args[0], _SYMBOL_NAME)
                and all(k.arg in ASSUMPTIONS and _bool_constant(k.value) for k in keywords)
            ):
                self.refuse(f"makes the symbol {_unparse(node)!r}")
            return
        if name == "Float":
            if not (
                len(args) == 1
                and (_string_constant(args[0], _FLOAT_TEXT) or self._is_literal(args[0]))
                and all(k.arg == "precision" and _precision(k.value) for k in keywords)
            ):
                self.refuse(f"makes the float {_unparse(node)!r}, not a double")
            return
        if keywords:
            self.refuse(f"passes {name} keywords")
        if name in POWERS:
            if len(args) != 2:
                self.refuse(f"calls {name} with {len(args)} arguments")
            self._power(name, args[0], args[1], in_power)
            return
        if name in ("Max", "Min"):
            self.min_max_arguments += len(args)
            if self.min_max_arguments > MAX_MIN_MAX_ARGUMENTS:
                self.refuse(f"has more than {MAX_MIN_MAX_ARGUMENTS} Max and Min arguments")
        for arg in args:
            self.check(arg, in_power)

    def _power(self, name: str, base: ast.expr, exponent: ast.expr, in_power: str) -> None:
        if in_power:
            self.refuse(f"nests {name} inside {in_power}")
        if not (
            self._is_small_exponent(exponent)
            or (name == "FloatPow")
            or (name == "PowByNatural" and _never_a_number(exponent))
        ):
            self.refuse(
                f"raises to {_unparse(exponent)[:30]!r}: {name} takes a literal exponent of "
                f"at most {MAX_EXPONENT}"
                + (", or a size expression" if name == "PowByNatural" else "")
            )
        self.check(base, name)
        self.check(exponent, name)

    def _is_small_exponent(self, node: ast.expr) -> bool:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            node = node.operand
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "Integer" and len(node.args) == 1 and not node.keywords:
                return self._is_small_exponent(node.args[0])
            if (
                node.func.id == "Float"
                and node.args
                and _string_constant(node.args[0], _FLOAT_TEXT)
            ):
                return abs(float(node.args[0].value)) <= MAX_EXPONENT  # type: ignore[attr-defined]
            return False
        return self._is_literal(node) and abs(node.value) <= MAX_EXPONENT  # type: ignore[attr-defined]

    def _is_literal(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Constant) and self._is_number(node.value)

    def _is_number(self, value: Any) -> bool:
        if type(value) is int:
            if abs(value) >= 10**MAX_LITERAL_DIGITS:  # 0x/0o/0b spellings get here
                self.refuse(f"holds a literal of more than {MAX_LITERAL_DIGITS} digits")
            return True
        if type(value) is float:
            return math.isfinite(value)
        return type(value) is bool


def _never_a_number(node: ast.expr) -> bool:
    """A sum of products of symbols, each named once, and nonzero integer literals: it
    stays symbolic (PowByNatural stays unevaluated) until every symbol has a value."""
    names: list[str] = []

    def symbolic(n: ast.expr) -> bool | None:  # None: not a polynomial of this kind
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Symbol":
            if n.args and _string_constant(n.args[0], _SYMBOL_NAME):
                names.append(n.args[0].value)  # type: ignore[attr-defined]
                return True
            return None
        if isinstance(n, ast.Name) and _SYMBOL_NAME.fullmatch(n.id):
            names.append(n.id)
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Integer":
            return False if len(n.args) == 1 and _nonzero_int(n.args[0]) else None
        if _nonzero_int(n):
            return False
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
            return symbolic(n.operand)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add | ast.Sub | ast.Mult):
            operands = [n.left, n.right]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
            if n.func.id not in ("Add", "Mul"):
                return None
            operands = n.args
        else:
            return None
        # a literal operand is one nonzero literal: a sum or product of literals alone may
        # be zero (and zero a product) or huge
        kinds = [symbolic(o) for o in operands]
        return None if None in kinds or not any(kinds) else True

    return bool(symbolic(node)) and len(names) == len(set(names))


def _nonzero_int(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value != 0


def _string_constant(node: ast.expr, pattern: re.Pattern[str]) -> bool:
    return (
        isinstance(node, ast.Constant)
        and type(node.value) is str
        and bool(pattern.fullmatch(node.value))
    )


def _bool_constant(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is bool


def _precision(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Constant)
        and type(node.value) is int
        and 0 < node.value <= MAX_FLOAT_PRECISION
    )


def _unparse(node: ast.expr) -> str:
    return ast.unparse(node)[:40]


@contextmanager
def _no_unsafe_unpickling() -> Iterator[None]:
    """``torch.load`` with ``weights_only=True`` whatever the caller asks, and no plain
    ``pickle.loads`` or torchbind unpickling, for the length of one load."""
    from torch.export.pt2_archive import _package

    real_load, real_pickle, real_obj = torch.load, _package.pickle, torch._C._pickle_load_obj

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*_: Any, **__: Any) -> Any:
        raise UnsafeArchive("the archive asks to unpickle a Python object")

    class _NoPickle:
        loads = staticmethod(refuse)
        load = staticmethod(refuse)
        UnpicklingError = pickle.UnpicklingError

    torch.load = weights_only_load  # type: ignore[assignment]
    _package.pickle = _NoPickle  # type: ignore[assignment]
    torch._C._pickle_load_obj = refuse  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.load = real_load
        _package.pickle = real_pickle
        torch._C._pickle_load_obj = real_obj  # type: ignore[attr-defined]
