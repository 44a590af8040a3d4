"""Compile the fused ops' Triton kernels ahead of time into a bundle: cubin + PTX + metadata.

One source of truth: the kernels are the ``@triton.jit`` functions of ``ultramem.kernels``
and their constexprs, warps and grids come from the same ``*_launch_config`` functions the
JIT launchers call, so a bundled kernel is the kernel ``retrieve_triton``/``aggregate_triton``
would build for that shape. What the bundle adds is what a launcher without Triton needs:
which tensor feeds each pointer, each scalar as an expression over named dims (contiguous
tensors, as TensorRT gives a plugin), the trailing scratch pointers Triton appends, and
the grid as expressions (schema in ``ultramem.plugins.metadata``).

Compiling needs no GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))``
runs on a CPU-only machine. Under ``TRITON_INTERPRET=1`` the kernels are interpreter
objects that cannot be compiled, so ``build_bundle`` then compiles in a subprocess
without it (``python -m ultramem.plugins.bundle``).

Specialisation: pointers are assumed 16-byte aligned (as the JIT assumes for torch's
allocations; the launcher checks), integer scalars are 32-bit and never specialised on
their value (the JIT would also specialise values equal to 1 and multiples of 16).

Usage::

    specs = specs_for_layer(binding.describe(), torch.bfloat16, value_dim=64)
    manifest = build_bundle(specs, sms=(80, 90, 120), out_dir="bundle/")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from ultramem.kernels.aggregate import MAPPINGS, POOLINGS
from ultramem.kernels.aggregate_triton import _aggregate_kernel, aggregate_launch_config
from ultramem.kernels.retrieve import ACTIVATIONS
from ultramem.kernels.retrieve_triton import LaunchConfig, _retrieve_kernel, retrieve_launch_config
from ultramem.plugins.metadata import ArgInfo, BundleManifest, DimInfo, KernelMetadata, evaluate

logger = logging.getLogger(__name__)

DEFAULT_SMS = (80, 86, 89, 90, 100, 120)
WARP_SIZE = 32
POINTER_ALIGN = 16  # bytes; the JIT's tt.divisibility hint for torch's allocations
SCRATCH_NAMES = ("global_scratch", "profile_scratch")  # the order Triton appends them in
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BINDING_KEYS = (
    "heads", "n_keys", "tucker_rank", "cores", "topm", "topk", "activation", "expansion",
    "mapping", "pooling", "slot_map",
)  # fmt: skip


@dataclass(frozen=True)
class OpArgs:
    """How an op's tensors and sizes feed its kernel's non-constexpr parameters."""

    function: Callable[..., Any]
    pointers: Mapping[str, str]  # parameter -> tensor
    scalars: Mapping[str, str]  # parameter -> expression over the dims


_RETRIEVE = OpArgs(
    _retrieve_kernel,
    pointers={
        "row_ptr": "row_scores", "col_ptr": "col_scores", "row_weight_ptr": "row_weight",
        "col_weight_ptr": "col_weight", "cores_ptr": "cores", "scores_ptr": "scores",
        "slots_ptr": "slots",
    },
    scalars={
        "n": "N", "m": "TOPM", "k": "TOPK", "heads": "H",
        "row_stride_t": "H*N*RANK", "row_stride_h": "N*RANK", "row_stride_n": "RANK",
        "row_stride_r": "1",
        "col_stride_t": "H*N*RANK", "col_stride_h": "N*RANK", "col_stride_n": "RANK",
        "col_stride_r": "1",
    },
)  # fmt: skip


_RETRIEVE_FLOATS = ("row_scores", "col_scores", "row_weight", "col_weight", "cores", "scores")


def _aggregate_args(has_map: bool) -> OpArgs:
    return OpArgs(
        _aggregate_kernel,
        pointers={
            "values_ptr": "values", "scores_ptr": "scores", "slots_ptr": "slots",
            # without a map the kernel never reads it: the launcher passes the slots
            "slot_map_ptr": "slot_map" if has_map else "slots", "out_ptr": "out",
        },
        scalars={
            "selections": "H*K", "value_rows": "ROWS", "value_dim": "D", "chunk": "D//CORES",
            "n_cores": "CORES", "expansion": "E", "slot_count": "SLOTS" if has_map else "ROWS*E",
            "row_offset": "OFFSET", "values_stride_row": "D", "values_stride_col": "1",
        },
    )  # fmt: skip


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of one kernel: everything but the target architecture."""

    name: str
    op: str
    pointer_dtypes: dict[str, str]  # tensor -> Triton dtype ("fp32", "i64")
    constexprs: dict[str, int | str | bool]
    num_warps: int
    dims: dict[str, DimInfo]
    grid: dict[str, str]

    @property
    def op_args(self) -> OpArgs:
        if self.op == "retrieve":
            return _RETRIEVE
        return _aggregate_args(bool(self.constexprs["HAS_MAP"]))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KernelSpec:
        fields = dict(data)
        fields["dims"] = {k: DimInfo(**v) for k, v in data["dims"].items()}
        return cls(**fields)


