"""The ahead-of-time kernel bundle, built on CPU: files, metadata against the jit functions,
grids, argument packing. Nothing here launches a kernel (``test_launcher.py`` does, on GPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import inspect
import re
from typing import Any

import pytest
import torch

from ultramem.kernels import AGGREGATE, RETRIEVE
from ultramem.kernels.aggregate_triton import aggregate_launch_config
from ultramem.kernels.retrieve_triton import retrieve_launch_config
from ultramem.plugins.bundle import parse_ptx
from ultramem.plugins.launcher import pack_args, resolve_dims, scalar_values
from ultramem.plugins.metadata import BundleManifest, KernelMetadata, evaluate, load_bundle
from ultramem.plugins.specs import KernelSpec, spec_for_call

BUNDLE_SMS = (80, 90, 120)
ODD_TOKENS = (1, 7, 13, 1000)
# (``ultramem.kernels`` re-exports functions named like these modules: import by path)
MODULES = {
    op: importlib.import_module(f"ultramem.kernels.{op}_triton") for op in ("retrieve", "aggregate")
}


def jit_params(fn: Any) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of a jit function's parameters, compiled or interpreted."""
    if hasattr(fn, "params"):
        return [(p.name, bool(p.is_constexpr)) for p in fn.params]
    signature = inspect.signature(fn.fn)  # TRITON_INTERPRET=1: an InterpretedFunction
    assert [p for p in signature.parameters] == fn.arg_names
    return [(n, "constexpr" in str(p.annotation)) for n, p in signature.parameters.items()]


def dims_for(kernel: KernelMetadata, tokens: int) -> dict[str, int]:
    """Every dim at its build-time value, ``tokens`` tokens, and 100 value rows."""
    free = {"T": tokens, "R": 100}
    return {n: d.value if d.value is not None else free[n] for n, d in kernel.dims.items()}


def test_every_spec_for_every_sm(bundle: BundleManifest, bundle_specs: list[KernelSpec]) -> None:
    assert len(bundle_specs) == 6  # small fp32, model fp32, model bf16; retrieve + aggregate
    built = sorted((k.name, k.sm) for k in bundle.kernels)
    assert built == sorted((s.name, sm) for s in bundle_specs for sm in BUNDLE_SMS)
    assert load_bundle(bundle.root).to_json() == bundle.to_json()


def test_files_are_kernels(bundle: BundleManifest) -> None:
    for k in bundle.kernels:
        cubin = (bundle.root / k.cubin).read_bytes()
        ptx = (bundle.root / k.ptx).read_text()
        assert k.cubin == f"{k.name}-sm{k.sm}.cubin" and k.ptx == f"{k.name}-sm{k.sm}.ptx"
        assert cubin[:4] == b"\x7fELF", k.cubin
        assert hashlib.sha256(cubin).hexdigest() == k.cubin_sha256
        assert re.search(rf"\.entry\s+{k.entry}\s*\(", ptx), k.ptx
        assert re.search(rf"^\.target\s+sm_{k.sm}a?\b", ptx, re.MULTILINE), k.ptx
        assert k.arch in (f"sm_{k.sm}", f"sm_{k.sm}a")
        assert k.entry == k.function  # Triton names the entry after the jit function
        assert k.threads_per_block == 32 * k.num_warps
        _, _, ptx_params, reqntid = parse_ptx(ptx)
        assert reqntid in (None, k.threads_per_block)
        assert ptx_params == [a.ptx_type for a in k.args]


def test_args_follow_the_jit_signature(bundle: BundleManifest) -> None:
    """Non-constexpr parameters in order, then Triton's trailing scratch pointers."""
    for k in bundle.kernels:
        fn = getattr(MODULES[k.op], k.function)
        params = jit_params(fn)
        fixed = {a.name for a in k.fixed}  # compiled in as constants, as the JIT does for a 1
        runtime = [name for name, is_constexpr in params if not is_constexpr and name not in fixed]
        constexprs = {name for name, is_constexpr in params if is_constexpr}
        kernel_args = [a for a in k.args if a.kind != "scratch"]
        scratch = [a for a in k.args if a.kind == "scratch"]
        assert [a.name for a in kernel_args] == runtime
        assert k.args[len(runtime) :] == tuple(scratch)  # scratch pointers come last
        assert [a.name for a in scratch] == ["global_scratch", "profile_scratch"][: len(scratch)]
        assert len(scratch) == 2  # Triton >= 3.5 appends both
        assert set(k.constexprs) == constexprs
        for a in k.args:
            if a.kind == "scalar":
                assert (a.dtype, a.ptx_type) == ("i32", "u32"), a
            else:
                assert a.ptx_type == "u64", a
                assert a.kind == "scratch" or a.name.endswith("_ptr"), a


