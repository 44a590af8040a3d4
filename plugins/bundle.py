"""Compile the fused ops' Triton kernels ahead of time into a bundle: cubin + PTX + metadata.

One source of truth: the kernels are the ``@triton.jit`` functions of ``ultramem.kernels``
and their constexprs, warps and grids come from the same ``*_launch_config`` functions the
JIT launchers call (``plugins/specs.py``), so a bundled kernel is the kernel
``retrieve_triton``/``aggregate_triton`` would build for that shape. What the bundle adds is
what a launcher without Triton needs: which tensor feeds each pointer, each scalar as an
expression over named dims (contiguous tensors, as TensorRT gives a plugin), the trailing
scratch pointers Triton appends, and the grid as expressions (schema in
``ultramem.plugins.metadata``).

Compiling needs no GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))``
runs on a CPU-only machine. Under ``TRITON_INTERPRET=1`` the kernels are interpreter
objects that cannot be compiled, so ``build_bundle`` then compiles in a subprocess
without it (``python -m ultramem.plugins.bundle``).

Specialisation: the JIT's (``JITFunction.run``: Triton's binder), so a bundled kernel
compiles to the cubin the JIT builds. Pointers are assumed 16-byte aligned (as for
torch's allocations); an integer scalar whose value is fixed at build time (every one that
does not depend on the token count or the table's rows) is compiled in as a constant when
it is 1 and hinted divisible by 16 when it is a multiple of 16; the rest are plain
32-bit. ``bundle.json`` records each (``fixed``, ``divisibility``, ``align``), and the
launcher refuses a launch that breaks one (``launcher.scalar_values``, ``pack_args``).
Before, scalars were never specialised: the paper-scale bf16 ``aggregate`` compiled to
197 registers and scalar 2-byte loads where the JIT's kernel vectorises.

Usage::

    specs = specs_for_program(rewritten_program.graph)   # plugins/specs.py
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
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import triton

from ..files import atomic_write
from ..kernels import triton_kernels
from .metadata import ArgInfo, BundleManifest, KernelMetadata, evaluate
from .sms import DEFAULT_SMS
from .specs import KernelSpec

logger = logging.getLogger(__name__)

WARP_SIZE = 32
POINTER_ALIGN = 16  # bytes; the JIT's tt.divisibility hint for torch's allocations
SCALAR_DIVISIBILITY = 16  # the JIT hints an integer argument that is a multiple of this
SCRATCH_NAMES = ("global_scratch", "profile_scratch")  # the order Triton appends them in


# ---------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------


def kernel_signature(spec: KernelSpec) -> tuple[dict[str, str], list[ArgInfo]]:
    """Triton's signature (every parameter, constexprs marked) and the non-constexpr
    parameters as ``ArgInfo`` in order, from the jit function's own parameter list."""
    fn = triton_kernels()[spec.op]
    params = [p for p in fn.params if not p.is_constexpr]
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    if constexprs != set(spec.constexprs):
        raise ValueError(
            f"{fn.__name__} has constexprs {sorted(constexprs)}, the spec {sorted(spec.constexprs)}"
        )
    names = {p.name for p in params}
    if names != set(spec.pointers) | set(spec.scalars):
        raise ValueError(
            f"{fn.__name__} takes {sorted(names)} but the spec maps "
            f"{sorted(set(spec.pointers) | set(spec.scalars))}: update plugins/specs.py"
        )
    signature: dict[str, str] = {}
    args: list[ArgInfo] = []
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in spec.pointers:
            tensor = spec.pointers[p.name]
            dtype = spec.pointer_dtypes[tensor]
            signature[p.name] = f"*{dtype}"
            args.append(ArgInfo(p.name, "pointer", dtype, tensor=tensor, align=POINTER_ALIGN))
        else:
            signature[p.name] = "i32"
            args.append(ArgInfo(p.name, "scalar", "i32", expr=spec.scalars[p.name]))
    return signature, args


def build_time_value(spec: KernelSpec, expr: str) -> int | None:
    """A scalar's value when it depends only on dims fixed at build time, else None."""
    static = {name: dim.value for name, dim in spec.dims.items() if dim.value is not None}
    try:
        return evaluate(expr, static)
    except ValueError:  # names the token count or the table's rows
        return None


def jit_specialisation(
    spec: KernelSpec,
) -> tuple[dict[str, str], dict[tuple[int], Any], dict[tuple[int], list[Any]], list[ArgInfo]]:
    """What ``JITFunction.run`` derives for a launch of this spec (Triton's binder, for
    the arguments known at build time): the signature, the constexprs and the attributes
    by parameter index, and the kernel's parameters (``ArgInfo``, the scalars compiled in
    as constants marked with their ``value``)."""
    fn = triton_kernels()[spec.op]
    signature, args = kernel_signature(spec)
    by_name = {a.name: a for a in args}
    constexprs: dict[tuple[int], Any] = {}
    attrs: dict[tuple[int], list[Any]] = {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            constexprs[(i,)] = spec.constexprs[p.name]
            continue
        arg = by_name[p.name]
        if arg.kind == "pointer":
            attrs[(i,)] = [["tt.divisibility", POINTER_ALIGN]]
            continue
        value = build_time_value(spec, arg.expr or "")
        attrs[(i,)] = []
        if value == 1:  # the JIT makes an integer 1 a constant
            signature[p.name] = "constexpr"
            constexprs[(i,)] = 1
            by_name[p.name] = replace(arg, value=1)
        elif value is not None and value % SCALAR_DIVISIBILITY == 0:
            attrs[(i,)] = [["tt.divisibility", SCALAR_DIVISIBILITY]]
            by_name[p.name] = replace(arg, divisibility=SCALAR_DIVISIBILITY)
    return signature, constexprs, attrs, [by_name[a.name] for a in args]


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

    fn = triton_kernels()[spec.op]
    signature, constexprs, attrs, params = jit_specialisation(spec)
    fixed = tuple(a for a in params if a.value is not None)
    args = [a for a in params if a.value is None]
    src = ASTSource(fn, signature, constexprs, attrs)
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
        fixed=fixed,
        options={
            "num_stages": md.num_stages,
            "enable_fp_fusion": md.enable_fp_fusion,
            "triton_version": triton.__version__,
        },
    )
    return meta, cubin, ptx


def kernels_are_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``, where the jit functions cannot be compiled."""
    return not isinstance(triton_kernels()["retrieve"], triton.runtime.JITFunction)


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
            atomic_write(out / meta.cubin, cubin)
            atomic_write(out / meta.ptx, ptx.encode())
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