def _checked_binding(binding: Mapping[str, Any], dtype: torch.dtype, value_dim: int) -> None:
    missing = [k for k in BINDING_KEYS if k not in binding]
    if missing:
        raise ValueError(f"binding lacks {missing}; got keys {sorted(binding)}")
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype must be one of {list(TRITON_DTYPES)}, got {dtype}")
    choices = (("activation", ACTIVATIONS), ("mapping", MAPPINGS), ("pooling", POOLINGS))
    for key, allowed in choices:
        if binding[key] not in allowed:
            raise ValueError(f"binding[{key!r}] must be one of {allowed}, got {binding[key]!r}")
    if value_dim < 1 or value_dim % int(binding["cores"]):
        raise ValueError(
            f"value_dim = {value_dim} must split into cores = {binding['cores']} equal chunks"
        )


def specs_for_layer(
    binding: Mapping[str, Any], dtype: torch.dtype, value_dim: int
) -> list[KernelSpec]:
    """The two kernels one fused memory layer launches: retrieve, then aggregate.

    ``binding`` is ``Binding.describe()`` (heads, n_keys, tucker_rank, cores, topm, topk,
    activation, expansion, mapping, pooling, slot_map; optionally row_offset); all float
    tensors are ``dtype``, slots and the slot map int64.
    """
    _checked_binding(binding, dtype, value_dim)
    heads, topk, cores = int(binding["heads"]), int(binding["topk"]), int(binding["cores"])
    return [
        retrieve_spec(
            dtype,
            heads,
            int(binding["n_keys"]),
            int(binding["tucker_rank"]),
            cores,
            int(binding["topm"]),
            topk,
            binding["activation"],
        ),
        aggregate_spec(
            dtype,
            heads,
            topk,
            cores,
            value_dim,
            int(binding["expansion"]),
            binding["mapping"],
            binding["pooling"],
            has_map=bool(binding["slot_map"]),
            row_offset=int(binding.get("row_offset", 0)),  # V2 tables shared by layers
        ),
    ]


def retrieve_spec(
    dtype: torch.dtype,
    heads: int,
    n: int,
    rank: int,
    cores: int,
    topm: int,
    topk: int,
    act: str,
) -> KernelSpec:
    """The retrieve kernel for one shape; the name says every specialised value."""
    dt = TRITON_DTYPES[dtype]
    retrieve = retrieve_launch_config(heads, n, rank, cores, topm, topk, act)
    return KernelSpec(
        name=f"retrieve_{dt}_h{heads}_n{n}_r{rank}_c{cores}_m{topm}_k{topk}_{act}",
        op="retrieve",
        pointer_dtypes=dict.fromkeys(_RETRIEVE_FLOATS, dt) | {"slots": "i64"},
        constexprs=dict(retrieve.constexprs),
        num_warps=retrieve.num_warps,
        dims={
            "T": DimInfo("row_scores", 0, None),
            "H": DimInfo("row_scores", 1, heads),
            "N": DimInfo("row_scores", 2, n),
            "RANK": DimInfo("row_scores", 3, rank),
            "CORES": DimInfo("cores", 0, cores),
            "TOPM": DimInfo(None, None, topm),
            "TOPK": DimInfo(None, None, topk),
        },
        grid=_grid(retrieve, "H", {"H": heads}),
    )


