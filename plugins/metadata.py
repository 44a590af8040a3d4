"""Launch metadata of an ahead-of-time kernel bundle: the schema, its JSON and a tiny evaluator.

A bundle is what a TensorRT plugin's ``enqueue`` needs to launch a Triton kernel without
Triton or Python: the cubin (and PTX) per GPU architecture, plus, per kernel, everything
the launch takes that the binary does not say. ``bundle.json`` (schema ``SCHEMA``)::

    {"schema": "ultramem.kernel-bundle/1", "triton_version": "3.9.0", "sms": [80, 90],
     "kernels": [KernelMetadata, ...]}

One ``KernelMetadata`` per (specialisation, architecture):

- ``name`` the specialisation (``retrieve_fp32_h2_n64_r2_c2_m8_k8_none``), ``op`` (the
  contract's op name, whose tensors the pointers name), ``function``
  (the ``@triton.jit`` function), ``entry`` (the symbol in the cubin), ``sm``, ``arch``
  (PTX ``.target``), ``cubin``/``ptx`` (file names beside ``bundle.json``), ``cubin_sha256``;
- ``num_warps``, ``threads_per_block`` (block = ``[threads_per_block, 1, 1]``), ``num_ctas``,
  ``shared_bytes`` (dynamic shared memory to pass at launch), ``constexprs``, ``options``;
- ``args``: the kernel parameters in order, each ``{"name", "kind", "dtype", ...}`` with
  ``kind`` one of ``pointer`` (``tensor`` names the buffer, ``align`` the byte alignment
  the kernel was specialised for), ``scalar`` (``expr`` over ``dims`` gives its value for
  contiguous tensors) or ``scratch`` (the pointers Triton appends; ``bytes_per_program``
  times the number of programs, or a null pointer when 0); ``ptx_type`` is the
  parameter's type in the PTX prototype (``u64``, ``u32``), a check on the packing; a
  scalar's ``divisibility`` is the multiple the kernel was compiled to assume (16 where
  its build-time value is one, as Triton's JIT specialises; else 1);
- ``fixed``: scalars whose build-time value is 1, compiled in as constants as the JIT
  does (``value``, ``expr``): not parameters of the cubin;
- ``dims``: named sizes, each read from an input's shape (``tensor``, ``axis``) and,
  except for the token count and the table's rows, fixed at build time (``value``); the
  names are the op contract's (``kernels/contract.py``); a dim with no tensor is an integer
  attribute of the op (``topk``, ``groups``);
- ``grid``: ``{"x", "y", "z"}`` expressions over ``dims`` and ``constexprs``.

Expressions use integers, names, ``+ - * // %``, parentheses and ``cdiv``/``min``/``max``;
``evaluate`` walks the AST and refuses anything else (no ``eval``).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write, plain_name

# 2: tensors and dims named by the op contract; 3: scalars specialised as the JIT does
SCHEMA = "ultramem.kernel-bundle/3"
ARG_KINDS = ("pointer", "scalar", "scratch")


@dataclass(frozen=True)
class ArgInfo:
    """One kernel parameter, in launch order."""

    name: str
    kind: str
    dtype: str
    tensor: str | None = None
    expr: str | None = None
    align: int = 1
    bytes_per_program: int = 0
    ptx_type: str | None = None
    divisibility: int = 1  # a scalar the kernel was compiled to assume a multiple of
    value: int | None = None  # a scalar compiled in as a constant (``KernelMetadata.fixed``)


@dataclass(frozen=True)
class DimInfo:
    """A named size: read from ``tensor.shape[axis]``; ``value`` is None when dynamic."""

    tensor: str | None
    axis: int | None
    value: int | None


@dataclass(frozen=True)
class KernelMetadata:
    name: str
    op: str
    function: str
    entry: str
    sm: int
    arch: str
    cubin: str
    ptx: str
    cubin_sha256: str
    num_warps: int
    threads_per_block: int
    num_ctas: int
    shared_bytes: int
    constexprs: dict[str, int | str | bool]
    args: tuple[ArgInfo, ...]
    dims: dict[str, DimInfo]
    grid: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    # scalars the kernel was compiled with as constants (the JIT does so for a 1): no
    # parameter of the cubin, but a launch whose ``expr`` gives another value is refused
    fixed: tuple[ArgInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["args"] = [asdict(a) for a in self.args]
        out["fixed"] = [asdict(a) for a in self.fixed]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KernelMetadata:
        fields = dict(data)
        fields["args"] = tuple(ArgInfo(**a) for a in data["args"])
        fields["fixed"] = tuple(ArgInfo(**a) for a in data.get("fixed", ()))
        fields["dims"] = {k: DimInfo(**v) for k, v in data["dims"].items()}
        return cls(**fields)

    def arg(self, name: str) -> ArgInfo:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(f"kernel {self.name} has no argument {name!r}")

    def launch_grid(self, dims: Mapping[str, int]) -> tuple[int, int, int]:
        """The grid for these dim values (constexprs are visible to the expressions)."""
        env = {**self.constexprs, **dims}
        x, y, z = (evaluate(self.grid[axis], env) for axis in ("x", "y", "z"))
        return x, y, z


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.json``: the kernels of one bundle, ``root`` being its folder."""

    root: Path
    triton_version: str
    sms: tuple[int, ...]
    kernels: tuple[KernelMetadata, ...]

    def find(self, name: str, sm: int) -> KernelMetadata:
        """The build of specialisation ``name`` for ``sm``, or ``KeyError`` saying what is."""
        for k in self.kernels:
            if k.name == name and k.sm == sm:
                return k
        have = sorted({(k.name, k.sm) for k in self.kernels})
        raise KeyError(f"no kernel {name!r} for sm_{sm} in {self.root}; the bundle has {have}")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "triton_version": self.triton_version,
            "sms": list(self.sms),
            "kernels": [k.to_json() for k in self.kernels],
        }

    def write(self) -> Path:
        """Write ``bundle.json`` atomically (a half-written manifest never exists)."""
        return atomic_write(self.root / "bundle.json", json.dumps(self.to_json(), indent=1) + "\n")


