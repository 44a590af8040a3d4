"""Kernel specialisations: which compiled kernel one fused-op call needs, and how to launch it.

A ``KernelSpec`` fixes everything but the target architecture: the op, the dtype of each
pointer, the constexprs and warps (from the same ``*_launch_config`` functions the JIT
launchers call, so a bundled kernel is the kernel ``retrieve_triton``/``aggregate_triton``
would build), the named dims (the contract's sizes: each read from an input's shape, fixed
at build time except the token count and the table's rows) and the grid as expressions.

Names come from the contract (``kernels/contract.py``): a kernel's pointer parameters are
``<tensor>_ptr`` for the op's inputs and outputs in the contract's order, so the launcher,
the TensorRT plugin and the parity stage bind tensors by name. An optional input the call
leaves out is passed as a stand-in pointer (``STAND_IN``) that the kernel, specialised on
its absence, never reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..kernels import (
    AGGREGATE,
    RETRIEVE,
    OpSpec,
    aggregate_launch_config,
    op_spec,
    retrieve_launch_config,
)
from ..kernels.launch import LaunchConfig
from .metadata import DimInfo, evaluate

TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}
# what an absent optional input's pointer is (never read by a kernel built without it)
STAND_IN = {"aggregate": "slots"}
# dims that are not part of a specialisation: any size works with the same kernel
DYNAMIC_DIMS = {"retrieve": ("T",), "aggregate": ("T", "R")}

# the kernels' scalar parameters as expressions over the contract's dims (contiguous tensors)
_RETRIEVE_SCALARS = {
    "n": "n", "m": "topm", "k": "topk", "heads": "H",
    "row_stride_t": "H*n*r", "row_stride_h": "n*r", "row_stride_n": "r", "row_stride_r": "1",
    "col_stride_t": "H*n*r", "col_stride_h": "n*r", "col_stride_n": "r", "col_stride_r": "1",
}  # fmt: skip


def _aggregate_scalars(present: set[str], maps_per_head: Mapping[str, bool]) -> dict[str, str]:
    width = "S" if present & {"row_map", "group_map"} else "R"
    return {
        "selections": "H*k", "k": "k", "value_rows": "R", "value_dim": "Dv", "chunk": "Dv//M",
        "n_cores": "M", "slots_count": width, "groups": "groups",
        "row_map_head_stride": "S" if maps_per_head.get("row_map") else "0",
        "group_map_head_stride": "S" if maps_per_head.get("group_map") else "0",
        "values_stride_row": "Dv", "values_stride_col": "1",
    }  # fmt: skip


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of one kernel: everything but the target architecture."""

    name: str
    op: str
    pointers: dict[str, str]  # kernel parameter -> tensor (the contract's names)
    pointer_dtypes: dict[str, str]  # tensor -> Triton dtype ("fp32", "i64")
    scalars: dict[str, str]  # kernel parameter -> expression over the dims
    constexprs: dict[str, int | str | bool]
    num_warps: int
    dims: dict[str, DimInfo]
    grid: dict[str, str]

    @property
    def contract(self) -> OpSpec:
        return op_spec(self.op)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KernelSpec:
        fields = dict(data)
        fields["dims"] = {k: DimInfo(**v) for k, v in data["dims"].items()}
        return cls(**fields)


def _grid(config: LaunchConfig, y: str, dims: Mapping[str, int]) -> dict[str, str]:
    """The grid as expressions, checked against the launch config it stands for."""
    grid = {"x": "T", "y": y, "z": "1"}
    env = {**config.constexprs, **dims}
    for tokens in (1, 7, 1000):
        got = tuple(evaluate(grid[a], {**env, "T": tokens}) for a in ("x", "y", "z"))
        if got != config.grid(tokens):
            raise RuntimeError(f"grid {grid} gives {got}, the launcher {config.grid(tokens)}")
    return grid


def _dims(op: OpSpec, sizes: Mapping[str, Any], present: set[str]) -> dict[str, DimInfo]:
    out = {}
    for t in op.inputs:
        if t.name not in present:
            continue
        for axis, dim in enumerate(t.dims):
            if dim not in out:
                value = None if dim in DYNAMIC_DIMS[op.name] else int(sizes[dim])
                out[dim] = DimInfo(t.name, axis, value)
    for a in op.attributes:
        if a.kind is int:
            out[a.name] = DimInfo(None, None, int(sizes[a.name]))
    return out