def aggregate_spec(
    dtype: torch.dtype,
    heads: int,
    topk: int,
    cores: int,
    value_dim: int,
    expansion: int,
    mapping: str,
    pooling: str,
    *,
    has_map: bool,
    row_offset: int = 0,
) -> KernelSpec:
    """The aggregate kernel for one shape; the name says every specialised value."""
    dt = TRITON_DTYPES[dtype]
    aggregate = aggregate_launch_config(
        heads, topk, value_dim, expansion, mapping, pooling, has_map=has_map
    )
    dims = {
        "T": DimInfo("scores", 0, None),
        "H": DimInfo("scores", 1, heads),
        "K": DimInfo("scores", 2, topk),
        "CORES": DimInfo("scores", 3, cores),
        "ROWS": DimInfo("values", 0, None),  # the table's size: not part of the kernel
        "D": DimInfo("values", 1, value_dim),
        "E": DimInfo(None, None, expansion),
        "OFFSET": DimInfo(None, None, row_offset),
    }
    if has_map:
        dims["SLOTS"] = DimInfo("slot_map", 0, None)
    variant = f"{mapping}_{pooling}_{'map' if has_map else 'nomap'}"
    variant += f"_off{row_offset}" if row_offset else ""
    return KernelSpec(
        name=f"aggregate_{dt}_h{heads}_k{topk}_c{cores}_d{value_dim}_e{expansion}_{variant}",
        op="aggregate",
        pointer_dtypes=dict.fromkeys(("values", "scores", "out"), dt)
        | {"slots": "i64", "slot_map": "i64"},
        constexprs=dict(aggregate.constexprs),
        num_warps=aggregate.num_warps,
        dims=dims,
        grid=_grid(aggregate, "cdiv(D, BLOCK_D)", {"D": value_dim}),
    )


def specs_for_layers(
    layers: Iterable[tuple[Mapping[str, Any], torch.dtype, int]],
) -> list[KernelSpec]:
    """``specs_for_layer`` over a model's layers, each specialisation once."""
    specs: dict[str, KernelSpec] = {}
    for binding, dtype, value_dim in layers:
        for spec in specs_for_layer(binding, dtype, value_dim):
            specs.setdefault(spec.name, spec)
    return list(specs.values())


def _grid(config: LaunchConfig, y: str, dims: Mapping[str, int]) -> dict[str, str]:
    """The grid as expressions, checked against the launch config it stands for."""
    grid = {"x": "T", "y": y, "z": "1"}
    env = {**config.constexprs, **dims}
    for tokens in (1, 7, 1000):
        got = tuple(evaluate(grid[a], {**env, "T": tokens}) for a in ("x", "y", "z"))
        if got != config.grid(tokens):
            raise RuntimeError(f"grid {grid} gives {got}, the launcher {config.grid(tokens)}")
    return grid


# ---------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------


def kernel_signature(spec: KernelSpec) -> tuple[dict[str, str], list[ArgInfo]]:
    """Triton's signature (every parameter, constexprs marked) and the non-constexpr
    parameters as ``ArgInfo`` in order, from the jit function's own parameter list."""
    fn, table = spec.op_args.function, spec.op_args
    params = [p for p in fn.params if not p.is_constexpr]
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    if constexprs != set(spec.constexprs):
        raise ValueError(
            f"{fn.__name__} has constexprs {sorted(constexprs)}, the spec {sorted(spec.constexprs)}"
        )
    names = {p.name for p in params}
    if names != set(table.pointers) | set(table.scalars):
        raise ValueError(
            f"{fn.__name__} takes {sorted(names)} but the bundle maps "
            f"{sorted(set(table.pointers) | set(table.scalars))}: update plugins/bundle.py"
        )
    signature: dict[str, str] = {}
    args: list[ArgInfo] = []
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in table.pointers:
            tensor = table.pointers[p.name]
            dtype = spec.pointer_dtypes[tensor]
            signature[p.name] = f"*{dtype}"
            args.append(ArgInfo(p.name, "pointer", dtype, tensor=tensor, align=POINTER_ALIGN))
        else:
            signature[p.name] = "i32"
            args.append(ArgInfo(p.name, "scalar", "i32", expr=table.scalars[p.name]))
    return signature, args


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)")
_PARAM = re.compile(r"\.param\s+\.(\w+)")


def parse_ptx(ptx: str) -> tuple[str, str, list[str], int | None]:
    """(entry symbol, ``.target``, parameter types, ``.reqntid`` threads or None)."""
    entry = _ENTRY.search(ptx)
    target = re.search(r"^\s*\.target\s+([\w,\s]+?)\s*$", ptx, re.MULTILINE)
    if entry is None or target is None:
        raise ValueError("PTX without an .entry or a .target: not a Triton kernel")
    reqntid = re.search(r"\.reqntid\s+(\d+)", ptx)
    params = _PARAM.findall(entry.group(2))
    return entry.group(1), target.group(1), params, int(reqntid.group(1)) if reqntid else None


