"""The one declaration of the fused ops ``ultramem::retrieve`` and ``ultramem::aggregate``.

Each op is declared here once: its name in torch and in ONNX, its tensor inputs and outputs
(dims as named sizes, dtype rules, optional ones), its attributes (type, default, allowed
values) and the constraints between them. Every reader derives from this module:

- the ``torch.library`` schema, the input checks and the fake kernels' output shapes
  (``kernels/registry.py``);
- the ONNX domain's ``OpSchema``s, translations and function-body signatures
  (``compiler/onnx/domain.py``);
- the TensorRT plugins' descriptors and attribute order (``plugins/trt_plugin.py``);
- the kernel bundle's tensor names and the launcher's argument binding (``plugins/``);
- the parity stage that runs the bundle (``compiler/parity/plugin_kernels.py``).

``tests/kernels/test_contract.py`` holds every reader against it.

Dims are named sizes: an input's dims bind the names (``T``, ``H``, ...), every later use of a
name must agree, an attribute's name is also a size (``topk`` in the output ``[T, H, topk, M]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

DOMAIN = "ultramem"
# 2: Aggregate takes per-slot weights and computed index maps (row_map, group_map, groups)
# instead of version 1's slot_map/expansion/mapping/row_offset menu
DOMAIN_VERSION = 2

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
# dtype classes an input may declare, and the torch dtypes each admits
DTYPE_CLASSES: dict[str, tuple[torch.dtype, ...]] = {
    "float": FLOAT_DTYPES,
    "index": INDEX_DTYPES,
    "int64": (torch.int64,),
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor input or output. ``dtype``: an input's class (``float``, ``index``,
    ``int64``); an output's ``int64`` or ``like:<input>`` (that input's dtype)."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    optional: bool = False
    doc: str = ""

    def shape_doc(self) -> str:
        return "[" + ", ".join(self.dims) + "]"


@dataclass(frozen=True)
class AttributeSpec:
    """A scalar attribute: ``int`` or ``str``; ``default`` None means required."""

    name: str
    kind: type
    default: int | str | None = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: Any) -> None:
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{self.name} must be an int, got {value!r}")
        if self.kind is str and not isinstance(value, str):
            raise ValueError(f"{self.name} must be a string, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum}, got {value}")


Constraint = Callable[[Mapping[str, Any], Mapping[str, Any]], None]
"""(bound arguments, sizes) -> None, or ``ValueError`` saying what was received."""


@dataclass(frozen=True)
class OpSpec:
    name: str
    onnx_name: str
    inputs: tuple[TensorSpec, ...]
    attributes: tuple[AttributeSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str
    constraints: tuple[Constraint, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{DOMAIN}::{self.name}"

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Inputs, then attributes: the op's argument order everywhere."""
        return tuple(t.name for t in self.inputs) + tuple(a.name for a in self.attributes)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def attribute(self, name: str) -> AttributeSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"{self.qualname} has no attribute {name!r}")

    def torch_schema(self) -> str:
        """The ``torch.library`` schema: ``(Tensor a, Tensor? b=None, int k, ...) -> Tensor``."""
        params = [
            f"Tensor? {t.name}=None" if t.optional else f"Tensor {t.name}" for t in self.inputs
        ]
        for a in self.attributes:
            kind = "int" if a.kind is int else "str"
            default = (
                "" if a.required else "=" + (f'"{a.default}"' if a.kind is str else str(a.default))
            )
            params.append(f"{kind} {a.name}{default}")
        returns = (
            "Tensor" if len(self.outputs) == 1 else f"({', '.join('Tensor' for _ in self.outputs)})"
        )
        return f"({', '.join(params)}) -> {returns}"

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Every parameter by name, in order, defaults filled in (optional tensors: None)."""
        names = self.parameter_names
        if len(args) > len(names):
            raise TypeError(f"{self.qualname} takes {len(names)} arguments, got {len(args)}")
        bound = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{self.qualname} has no parameter {key!r}; it takes {names}")
            if key in bound:
                raise TypeError(f"{self.qualname}: {key!r} given twice")
            bound[key] = value
        for t in self.inputs:
            if t.name not in bound:
                if not t.optional:
                    raise TypeError(f"{self.qualname}: missing tensor {t.name!r}")
                bound[t.name] = None
        for a in self.attributes:
            if a.name not in bound:
                if a.required:
                    raise TypeError(f"{self.qualname}: missing attribute {a.name!r}")
                bound[a.name] = a.default
        return {name: bound[name] for name in names}

    def check(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        """Check ranks, dtypes, named sizes, attributes and constraints; return the sizes.

        Raises ``ValueError`` naming what was received. Reads shapes only (no device sync).
        """
        sizes: dict[str, Any] = {}
        for a in self.attributes:
            a.check(bound[a.name])
            sizes[a.name] = bound[a.name]
        for t in self.inputs:
            x = bound[t.name]
            if x is None:
                if not t.optional:
                    raise ValueError(f"{self.qualname}: {t.name} is required")
                continue
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{t.name} must be a tensor, got {type(x).__name__}")
            if x.dim() != len(t.dims):
                raise ValueError(
                    f"{t.name} must be {t.shape_doc()} ({len(t.dims)}-D), got {tuple(x.shape)}"
                )
            allowed = DTYPE_CLASSES[t.dtype]
            if x.dtype not in allowed:
                names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
                raise ValueError(f"{t.name} must be {names}, got {x.dtype}")
            for dim, size in zip(t.dims, x.shape, strict=True):
                if dim not in sizes:
                    sizes[dim] = size
                elif sizes[dim] != size:
                    raise ValueError(
                        f"{t.name} is {t.shape_doc()} = {tuple(x.shape)}, but {dim} = "
                        f"{sizes[dim]} elsewhere: {self.shapes_doc()}"
                    )
        for rule in self.constraints:
            rule(bound, sizes)
        return sizes

    def output_shapes(self, sizes: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return [tuple(sizes[d] for d in t.dims) for t in self.outputs]

    def output_dtypes(self, bound: Mapping[str, Any]) -> list[torch.dtype]:
        out = []
        for t in self.outputs:
            if t.dtype.startswith("like:"):
                out.append(bound[t.dtype.removeprefix("like:")].dtype)
            else:
                out.append(DTYPE_CLASSES[t.dtype][0])
        return out

    def shapes_doc(self) -> str:
        inputs = ", ".join(f"{t.name} {t.shape_doc()}" for t in self.inputs)
        outputs = ", ".join(f"{t.name} {t.shape_doc()}" for t in self.outputs)
        return f"{inputs} -> {outputs}"

    def size_source(self, dim: str) -> tuple[str, int] | None:
        """The first (input, axis) whose shape gives ``dim`` (None for attributes)."""
        for t in self.inputs:
            if dim in t.dims and not t.optional:
                return t.name, t.dims.index(dim)
        return None


# ---- retrieve -------------------------------------------------------------------------


def _retrieve_sizes(bound: Mapping[str, Any], sizes: Mapping[str, Any]) -> None:
    n, topm, topk = sizes["n"], bound["topm"], bound["topk"]
    if not 1 <= topm <= n:
        raise ValueError(f"topm = {topm} must lie in [1, n = {n}]")
    if not 1 <= topk <= topm * topm:
        raise ValueError(f"topk = {topk} must lie in [1, topm² = {topm * topm}]")


RETRIEVE = OpSpec(
    name="retrieve",
    onnx_name="Retrieve",
    inputs=(
        TensorSpec("row_scores", ("T", "H", "n", "r"), "float", doc="row keys' scores per rank"),
        TensorSpec("col_scores", ("T", "H", "n", "r"), "float", doc="column keys' scores"),
        TensorSpec("row_weight", ("H", "r"), "float", doc="rank-1 merge of the rows (u)"),
        TensorSpec("col_weight", ("H", "r"), "float", doc="rank-1 merge of the columns (v)"),
        TensorSpec("cores", ("M", "H", "r", "r"), "float", doc="Tucker cores"),
    ),
    attributes=(
        AttributeSpec("topm", int, minimum=1, doc="candidates kept per side"),
        AttributeSpec("topk", int, minimum=1, doc="slots kept per head"),
        AttributeSpec(
            "activation",
            str,
            "none",
            ("none", "relu", "softmax"),
            doc="applied to the k selected scores (softmax over the k, per core)",
        ),
    ),
    outputs=(
        TensorSpec("scores", ("T", "H", "topk", "M"), "like:row_scores", doc="per-core scores"),
        TensorSpec("slots", ("T", "H", "topk"), "int64", doc="grid slot ids in [0, n²)"),
    ),
    doc="Candidate top-m per side, Tucker-core grid scores, top-k; see kernels/retrieve.py.",
    constraints=(_retrieve_sizes,),
)


# ---- aggregate ------------------------------------------------------------------------


def _aggregate_sizes(bound: Mapping[str, Any], sizes: Mapping[str, Any]) -> None:
    dim, cores = sizes["Dv"], sizes["M"]
    if dim % cores:
        raise ValueError(f"value_dim = {dim} must split into M = {cores} equal chunks")
    for name, heads in (("row_map", "Hr"), ("group_map", "Hg")):
        if bound[name] is not None and sizes[heads] not in (1, sizes["H"]):
            raise ValueError(
                f"{name} must be [1, S] (one map for every head) or [H = {sizes['H']}, S], "
                f"got {tuple(bound[name].shape)}"
            )


AGGREGATE = OpSpec(
    name="aggregate",
    onnx_name="Aggregate",
    inputs=(
        TensorSpec("values", ("R", "Dv"), "float", doc="value table"),
        TensorSpec("weights", ("T", "H", "k", "M"), "float", doc="per-slot, per-core weights"),
        TensorSpec("slots", ("T", "H", "k"), "index", doc="slot ids in [0, S)"),
        TensorSpec("row_map", ("Hr", "S"), "index", True, "slot -> table row (default: slot)"),
        TensorSpec("group_map", ("Hg", "S"), "index", True, "slot -> pooling group (default 0)"),
    ),
    attributes=(
        AttributeSpec("groups", int, 1, minimum=1, doc="G, pooled rows per token"),
        AttributeSpec(
            "pooling",
            str,
            "add",
            ("add", "scatter"),
            doc="add: sum per group; scatter: the last of the H·k selections wins",
        ),
    ),
    outputs=(TensorSpec("pooled", ("T", "groups", "Dv"), "like:values", doc="pooled values"),),
    doc="Gather value rows, weight them chunk by core, pool per group; see kernels/aggregate.py.",
    constraints=(_aggregate_sizes,),
)

OPS: tuple[OpSpec, ...] = (RETRIEVE, AGGREGATE)


def markdown_table() -> str:
    """The ops as the README's table shows them; a test holds the README to this text."""
    lines = ["| op | inputs → outputs | attributes |", "|---|---|---|"]
    for op in OPS:
        inputs = ", ".join(
            f"`{t.name}`{'?' if t.optional else ''} {t.shape_doc()} {t.dtype}" for t in op.inputs
        )
        outputs = ", ".join(
            f"`{t.name}` {t.shape_doc()} {t.dtype.replace('like:', 'dtype of ')}"
            for t in op.outputs
        )
        attributes = "; ".join(
            f"`{a.name}` {a.kind.__name__}"
            + (f" = {a.default!r}" if not a.required else "")
            + (f" ({'/'.join(a.choices)})" if a.choices else "")
            for a in op.attributes
        )
        lines.append(f"| `{DOMAIN}::{op.onnx_name}` | {inputs} → {outputs} | {attributes} |")
    return "\n".join(lines)


def op_spec(name: str) -> OpSpec:
    """The contract of ``retrieve``/``aggregate`` (torch names) or ``Retrieve``/``Aggregate``."""
    for op in OPS:
        if name in (op.name, op.onnx_name, op.qualname):
            return op
    raise KeyError(f"no ultramem op {name!r}; the ops are {[op.name for op in OPS]}")
