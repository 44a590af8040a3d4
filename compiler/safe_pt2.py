"""Load a ``.pt2`` from an untrusted source without running any of its code.

``torch.export.load`` trusts the archive: it unpickles sample inputs, pickled weights and
constants (``weights_only=False`` as a fallback), ``sympify``s (``eval``s) the symbolic
shape strings, resolves node targets by ``getattr`` from ``torch`` (so ``torch.os.system``
or ``torch.ops.load_library`` are reachable), and compiles the ``guards_code`` strings and
the graph's generated Python (which embeds node names and stack traces) with ``exec``.

Before torch sees the file, this module reads the archive as data and accepts it only when
every one of those holds what ``torch.export.save`` writes:

- node targets resolve to ATen/registered operators, higher-order operators, or a short
  list of pure Python functions (``operator.getitem``, arithmetic, ``torch.sym_*``, ``math``);
- symbolic expressions use only sympy's constructors for integers, symbols and arithmetic;
- names are identifiers, and no string holds a control character (stack traces are
  dropped: they are comments in generated code, and only for humans);
- every pickle (sample inputs, weights, constants) loads under ``weights_only=True``;
  custom-object and opaque-object constants are refused;
- ``guards_code`` (input-shape checks as Python source) is dropped: the capture re-derives
  its own guards.

The sanitised archive is then loaded with ``torch.load`` forced to ``weights_only=True`` and
Python's ``pickle.loads`` disabled, so a check missed here still cannot run a payload.
Anything else is refused with the reason (``UnsafeArchive``).
"""

from __future__ import annotations

import io
import json
import math
import operator
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

MAX_MEMBERS = 100_000


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
# what torch.export writes into symbolic expressions (sympy srepr and printed forms)
SYMPY_NAMES = _words(
    "Symbol Integer Rational Float Mul Add Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge And Or Not "
    "FloorDiv CeilDiv ModularIndexing CleanDiv PythonMod IntTrueDiv FloatTrueDiv ToFloat "
    "TruncToInt FloorToInt CeilToInt RoundToInt RoundDecimal PowByNatural FloatPow "
    "BitwiseFn_bitwise_and BitwiseFn_bitwise_or Identity OpaqueUnaryFn_sqrt "
    "true false True False positive integer nonnegative negative real finite infinite "
    "oo zoo nan"
)
_EXPR_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?(?:e[-+]?\d+)?)|([A-Za-z_]\w*)|('[A-Za-z_]\w*')|(\S))"
)
_EXPR_PUNCTUATION = set("()[],=+-*/%<>!&|^")
# torch.export names every symbol a short prefix and a number (s0, u3, zuf1); requiring
# the number keeps every Python builtin (exec, open, chr) out of what sympify evaluates
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}_?\d+(_\d+)?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeArchive(ValueError):
    """A ``.pt2`` that holds something ``torch.export.save`` does not write: code, or a
    Python object only a full unpickler would make."""


class CorruptArchive(ValueError):
    """A file that is no readable ``.pt2`` at all (not a zip, truncated, missing parts)."""