def bundle_files(path: Path) -> list[tuple[str, str]]:
    """``(kernel, file name)`` of every file a ``bundle.json`` at ``path`` names (cubins
    and PTX, beside it), as written; what does not parse names nothing (loading it fails
    on its own)."""
    try:
        kernels = json.loads(path.read_text()).get("kernels")
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return [
        (str(k.get("name")), k[key])
        for k in (kernels if isinstance(kernels, list) else [])
        if isinstance(k, dict)
        for key in ("cubin", "ptx")
        if key in k
    ]


def load_bundle(root: str | Path) -> BundleManifest:
    """Read ``<root>/bundle.json``; ``ValueError`` when it is not a bundle this code reads,
    or names a file other than one beside it."""
    root = Path(root)
    data = json.loads((root / "bundle.json").read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"{root / 'bundle.json'} has schema {data.get('schema')!r}, expected {SCHEMA!r}: "
            "rebuild the bundle with this version of ultramem"
        )
    kernels = tuple(KernelMetadata.from_json(k) for k in data["kernels"])
    for kernel in kernels:
        for name in (kernel.cubin, kernel.ptx):
            if not plain_name(name):
                raise ValueError(
                    f"{root / 'bundle.json'}: kernel {kernel.name} names file {name!r}, "
                    f"not a file name in {root}"
                )
    return BundleManifest(
        root=root, triton_version=data["triton_version"], sms=tuple(data["sms"]), kernels=kernels
    )


# ---------------------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------------------

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_CALLS = {
    "cdiv": lambda a, b: -(-a // b),
    "min": min,
    "max": max,
}


def evaluate(expr: str, env: Mapping[str, Any], *, symbolic: bool = False) -> Any:
    """Value of an integer expression over ``env``; ``ValueError`` for anything else.

    ``symbolic`` lets names stand for objects with integer arithmetic (TensorRT's
    ``SymIntExpr``): ``+ - * // %`` and ``cdiv`` then build an expression; ``min``, ``max``
    and negation still need integers.
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse expression {expr!r}: {e.msg}") from None
    return _eval(tree.body, env, expr, symbolic)


def _eval(node: ast.expr, env: Mapping[str, Any], expr: str, symbolic: bool) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name):
        value = env.get(node.id)
        if type(value) is not int and not (symbolic and value is not None):
            raise ValueError(
                f"{node.id!r} in {expr!r} is {value!r}, expected an integer; "
                f"known integers: {sorted(k for k, v in env.items() if type(v) is int)}"
            )
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, env, expr, symbolic), _eval(node.right, env, expr, symbolic)
        if isinstance(node.op, ast.FloorDiv | ast.Mod) and type(right) is int and right == 0:
            raise ValueError(f"division by zero in {expr!r}")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_integer(_eval(node.operand, env, expr, symbolic), expr)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _CALLS
        and not node.keywords
        and len(node.args) == 2
    ):
        a, b = (_eval(arg, env, expr, symbolic) for arg in node.args)
        if node.func.id == "cdiv" and type(b) is int and b == 0:
            raise ValueError(f"division by zero in {expr!r}")
        if node.func.id == "cdiv" and not (type(a) is int and type(b) is int):
            return (a + b - 1) // b  # sizes are non-negative, so this is the ceiling too
        return _CALLS[node.func.id](_integer(a, expr), _integer(b, expr))
    raise ValueError(
        f"{ast.unparse(node)!r} in {expr!r} is not allowed: use integers, names, + - * // %, "
        "and cdiv/min/max of two arguments"
    )


def _integer(value: Any, expr: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{expr!r} needs integers here, got {value!r}")
    return value