def test_constexprs_come_from_the_launch_config(bundle: BundleManifest) -> None:
    for k in bundle.kernels:
        d = {n: dim.value for n, dim in k.dims.items()}
        if k.op == "retrieve":
            act = k.constexprs["ACTIVATION"]
            config = retrieve_launch_config(
                d["H"], d["n"], d["r"], d["M"], d["topm"], d["topk"], str(act)
            )
        else:
            config = aggregate_launch_config(
                d["H"], d["k"], d["Dv"], d["M"], d["groups"], str(k.constexprs["POOLING"]),
                has_row_map=bool(k.constexprs["HAS_ROW_MAP"]),
                has_group_map=bool(k.constexprs["HAS_GROUP_MAP"]),
            )  # fmt: skip
        assert k.constexprs == dict(config.constexprs)
        assert k.num_warps == config.num_warps
        for tokens in ODD_TOKENS:
            assert k.launch_grid(dims_for(k, tokens)) == config.grid(tokens)


def test_pointer_dtypes(bundle: BundleManifest) -> None:
    for k in bundle.kernels:
        float_dtype = "bf16" if "_bf16_" in k.name else "fp32"
        for a in k.args:
            if a.kind == "pointer":
                if a.tensor in ("row_map", "group_map"):  # as the fusion pass binds them
                    expected = "i32"
                else:
                    expected = "i64" if a.tensor == "slots" else float_dtype
                assert a.dtype == expected and a.align == 16, a


@pytest.mark.parametrize("tokens", ODD_TOKENS)
def test_grid_covers_every_token(bundle: BundleManifest, tokens: int) -> None:
    for k in bundle.kernels:
        dims = dims_for(k, tokens)
        x, y, z = k.launch_grid(dims)
        assert x == tokens and z == 1
        if k.op == "retrieve":  # one program per (token, head)
            assert y == dims["H"]
        else:  # one per (token, block of value columns): every column, no empty block
            block = int(k.constexprs["BLOCK_D"])
            assert y * block >= dims["Dv"] > (y - 1) * block


def test_scalars_match_contiguous_strides(bundle: BundleManifest) -> None:
    for k in bundle.kernels:
        dims = dims_for(k, 7)
        values = {**scalar_values(k, dims), **{a.name: a.value for a in k.fixed}}
        if k.op == "retrieve":
            shape = (7, dims["H"], dims["n"], dims["r"])
            strides = torch.empty(shape).stride()
            for side in ("row", "col"):
                got = [values[f"{side}_stride_{a}"] for a in "thnr"]
                assert tuple(got) == strides
            assert (values["n"], values["m"], values["k"]) == (
                dims["n"], dims["topm"], dims["topk"],
            )  # fmt: skip
        else:
            table = torch.empty(dims["R"], dims["Dv"])
            assert (values["values_stride_row"], values["values_stride_col"]) == table.stride()
            assert values["selections"] == dims["H"] * dims["k"]
            assert values["chunk"] * values["n_cores"] == dims["Dv"]
            has_map = bool(k.constexprs["HAS_ROW_MAP"] or k.constexprs["HAS_GROUP_MAP"])
            assert values["slots_count"] == (dims["S"] if has_map else dims["R"])
            for name, heads in (("row_map", "Hr"), ("group_map", "Hg")):
                present = bool(k.constexprs[f"HAS_{name.upper()}"])
                per_head = present and dims[heads] > 1
                assert values[f"{name}_head_stride"] == (dims["S"] if per_head else 0)