def compile_spec(spec: KernelSpec, sm: int) -> tuple[KernelMetadata, bytes, str]:
    """Compile one specialisation for ``sm``: (metadata, cubin, PTX)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.op_args.function
    signature, args = kernel_signature(spec)
    pointer_params = [i for i, a in enumerate(fn.arg_names) if signature[a].startswith("*")]
    attrs = {(i,): [["tt.divisibility", POINTER_ALIGN]] for i in pointer_params}
    src = ASTSource(fn, signature, dict(spec.constexprs), attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", sm, WARP_SIZE), options={"num_warps": spec.num_warps}
    )
    md = compiled.metadata
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    entry, arch, ptx_params, reqntid = parse_ptx(ptx)
    extra = len(ptx_params) - len(args)
    if not 0 <= extra <= len(SCRATCH_NAMES):
        raise RuntimeError(
            f"{entry} for sm_{sm} has {len(ptx_params)} parameters for {len(args)} arguments: "
            f"this Triton ({triton.__version__}) appends more than the known scratch pointers"
        )
    for name in SCRATCH_NAMES[:extra]:
        size = int(getattr(md, f"{name}_size", 0))
        align = int(getattr(md, f"{name}_align", 1))
        args.append(ArgInfo(name, "scratch", "u8", bytes_per_program=size, align=align))
    args = [ArgInfo(**{**asdict(a), "ptx_type": t}) for a, t in zip(args, ptx_params, strict=True)]
    threads = md.num_warps * WARP_SIZE
    if reqntid is not None and reqntid != threads:
        raise RuntimeError(f"{entry}: .reqntid {reqntid} but {md.num_warps} warps")
    meta = KernelMetadata(
        name=spec.name,
        op=spec.op,
        function=fn.__name__,
        entry=entry,
        sm=sm,
        arch=arch,
        cubin=f"{spec.name}-sm{sm}.cubin",
        ptx=f"{spec.name}-sm{sm}.ptx",
        cubin_sha256=hashlib.sha256(cubin).hexdigest(),
        num_warps=md.num_warps,
        threads_per_block=threads,
        num_ctas=int(getattr(md, "num_ctas", 1)),
        shared_bytes=int(md.shared),
        constexprs=dict(spec.constexprs),
        args=tuple(args),
        dims=dict(spec.dims),
        grid=dict(spec.grid),
        options={
            "num_stages": md.num_stages,
            "enable_fp_fusion": md.enable_fp_fusion,
            "triton_version": triton.__version__,
        },
    )
    return meta, cubin, ptx


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def kernels_are_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``, where the jit functions cannot be compiled."""
    return not isinstance(_retrieve_kernel, triton.runtime.JITFunction)


def build_bundle(
    specs: Sequence[KernelSpec], sms: Sequence[int] = DEFAULT_SMS, out_dir: str | Path = "bundle"
) -> BundleManifest:
    """Compile every spec for every sm into ``out_dir``: ``<name>-sm<XX>.{cubin,ptx}`` and
    ``bundle.json``. Each specialisation is compiled once, however often it is listed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unique = list({s.name: s for s in specs}.values())
    if kernels_are_interpreted():
        return _build_in_subprocess(unique, sms, out)
    kernels = []
    for spec in unique:
        for sm in sms:
            start = time.perf_counter()
            meta, cubin, ptx = compile_spec(spec, sm)
            seconds = time.perf_counter() - start
            logger.info("compiled %s for sm_%d in %.2f s", spec.name, sm, seconds)
            _write_atomic(out / meta.cubin, cubin)
            _write_atomic(out / meta.ptx, ptx.encode())
            kernels.append(meta)
    manifest = BundleManifest(out, triton.__version__, tuple(sms), tuple(kernels))
    manifest.write()
    return manifest


def _build_in_subprocess(specs: list[KernelSpec], sms: Sequence[int], out: Path) -> BundleManifest:
    from ultramem.plugins.metadata import load_bundle

    spec_file = out / "specs.json"
    spec_file.write_text(json.dumps([s.to_json() for s in specs]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ultramem.plugins.bundle", str(spec_file), str(out)]
    cmd += ["--sms", ",".join(str(sm) for sm in sms)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    spec_file.unlink(missing_ok=True)
    if done.returncode:
        raise RuntimeError(f"compiling the bundle failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return load_bundle(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile kernel specs (JSON) into a bundle.")
    parser.add_argument("specs", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sms", default=",".join(map(str, DEFAULT_SMS)))
    args = parser.parse_args(argv)
    if kernels_are_interpreted():
        parser.error("the kernels are interpreted here: unset TRITON_INTERPRET")
    specs = [KernelSpec.from_json(s) for s in json.loads(args.specs.read_text())]
    build_bundle(specs, [int(s) for s in args.sms.split(",")], args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
