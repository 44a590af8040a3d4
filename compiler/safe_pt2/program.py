"""The serialized ExportedProgram (``models/*.json``) walked as data: every operator and
symbolic expression it names checked, names identifiers, no control character in any
string; ``guards_code`` and stack traces dropped."""

from __future__ import annotations

import json
import re
from typing import Any

from .common import CorruptArchive, UnsafeArchive
from .expressions import check_expression, check_hint, check_range_constraint
from .operators import IDENTIFIER, check_operator

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def sanitised_program(name: str, data: bytes) -> bytes:
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
        check_range_constraint(key, bounds)
    _walk(program, name)
    return json.dumps(program).encode()


def _walk(value: Any, where: str) -> None:
    if isinstance(value, dict):
        # only graph nodes have a "target" in the schema; a missing "inputs" must not hide one
        if "target" in value:
            check_operator(value["target"], "node target")
        metadata = value.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("stack_trace", None)
        for key, item in value.items():
            if key in ("name", "as_name") and isinstance(item, str):
                _check_identifier(item)
            elif key == "expr_str" and isinstance(item, str):
                check_expression(item)
                check_hint(value.get("hint"), item)
            elif key in ("custom_obj_values", "as_custom_obj") and item:
                raise UnsafeArchive("the graph holds custom Python objects")
            elif key == "as_operator":  # the operator auto_functionalized calls, for one
                check_operator(item, "operator argument")
            _check_string(key, where)
            _walk(item, where)
    elif isinstance(value, list):
        for item in value:
            _walk(item, where)
    elif isinstance(value, str):
        _check_string(value, where)


def _check_string(text: str, where: str) -> None:
    if CONTROL.search(text):
        raise UnsafeArchive(f"{where}: a string holds a control character: {text[:60]!r}")


def _check_identifier(name: str) -> None:
    if name == "":  # a higher-order operator's arguments are positional, named ""
        return
    if not IDENTIFIER.fullmatch(name) or name.startswith("__"):
        raise UnsafeArchive(f"{name!r} is not a plain identifier, as graph names are")
