"""Every reader of the op contract (``kernels/contract.py``) against it.

The torch.library schema, the fake kernels' output shapes, the references' and Triton
launchers' signatures, the ONNX schemas and the exporter's nodes, the TensorRT plugins'
signatures and attribute order, the bundled kernels' parameters, the README's table: each
must say what the contract says. A reader that drifts fails here, naming what differs.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from onnx import defs
from torch._subclasses.fake_tensor import FakeTensorMode

from ultramem.compiler.onnx.domain import register_schemas
from ultramem.kernels import (
    DOMAIN,
    DOMAIN_VERSION,
    OPS,
    OpSpec,
    aggregate_reference,
    aggregate_triton,
    op_overload,
    retrieve_reference,
    retrieve_triton,
    triton_kernels,
)
from ultramem.kernels.contract import markdown_table
from ultramem.plugins.metadata import BundleManifest
from ultramem.plugins.trt_plugin import attribute_order, plugin_signature, presence_flags

IMPLEMENTATIONS = {
    "retrieve": (retrieve_reference, retrieve_triton),
    "aggregate": (aggregate_reference, aggregate_triton),
}
OP_IDS = [op.name for op in OPS]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_torch_schema_is_the_contract(op: OpSpec) -> None:
    schema = op_overload(op)._schema
    assert schema.name == op.qualname
    assert [a.name for a in schema.arguments] == list(op.parameter_names)
    by_name = {a.name: a for a in schema.arguments}
    for t in op.inputs:
        arg = by_name[t.name]
        assert str(arg.type) == ("Optional[Tensor]" if t.optional else "Tensor"), t.name
        assert arg.has_default_value() == t.optional, t.name
    for a in op.attributes:
        arg = by_name[a.name]
        assert str(arg.type) == ("int" if a.kind is int else "str"), a.name
        assert arg.has_default_value() == (not a.required), a.name
        if not a.required:
            assert arg.default_value == a.default, a.name
    assert len(schema.returns) == len(op.outputs)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_implementations_take_the_contracts_parameters(op: OpSpec) -> None:
    for fn in IMPLEMENTATIONS[op.name]:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        assert [p.name for p in params] == list(op.parameter_names), fn.__name__
        for p in params:
            if p.name in op.attribute_names and not op.attribute(p.name).required:
                assert p.default == op.attribute(p.name).default, (fn.__name__, p.name)


def _sample_call(op: OpSpec, tokens: int) -> dict[str, torch.Tensor | int | str | None]:
    """A call with every optional input, the contract's dims filled with distinct sizes."""
    sizes = {"T": tokens, "H": 2, "n": 16, "r": 3, "M": 2, "R": 40, "Dv": 8, "k": 5, "Hr": 2,
             "Hg": 1, "S": 64}  # fmt: skip
    attributes = {"topm": 4, "topk": 6, "activation": "relu", "groups": 3, "pooling": "add"}
    bound: dict[str, torch.Tensor | int | str | None] = {}
    for t in op.inputs:
        dtype = torch.float32 if t.dtype == "float" else torch.int64
        bound[t.name] = torch.zeros([sizes[d] for d in t.dims], dtype=dtype)
    bound.update({a: attributes[a] for a in op.attribute_names})
    return bound


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_fake_kernel_shapes_and_dtypes_are_the_contracts(op: OpSpec) -> None:
    call = _sample_call(op, tokens=7)
    sizes = op.check(call)
    with FakeTensorMode() as mode:
        fakes = {
            k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in call.items()
        }
        out = op_overload(op)(**fakes)
    outs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outs] == op.output_shapes(sizes)
    assert [o.dtype for o in outs] == op.output_dtypes(call)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_onnx_schema_is_the_contract(op: OpSpec) -> None:
    register_schemas()
    schema = defs.get_schema(op.onnx_name, DOMAIN_VERSION, DOMAIN)
    assert schema.since_version == DOMAIN_VERSION
    assert [p.name for p in schema.inputs] == list(op.input_names)
    optional = defs.OpSchema.FormalParameterOption.Optional
    assert [p.option == optional for p in schema.inputs] == [t.optional for t in op.inputs]
    assert [p.name for p in schema.outputs] == list(op.output_names)
    assert set(schema.attributes) == set(op.attribute_names)
    for a in op.attributes:
        attr = schema.attributes[a.name]
        assert attr.required == a.required, a.name
        if not a.required:
            value = attr.default_value
            got = value.i if a.kind is int else value.s.decode()
            assert got == a.default, a.name


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_plugin_signatures_are_the_contracts(op: OpSpec) -> None:
    trtp = SimpleNamespace(
        TensorDesc=type("TensorDesc", (), {}),
        KernelLaunchParams=type("KernelLaunchParams", (), {}),
        SymExprs=type("SymExprs", (), {}),
    )
    flags = [f"has_{t.name}" for t in op.inputs if t.optional]
    assert list(presence_flags(op)) == flags
    assert list(attribute_order(op)) == [*op.attribute_names, *flags]
    describe = plugin_signature(op, trtp, aot=False)
    names = [*op.input_names, *op.attribute_names, *flags]
    assert list(describe.parameters) == names
    for name, p in describe.parameters.items():
        want = trtp.TensorDesc if name in op.input_names else int
        if name in op.attribute_names:
            want = op.attribute(name).kind
        assert p.annotation is want, name
    aot = plugin_signature(op, trtp, aot=True)
    assert list(aot.parameters) == [*names, "outputs", "tactic"]


def test_kernel_parameters_follow_the_contract() -> None:
    """Pointers ``<tensor>_ptr`` for the inputs in order, then the outputs (TensorRT's AOT
    order: inputs, int32 scalars, outputs)."""
    for op in OPS:
        fn = triton_kernels()[op.name]
        names = list(fn.arg_names) if hasattr(fn, "arg_names") else list(fn.fn.__code__.co_varnames)
        pointers = [n for n in names if n.endswith("_ptr")]
        tensors = [*op.input_names, *op.output_names]
        assert pointers == [f"{t}_ptr" for t in tensors], op.name
        inputs_end = names.index(f"{op.input_names[-1]}_ptr")
        outputs_start = names.index(f"{op.output_names[0]}_ptr")
        scalars = names[inputs_end + 1 : outputs_start]
        assert scalars and not any(n.endswith("_ptr") for n in scalars), op.name


def test_bundle_metadata_names_the_contracts_tensors_and_dims(bundle: BundleManifest) -> None:
    for kernel in bundle.kernels:
        op = next(o for o in OPS if o.name == kernel.op)
        tensors = {*op.input_names, *op.output_names}
        dims = {d for t in op.inputs for d in t.dims} | set(op.attribute_names)
        assert {a.tensor for a in kernel.args if a.kind == "pointer"} <= tensors, kernel.name
        assert set(kernel.dims) <= dims, kernel.name
        assert {d.tensor for d in kernel.dims.values() if d.tensor} <= set(op.input_names)


def test_the_readme_shows_the_contract_as_declared() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme
    assert f"## ONNX: the `{DOMAIN}` domain, version {DOMAIN_VERSION}" in readme