def load_untrusted_pt2(path: Path) -> ExportedProgram:
    """``torch.export.load`` of ``path`` after the checks above, or ``UnsafeArchive``."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptArchive(f"not a torch.export archive (zip): {exc}") from None
    with archive, tempfile.TemporaryDirectory(prefix="ultramem-pt2-") as tmp:
        clean = Path(tmp) / "program.pt2"
        _sanitised_copy(archive, clean)
        with _no_unsafe_unpickling():
            return torch.export.load(str(clean))


def _sanitised_copy(archive: zipfile.ZipFile, out: Path) -> None:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise UnsafeArchive(f"{len(infos)} members; a torch.export archive has far fewer")
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in Path(name).parts or _CONTROL.search(name):
            raise UnsafeArchive(f"member name {name!r} escapes the archive")
    names = [i.filename for i in infos]
    models = [n for n in names if re.search(r"(^|/)models/[^/]+\.json$", n)]
    if not models:
        raise CorruptArchive("no models/*.json: not written by torch.export.save")
    for model in models:
        sample = re.sub(r"models/([^/]+)\.json$", r"data/sample_inputs/\1.pt", model)
        if sample not in names:
            # torch.export.load fails on it with a message that points at nothing
            raise CorruptArchive(f"{sample} is missing: not written by torch.export.save")
    pickles = _pickled_members(archive, names)
    for name in pickles:
        _check_weights_only(name, archive.read(name))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for info in infos:
            data = archive.read(info.filename)
            if info.filename in models:
                data = _sanitised_program(info.filename, data)
            copy.writestr(info, data)


def _pickled_members(archive: zipfile.ZipFile, names: list[str]) -> list[str]:
    """Every member torch would unpickle; refuses the object kinds it would unpickle freely."""
    out = [n for n in names if n.endswith(".pt")]  # sample inputs, legacy weights/constants
    for config_name in [n for n in names if n.endswith("_config.json")]:
        try:
            config = json.loads(archive.read(config_name)).get("config", {})
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
    missing = [n for n in out if n not in names]
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
    for key in program.get("range_constraints", {}) or {}:
        _check_expression(str(key))
    _walk(program, name)
    return json.dumps(program).encode()


def _walk(value: Any, where: str) -> None:
    if isinstance(value, dict):
        if {"target", "inputs", "outputs"} <= value.keys() and isinstance(value["target"], str):
            _check_target(value["target"])
        metadata = value.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("stack_trace", None)
        for key, item in value.items():
            if key in ("name", "as_name") and isinstance(item, str):
                _check_identifier(item)
            elif key == "expr_str" and isinstance(item, str):
                _check_expression(item)
            elif key in ("custom_obj_values", "as_custom_obj") and item:
                raise UnsafeArchive("the graph holds custom Python objects")
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
    if not _IDENTIFIER.fullmatch(name) or name.startswith("__"):
        raise UnsafeArchive(f"{name!r} is not a plain identifier, as graph names are")


def _check_target(target: str) -> None:
    resolved = _resolve(target)
    if isinstance(resolved, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return
    if resolved is not None:
        module, attr = resolved
        if (module is operator and attr in SAFE_OPERATOR_FUNCTIONS) or (
            module is torch and attr in SAFE_TORCH_FUNCTIONS
        ):
            return
        if module is math and attr in SAFE_MATH_FUNCTIONS:
            return
    raise UnsafeArchive(f"node target {target!r} is not an operator torch.export writes")


def _resolve(target: str) -> Any:
    """What torch's deserializer would resolve ``target`` to, looked up without calling
    anything: an operator object, or (module, attribute) for a plain function."""
    parts = target.split(".")
    if any(not _IDENTIFIER.fullmatch(p) or p.startswith("__") for p in parts):
        return None
    if parts[0] == "torch" and len(parts) >= 4 and parts[1] == "ops":
        namespace = parts[2]
        try:
            packet = getattr(getattr(torch.ops, namespace), parts[3])
            op = getattr(packet, parts[4]) if len(parts) == 5 else packet
        except (AttributeError, RuntimeError):
            return None
        if len(parts) > 5:
            return None
        if namespace == "higher_order" and len(parts) == 4:
            return op if isinstance(op, torch._ops.HigherOrderOperator) else None
        return op if isinstance(op, torch._ops.OpOverload) else None
    modules = {"_operator": operator, "torch": torch, "math": math}
    if len(parts) == 2 and parts[0] in modules:
        return modules[parts[0]], parts[1]
    return None


def _check_expression(text: str) -> None:
    if "__" in text or len(text) > 10_000:
        raise UnsafeArchive(f"symbolic expression {text[:60]!r} is not sympy's")
    for _number, word, quoted, other in _EXPR_TOKEN.findall(text):
        if word and word not in SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(word):
            raise UnsafeArchive(f"symbolic expression {text[:60]!r} names {word!r}")
        if quoted and not _SYMBOL_NAME.fullmatch(quoted.strip("'")):
            raise UnsafeArchive(f"symbolic expression {text[:60]!r} names {quoted}")
        if other and other not in _EXPR_PUNCTUATION:
            raise UnsafeArchive(f"symbolic expression {text[:60]!r} holds {other!r}")


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