def kernel_spec(
    op_name: str,
    sizes: Mapping[str, Any],
    attributes: Mapping[str, Any],
    dtypes: Mapping[str, torch.dtype],
) -> KernelSpec:
    """The kernel for one call: ``sizes`` the contract's dims (``OpSpec.check``), ``dtypes``
    every tensor the call passes or returns (an optional input left out is absent)."""
    op = op_spec(op_name)
    present = set(dtypes)
    tensors = [t.name for t in (*op.inputs, *op.outputs)]
    pointers = {f"{name}_ptr": name if name in present else STAND_IN[op.name] for name in tensors}
    pointer_dtypes = {name: TRITON_DTYPES[dtypes[name]] for name in tensors if name in present}
    dims = _dims(op, sizes, present)
    static = {k: d.value for k, d in dims.items() if d.value is not None}
    dtype = TRITON_DTYPES[dtypes[op.inputs[0].name]]
    if op is RETRIEVE:
        config = retrieve_launch_config(
            static["H"], static["n"], static["r"], static["M"], static["topm"], static["topk"],
            attributes["activation"],
        )  # fmt: skip
        name = (
            f"retrieve_{dtype}_h{static['H']}_n{static['n']}_r{static['r']}_c{static['M']}"
            f"_m{static['topm']}_k{static['topk']}_{attributes['activation']}"
        )
        scalars, grid = dict(_RETRIEVE_SCALARS), _grid(config, "H", {"H": static["H"]})
    else:
        per_head = {
            m: m in present and static[h] > 1 for m, h in (("row_map", "Hr"), ("group_map", "Hg"))
        }
        config = aggregate_launch_config(
            static["H"], static["k"], static["Dv"], static["M"], static["groups"],
            attributes["pooling"],
            has_row_map="row_map" in present, has_group_map="group_map" in present,
        )  # fmt: skip
        maps = "".join(
            f"_{m.split('_')[0]}{static['Hr' if m == 'row_map' else 'Hg']}x{static['S']}"
            + ("i32" if pointer_dtypes[m] == "i32" else "")
            for m in ("row_map", "group_map")
            if m in present
        )
        slot_type = "_s32" if pointer_dtypes["slots"] == "i32" else ""
        name = (
            f"aggregate_{dtype}_h{static['H']}_k{static['k']}_c{static['M']}_d{static['Dv']}"
            f"_g{static['groups']}_{attributes['pooling']}{maps}{slot_type}"
        )
        scalars = _aggregate_scalars(present, per_head)
        grid = _grid(config, "cdiv(Dv, BLOCK_D)", {"Dv": static["Dv"]})
    return KernelSpec(
        name=name,
        op=op.name,
        pointers=pointers,
        pointer_dtypes=pointer_dtypes,
        scalars=scalars,
        constexprs=dict(config.constexprs),
        num_warps=config.num_warps,
        dims=dims,
        grid=grid,
    )


def _shape_and_dtype(value: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """A tensor's (or an fx node's fake value's) shape and dtype; None for None."""
    if value is None:
        return None
    tensor = value.meta["val"] if isinstance(value, torch.fx.Node) else value
    # a symbolic size is a dynamic dim (tokens): not part of the specialisation
    return tuple(d if isinstance(d, int) else 1 for d in tensor.shape), tensor.dtype


def spec_for_call(op: OpSpec, bound: Mapping[str, Any]) -> KernelSpec:
    """The kernel one call needs; ``bound`` is ``OpSpec.bind`` of tensors or fx nodes."""
    meta = {name: _shape_and_dtype(bound[name]) for name in op.input_names}
    fakes = {
        name: torch.empty(m[0], dtype=m[1], device="meta") if m is not None else None
        for name, m in meta.items()
    }
    args = {**bound, **fakes}
    sizes = op.check(args)
    dtypes = {name: m[1] for name, m in meta.items() if m is not None}
    for out, dtype in zip(op.outputs, op.output_dtypes(args), strict=True):
        dtypes[out.name] = dtype
    return kernel_spec(op.name, sizes, {a: bound[a] for a in op.attribute_names}, dtypes)


def specs_for_program(graph: torch.fx.Graph) -> list[KernelSpec]:
    """Every kernel the fused-op calls of a graph need, each specialisation once."""
    from ..kernels import op_overload

    overloads = {op_overload(op): op for op in (RETRIEVE, AGGREGATE)}
    specs: dict[str, KernelSpec] = {}
    for node in graph.nodes:
        op = overloads.get(node.target) if node.op == "call_function" else None
        if op is not None:
            spec = spec_for_call(op, op.bind(*node.args, **node.kwargs))
            specs.setdefault(spec.name, spec)
    return list(specs.values())