def test_pack_args_in_signature_order(bundle: BundleManifest) -> None:
    k = bundle.kernels[0]
    values: dict[str, int] = {}
    for i, a in enumerate(k.args):
        step = 256 if a.kind == "pointer" else 16  # aligned, and a multiple where hinted
        values[a.name] = 0 if a.kind == "scratch" else (i + 1) * step
    packed = pack_args(k, values)
    assert [v for _, v in packed] == [values[a.name] for a in k.args]
    sizes = {"u64": 8, "u32": 4}
    for (ctype, _), a in zip(packed, k.args, strict=True):
        assert ctype is (ctypes.c_uint64 if a.kind != "scalar" else ctypes.c_int32)
        assert ctypes.sizeof(ctype) == sizes[a.ptx_type or ""]


def test_pack_args_refuses_what_does_not_fit(bundle: BundleManifest) -> None:
    k = bundle.kernels[0]
    good = {a.name: 256 if a.kind == "pointer" else 0 for a in k.args}
    pointer = next(a.name for a in k.args if a.kind == "pointer")
    scalar = next(a.name for a in k.args if a.kind == "scalar")
    with pytest.raises(ValueError, match="no value for"):
        pack_args(k, {n: v for n, v in good.items() if n != scalar})
    with pytest.raises(ValueError, match="aligned"):
        pack_args(k, {**good, pointer: 256 + 4})
    with pytest.raises(ValueError, match="does not fit i32"):
        pack_args(k, {**good, scalar: 2**31})
    with pytest.raises(ValueError, match="not a device address"):
        pack_args(k, {**good, pointer: -1})


def test_resolve_dims_refuses_other_shapes(bundle: BundleManifest) -> None:
    k = next(k for k in bundle.kernels if k.op == "retrieve")
    h, n, r, c = (k.dims[d].value for d in ("H", "n", "r", "M"))
    assert h is not None and n is not None and r is not None and c is not None
    shapes = {"row_scores": (5, h, n, r), "cores": (c, h, r, r)}
    assert resolve_dims(k, shapes)["T"] == 5
    with pytest.raises(ValueError, match=f"built for H = {h}"):
        resolve_dims(k, {**shapes, "row_scores": (5, h + 1, n, r)})


@pytest.mark.parametrize(
    ("expr", "value"),
    [("T", 13), ("T*H", 26), ("cdiv(D, 16)", 5), ("min(T, 4) + max(1, H) % 2", 4), ("-T", -13)],
)
def test_evaluate(expr: str, value: int) -> None:
    assert evaluate(expr, {"T": 13, "H": 2, "D": 65, "NAME": "x"}) == value


@pytest.mark.parametrize(
    "expr",
    ["__import__('os')", "T.real", "T / 2", "U", "NAME", "cdiv(T, 0)", "T // 0", "2 ** 8", "("],
)
def test_evaluate_refuses(expr: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expr, {"T": 13, "NAME": "x"})


def test_a_call_the_contract_refuses_has_no_spec() -> None:
    rows, cols = torch.randn(2, 1, 16, 2), torch.randn(2, 1, 16, 2)
    weights, cores = torch.randn(1, 2), torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        spec_for_call(RETRIEVE, RETRIEVE.bind(rows, cols, weights, weights, cores, 4, 4, "gelu"))
    with pytest.raises(ValueError, match="equal chunks"):
        spec_for_call(
            AGGREGATE,
            AGGREGATE.bind(torch.randn(8, 8), torch.randn(2, 1, 4, 3), torch.zeros(2, 1, 4).long()),
        )


def test_maps_are_part_of_the_specialisation() -> None:
    values, weights = torch.randn(32, 8), torch.randn(2, 2, 4, 1)
    slots = torch.zeros(2, 2, 4, dtype=torch.int64)
    shared, per_head = torch.zeros(1, 64, dtype=torch.int64), torch.zeros(2, 64, dtype=torch.int64)
    names = {
        spec_for_call(AGGREGATE, AGGREGATE.bind(values, weights, slots, *maps)).name
        for maps in [(), (shared,), (per_head,), (shared, per_head, 2), (shared.int(),)]
    }
    assert len(names) == 5
