"""Static estimates of the fused lookup's Triton kernels on a GPU, computed on a CPU.

    python scripts/kernel_report.py --config paper --sm 90 --json report.json
    python scripts/kernel_report.py --config tiny --tokens 1,8      # seconds: CI's size

These are ESTIMATES FROM A STATIC MODEL, NOT MEASUREMENTS. No GPU is touched.

What is compiled: the fused path of ``scripts/bench_lookup.py`` (``FusedLookup``: the ops
``torch.ops.ultramem.*`` and anything else it launches) runs on meta tensors of the
config's sizes with the ops routed to their Triton launchers (``triton_on_cpu``). Every
Triton launch they make is captured instead of run (grid, arguments, constexprs, warps),
so the kernels, their constexprs and their grids are the launchers' own, whatever the
kernels become. Each launch is then specialised by Triton's own JIT binder (integer
arguments equal to 1 become constexprs, multiples of 16 get the divisibility hint,
pointers the 16-byte alignment hint: exactly what ``kernel[grid](...)`` compiles on a
GPU) and compiled ahead of time for ``GPUTarget("cuda", sm, 32)``. Scalars a launcher reads
from a tensor (index checks) read 0 here; each such read is a host synchronisation on a
GPU and is counted in the notes.

Per kernel and token count:

- ``programs``: the grid's size.
- ``registers``, ``spills``, ``shared_bytes``: ``cuobjdump -res-usage`` of the cubin
  (``REG``; local memory per thread, ``LOCAL + STACK``, in 4-byte words, as Triton's
  ``n_spills`` reads ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4``) and the dynamic shared
  memory Triton launches the kernel with (``metadata.shared``).
- ``sass_instructions``: the static instruction count of the kernel (``nvdisasm``),
  NOP padding and the closing self-branch left out.
- ``warp_instructions_per_program``: a dynamic count (``scripts/sass_model.py``): loops are
  the SASS's backward branches, each attributed through the cubin's line information to a
  ``for ... in range`` of the kernel's source, whose bounds, evaluated with the launch's
  own arguments and constexprs, give its trip count; an instruction counts once per
  iteration of every loop around it, code outside loops once, both sides of a branch
  included, except the code of a helper the kernel's module names in ``RARE_HELPERS``
  (called only on a rarely taken branch: retrieve's full-key fallback), which counts at
  the rate ``scripts/branch_rates.py`` measures for it on inputs drawn as the bench's
  (``RATE_TOKENS`` tokens; a note gives the rate). Every warp of a program is assumed to
  run the same path: the count per warp times ``num_warps``. A loop that cannot be
  attributed, or whose bounds the launch does not fix, stops the report with its place,
  never a guess.
- ``warp_instructions_upper``, ``est_us_upper``: the same with every path counted (the
  rare helpers too), an upper bound. Triton before 3.9 names no inlined calls in its line
  information, so there the rare helpers cannot be told apart and both figures are this.
- ``est_us``: issue-bound time on the device model (H100 SXM for sm_90): 132 SMs, each
  with 4 warp schedulers issuing at most one warp-instruction per cycle at 1.755 GHz (boost);
  programs resident per SM from registers (allocated per warp in units of 256), shared
  memory (228 KB an SM, 1 KB reserved per program), 64 warps and 32 programs an SM. The
  busiest SM runs ceil(programs / 132) programs in waves of that residency; a wave of r
  programs of w warps takes r * instructions / min(4, r * w) cycles (fewer than 4 warps
  leave schedulers idle; more hide latency perfectly: an optimistic assumption, no
  dependency stalls, no memory latency). The estimate is the larger of that time and
  ``floor_us`` (a kernel cannot beat its memory traffic), plus 3 us of launch overhead.
- ``floor_us``: the bytes the kernel must move at 3.35 TB/s (H100 SXM HBM3): every tensor it
  is passed, once, except the tables an op reads only where its selections point
  (``GATHERED``: value rows and index-map entries of the selected slots).

Totals per token count are the sums over every launch of the lookup (``launches``), with
``est_us_upper`` beside ``est_us``.
``--json FILE`` writes ``{"device_model", "rows": [...], "totals": [...]}``; a markdown
table goes to stdout. ``--cubin-dir DIR`` keeps each compiled kernel's cubin and SASS.
A launcher whose arguments no longer fit its kernel fails the report with the kernel's
name and Triton's message.
"""

from __future__ import annotations

import os

# the report compiles for a GPU: the interpreter's kernels cannot be compiled
os.environ.pop("TRITON_INTERPRET", None)

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

SCRIPTS = Path(__file__).resolve().parent


def _sibling(name: str) -> ModuleType:
    """A module of scripts/ (no package): registered first so its dataclasses resolve."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sass = _sibling("sass_model")
ReportError = sass.ReportError
TOKENS = (1, 64, 4096)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAUNCH_US = 3.0  # host launch overhead per kernel, as measured for eager PyTorch launches
RATE_TOKENS = 1024  # tokens of the bench's inputs a rare path's rate is measured on


@dataclass(frozen=True)
class DeviceModel:
    name: str
    sms: int
    schedulers_per_sm: int
    clock_ghz: float
    bandwidth_tbs: float
    registers_per_sm: int
    max_warps_per_sm: int
    max_programs_per_sm: int
    shared_per_sm: int
    shared_reserved_per_program: int

    def describe(self) -> str:
        return (
            f"{self.name}: {self.sms} SMs x {self.schedulers_per_sm} schedulers at "
            f"{self.clock_ghz} GHz, {self.bandwidth_tbs} TB/s (static model, Triton "
            f"{triton.__version__})"
        )


DEVICES = {
    90: DeviceModel(
        name="NVIDIA H100 SXM (sm_90)",
        sms=132,
        schedulers_per_sm=4,
        clock_ghz=1.755,
        bandwidth_tbs=3.35,
        registers_per_sm=65536,
        max_warps_per_sm=64,
        max_programs_per_sm=32,
        shared_per_sm=228 * 1024,
        shared_reserved_per_program=1024,
    )
}

# Inputs an op reads only where its selections point: the bytes it must move are the
# selected rows, not the table. op -> (the index tensor, {table: elements per index}).
GATHERED: dict[str, tuple[str, dict[str, Callable[[torch.Tensor], int]]]] = {
    "aggregate": (
        "slots",
        {"values": lambda t: int(t.shape[-1]), "row_map": lambda t: 1, "group_map": lambda t: 1},
    ),
}


# ---- capture: the launches the fused path makes -----------------------------------------


@dataclass
class Launch:
    """One Triton launch as a launcher made it (arguments are meta tensors and Python values)."""

    fn: Any  # triton.runtime.JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grid: tuple[int, int, int]
    op: str | None  # the ultramem op whose launcher made it (None: outside the ops)
    op_args: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.fn.__name__)


@dataclass
class Trace:
    """What one call of the fused path did besides its Triton launches."""

    launches: list[Launch] = field(default_factory=list)
    op: str | None = None
    op_args: dict[str, Any] = field(default_factory=dict)
    host_reads: list[str] = field(default_factory=list)  # scalars read inside the ops
    other_kernels: list[str] = field(default_factory=list)  # aten kernels inside the ops
    outside_kernels: list[str] = field(default_factory=list)  # aten kernels around the ops


# aten ops that launch no kernel on a GPU (views, allocation, metadata)
_NO_KERNEL = {
    "empty", "empty_strided", "new_empty", "new_empty_strided", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "lift_fresh", "detach", "alias", "contiguous",
    "_unsafe_view", "_reshape_alias",
}  # fmt: skip
_SCALAR_READS = {"item": 0, "_local_scalar_dense": 0, "is_nonzero": False}


class _ReadsAsZero(TorchDispatchMode):
    """Meta tensors hold no data: a scalar read from one (an index check) reads 0, and is
    counted, as on a GPU it would be a host synchronisation. Also counts aten kernels."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in _SCALAR_READS:
            if self.trace.op is not None:
                self.trace.host_reads.append(f"{self.trace.op}: {name}")
            return _SCALAR_READS[name]
        if not func.is_view and name not in _NO_KERNEL:
            where = self.trace.other_kernels if self.trace.op else self.trace.outside_kernels
            where.append(f"{self.trace.op or 'lookup'}: aten.{name}")
        return func(*args, **(kwargs or {}))


class _OpBoundary(TorchDispatchMode):
    """Marks which ultramem op's launcher is running (its launches belong to that op)."""

    def __init__(self, trace: Trace, ops: dict[Any, Any]) -> None:
        super().__init__()
        self.trace, self.ops = trace, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        spec = self.ops.get(func)
        if spec is None:
            return func(*args, **(kwargs or {}))
        self.trace.op, self.trace.op_args = spec.name, spec.bind(*args, **(kwargs or {}))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.trace.op, self.trace.op_args = None, {}


def _grid3(grid: Any, bound: dict[str, Any]) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(bound)
    dims = [int(g) for g in grid] + [1, 1]
    return dims[0], dims[1], dims[2]


@contextlib.contextmanager
def _captured_launches(trace: Trace) -> Iterator[None]:
    """Every ``JITFunction.run`` records its launch and returns without compiling."""
    jit = triton.runtime.jit.JITFunction
    original = jit.run

    def record(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        params = [p.name for p in fn.params]
        bound = dict(zip(params, args, strict=False)) | kwargs
        trace.launches.append(
            Launch(fn, args, kwargs, _grid3(grid, bound), trace.op, dict(trace.op_args))
        )

    jit.run = record
    try:
        yield
    finally:
        jit.run = original


def load_bench_lookup() -> ModuleType:
    """``scripts/bench_lookup.py``: its configs and its fused path are what is reported."""
    module = _sibling("bench_lookup")
    for name in ("CONFIGS", "FusedLookup"):
        if not hasattr(module, name):
            raise ReportError(f"scripts/bench_lookup.py has no {name}: the report runs its path")
    return module


def fused_path(bench: ModuleType, config: str, dtype: torch.dtype) -> Any:
    """The bench's fused lookup of the config's layer, on meta tensors (no memory, no data)."""
    from ultramem.models.ultramem import UltraMemLayer

    layer = UltraMemLayer(bench.CONFIGS[config].layer, seed=0).eval()
    layer = layer.to(device="meta", dtype=dtype)
    with torch.no_grad():
        return bench.FusedLookup(layer)


def capture(fused: Any, tokens: int, dtype: torch.dtype) -> Trace:
    """One call of the fused path at ``tokens`` tokens, its launches captured."""
    from torch._library.triton import set_wrap_triton_enabled

    import ultramem.kernels as kernels

    ops = {kernels.op_overload(spec): spec for spec in kernels.OPS}
    trace = Trace()
    x = torch.empty(1, tokens, fused.cfg.d_model, device="meta", dtype=dtype)
    # innermost first: the boundary sees the op call, triton_on_cpu routes it to the
    # launcher, whose own aten calls reach _ReadsAsZero. wrap_triton disabled, as the ops'
    # CUDA kernels do, so the launch reaches JITFunction.run
    with (
        torch.no_grad(),
        set_wrap_triton_enabled(False),
        _captured_launches(trace),
        _ReadsAsZero(trace),
        kernels.triton_on_cpu(),
        _OpBoundary(trace, ops),
    ):
        fused(x)
    if not trace.launches:
        raise ReportError("the fused path launched no Triton kernel: nothing to report")
    return trace


# ---- compile: as the JIT would on the device --------------------------------------------


class _Pointer:
    """A stand-in for a tensor argument: its dtype and an address with the tensor's offset
    (a GPU allocation is 256-byte aligned; a view's offset may break the 16-byte hint)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.dtype = tensor.dtype
        self._ptr = (1 << 20) + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._ptr


@dataclass(frozen=True)
class Compiled:
    name: str
    num_warps: int
    shared: int
    cubin: bytes
    entry: str


def _jit_specialisation(launch: Launch, backend: Any) -> tuple[Any, ...]:
    """(options, signature, constexprs, attrs) as ``JITFunction.run`` derives them."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {
        k: _Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in launch.kwargs.items()
    }
    kwargs.setdefault("debug", bool(getattr(fn, "debug", False)))
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


_compiled: dict[str, Compiled] = {}


def compile_launch(launch: Launch, sm: int) -> Compiled:
    """The cubin the JIT would build for this launch on an sm_``sm`` GPU (cached per key)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    if not isinstance(launch.fn, triton.runtime.JITFunction):
        raise ReportError(f"{launch.name} is no plain @triton.jit kernel (autotuned?)")
    target = GPUTarget("cuda", sm, 32)
    try:
        options, signature, constexprs, attrs = _jit_specialisation(launch, make_backend(target))
        key = repr((launch.fn.cache_key, sm, signature, constexprs, attrs, options))
        if key not in _compiled:
            src = ASTSource(launch.fn, signature, constexprs, attrs)
            kernel = triton.compile(src, target=target, options=options.__dict__)
            md = kernel.metadata
            _compiled[key] = Compiled(
                launch.name, md.num_warps, int(md.shared), kernel.asm["cubin"], md.name
            )
    except (TypeError, KeyError, ValueError, AssertionError) as exc:
        raise ReportError(
            f"{launch.name} (launched by {launch.op or 'the lookup'}) does not compile with the "
            f"arguments its launcher passed: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:  # Triton's compile errors have no common base class
        raise ReportError(f"{launch.name} failed to compile for sm_{sm}: {exc}") from exc
    return _compiled[key]


# ---- the cubin: resources and SASS ------------------------------------------------------


def nvidia_tool(name: str) -> str:
    """A CUDA binary tool: the one the Triton wheel ships, else one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.is_file() else shutil.which(name)
    if not found:
        raise ReportError(f"no {name}: the Triton wheel ships it under backends/nvidia/bin")
    return found


def _run_tool(name: str, cubin: Path, *flags: str) -> str:
    done = subprocess.run(
        [nvidia_tool(name), *flags, str(cubin)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise ReportError(f"{name} {' '.join(flags)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


@dataclass(frozen=True)
class Resources:
    registers: int
    local_bytes: int  # LOCAL + STACK per thread
    static_shared: int


def resource_usage(cubin: Path, entry: str) -> Resources:
    text = _run_tool("cuobjdump", cubin, "-res-usage")
    match = re.search(rf"Function {re.escape(entry)}:\s*\n\s*(.*)", text)
    if match is None:
        raise ReportError(f"cuobjdump -res-usage lists no function {entry}:\n{text}")
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", match.group(1)))
    return Resources(
        registers=int(fields["REG"]),
        local_bytes=int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        static_shared=int(fields.get("SHARED", 0)),
    )


# ---- per-launch figures -----------------------------------------------------------------


def _kernel_env(launch: Launch) -> dict[str, Any]:
    """The launch's arguments by parameter name (ints and constexprs; tensors unknown),
    with the kernel module's globals under them."""
    env: dict[str, Any] = dict(launch.fn.fn.__globals__)
    names = [p.name for p in launch.fn.params]
    for name, value in [*zip(names, launch.args, strict=False), *launch.kwargs.items()]:
        env[name] = sass.UNKNOWN if isinstance(value, torch.Tensor) else value
    return env


def _kernel_ast(launch: Launch) -> tuple[str, ast.FunctionDef]:
    path = inspect.getsourcefile(launch.fn.fn)
    if path is None:
        raise ReportError(f"{launch.name}: no source file")
    line = launch.fn.fn.__code__.co_firstlineno
    function = next(
        (
            f
            for f in sass.functions_in(path)
            if f.name == launch.fn.fn.__name__ and f.lineno >= line
        ),
        None,
    )
    if function is None:
        raise ReportError(f"{launch.name}: its definition is not in {path}")
    return path, function


def floor_bytes(launch: Launch) -> int:
    """Bytes the launch must move: each tensor it is passed once, a gathered table only
    at its selected rows."""
    index_name, tables = GATHERED.get(launch.op or "", ("", {}))
    gathered: dict[int, int] = {}
    if index_name:
        try:
            index = launch.op_args[index_name]
            for name, per_index in tables.items():
                table = launch.op_args[name]
                if table is not None:
                    rows = min(table.numel(), index.numel() * per_index(table))
                    gathered[id(table)] = rows * table.element_size()
        except KeyError as exc:
            raise ReportError(
                f"op {launch.op} has no input {exc}: update GATHERED in kernel_report.py"
            ) from None
    seen: dict[int, int] = {}
    for value in [*launch.args, *launch.kwargs.values()]:
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen[id(value)] = gathered.get(id(value), value.numel() * value.element_size())
    return sum(seen.values())


def programs_per_sm(device: DeviceModel, registers: int, warps: int, shared: int) -> int:
    """How many programs an SM holds at once (registers, warps, shared memory)."""
    regs_per_warp = math.ceil(max(registers, 1) / 8) * 8 * 32  # allocated per warp, 256-unit
    by_regs = device.registers_per_sm // (regs_per_warp * warps)
    by_warps = device.max_warps_per_sm // warps
    by_shared = device.shared_per_sm // (shared + device.shared_reserved_per_program)
    resident = min(by_regs, by_warps, by_shared, device.max_programs_per_sm)
    if resident < 1:
        raise ReportError(f"{registers} registers x {warps} warps do not fit an SM")
    return resident


def issue_us(
    device: DeviceModel, programs: int, per_program: int, warps: int, resident: int
) -> float:
    """The busiest SM's issue time: its programs in waves of ``resident``."""
    on_sm = math.ceil(programs / device.sms)
    cycles = 0.0
    while on_sm > 0:
        wave = min(on_sm, resident)
        cycles += wave * per_program / min(device.schedulers_per_sm, wave * warps)
        on_sm -= wave
    return cycles / (device.clock_ghz * 1e3)


@dataclass(frozen=True)
class Analysis:
    registers: int
    spills: int
    shared_bytes: int
    static_shared: int
    num_warps: int
    sass_instructions: int
    per_warp: float  # rare helpers at their measured rate
    per_warp_upper: float  # every path taken
    loops: tuple[sass.LoopCount, ...]
    rare: tuple[tuple[str, int, float], ...]  # (helper, SASS instructions, rate)


def rare_helpers(launch: Launch) -> tuple[str, ...]:
    """The helpers the kernel's module names as called only on a rare branch."""
    return tuple(launch.fn.fn.__globals__.get("RARE_HELPERS", ()))


def analyse(
    launch: Launch, compiled: Compiled, cubin_dir: Path, rates: dict[str, float]
) -> Analysis:
    """Resources and the dynamic count of one compiled kernel for one launch's sizes."""
    cubin_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(compiled.cubin).hexdigest()[:12]
    cubin = cubin_dir / f"{compiled.entry}-{digest}.cubin"
    cubin.write_bytes(compiled.cubin)
    resources = resource_usage(cubin, compiled.entry)
    text = _run_tool("nvdisasm", cubin, "-gi", "-c")
    cubin.with_suffix(".sass").write_text(text)
    instructions, labels = sass.parse_sass(text)
    path, kernel = _kernel_ast(launch)
    loops = sass.sass_loops(instructions, labels)
    counts = sass.loop_trips(instructions, loops, _kernel_env(launch), path, kernel)
    missing = [h for h in rare_helpers(launch) if h not in rates]
    if missing:
        raise ReportError(f"{launch.name}: no measured rate for its rare helpers {missing}")
    declared = {h: rates[h] for h in rare_helpers(launch)}
    helpers = sass.helpers_of(instructions, path, set(declared))
    weights = [1.0 if h is None else declared[h] for h in helpers]
    executable = sass.counted(instructions, labels)
    rare = tuple(
        (helper, sum(1 for i in executable if helpers[i] == helper), rate)
        for helper, rate in declared.items()
    )
    return Analysis(
        registers=resources.registers,
        spills=resources.local_bytes // 4,
        shared_bytes=compiled.shared,
        static_shared=resources.static_shared,
        num_warps=compiled.num_warps,
        sass_instructions=len(executable),
        per_warp=sass.dynamic_instructions(instructions, labels, counts, weights),
        per_warp_upper=sass.dynamic_instructions(instructions, labels, counts),
        loops=tuple(counts),
        rare=rare,
    )


def row_of(launch: Launch, tokens: int, a: Analysis, device: DeviceModel) -> dict[str, Any]:
    programs = math.prod(launch.grid)
    per_program = round(a.per_warp * a.num_warps)
    upper = round(a.per_warp_upper * a.num_warps)
    shared = a.shared_bytes + a.static_shared
    resident = programs_per_sm(device, a.registers, a.num_warps, shared)
    floor = floor_bytes(launch) / (device.bandwidth_tbs * 1e6)
    issue = issue_us(device, programs, per_program, a.num_warps, resident)
    issue_upper = issue_us(device, programs, upper, a.num_warps, resident)
    return {
        "kernel": launch.name,
        "tokens": tokens,
        "programs": programs,
        "registers": a.registers,
        "spills": a.spills,
        "shared_bytes": a.shared_bytes,
        "sass_instructions": a.sass_instructions,
        "warp_instructions_per_program": per_program,
        "est_us": round(max(issue, floor) + LAUNCH_US, 3),
        "floor_us": round(floor, 4),
        "warp_instructions_upper": upper,
        "est_us_upper": round(max(issue_upper, floor) + LAUNCH_US, 3),
    }


# ---- the report -------------------------------------------------------------------------


@dataclass
class Report:
    device: DeviceModel
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[int]] = field(default_factory=dict)  # note -> token counts

    def totals(self) -> list[dict[str, Any]]:
        out = []
        for tokens in dict.fromkeys(r["tokens"] for r in self.rows):
            rows = [r for r in self.rows if r["tokens"] == tokens]
            out.append(
                {
                    "tokens": tokens,
                    "est_us": round(sum(r["est_us"] for r in rows), 3),
                    "floor_us": round(sum(r["floor_us"] for r in rows), 4),
                    "est_us_upper": round(sum(r["est_us_upper"] for r in rows), 3),
                    "launches": len(rows),
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"device_model": self.device.describe(), "rows": self.rows, "totals": self.totals()}


def _unique_names(launches: list[Launch]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for launch in launches:
        seen[launch.name] = seen.get(launch.name, 0) + 1
        names.append(
            launch.name if seen[launch.name] == 1 else f"{launch.name}#{seen[launch.name]}"
        )
    return names


def _notes(trace: Trace) -> list[str]:
    notes = []
    if trace.host_reads or trace.other_kernels:
        notes.append(
            f"the ops' launchers also read {len(trace.host_reads)} scalars back to the host "
            f"(synchronisations) and launch {len(trace.other_kernels)} other kernels "
            f"({', '.join(sorted(set(trace.other_kernels)))}): not in the estimate"
        )
    if trace.outside_kernels:
        notes.append(
            f"around the ops the fused path launches {len(trace.outside_kernels)} aten kernels "
            f"({', '.join(sorted(set(trace.outside_kernels)))}): not in the estimate"
        )
    return notes


def _rare_note(kernel: str, helper: str, size: int, rate: float, measured: dict[str, Any]) -> str:
    if size == 0:
        return (
            f"{kernel}: no SASS instruction is attributed to {helper}, a rare path (this "
            "Triton's line information names no inlined calls): every path counts as run"
        )
    return (
        f"{kernel}: {helper} ({size} SASS instructions, a rare path) counted at {rate:.2%}: "
        f"it ran in {measured['fallbacks']} of {measured['stages']} selection stages (all "
        f"stages pooled) on {measured['dtype']} inputs drawn as the bench's, "
        f"{measured['tokens']} tokens (scripts/branch_rates.py); `est_us_upper` counts "
        "every path"
    )


def build_report(
    config: str, sm: int, tokens: Sequence[int], dtype: torch.dtype | None, cubin_dir: Path
) -> Report:
    if sm not in DEVICES:
        raise ReportError(f"no device model for sm_{sm}; known: {sorted(DEVICES)}")
    bench = load_bench_lookup()
    if config not in bench.CONFIGS:
        raise ReportError(f"no config {config!r}; bench_lookup has {sorted(bench.CONFIGS)}")
    dtype = dtype or bench.CONFIGS[config].dtype
    fused = fused_path(bench, config, dtype)
    report = Report(DEVICES[sm])
    try:
        measured = _sibling("branch_rates").measure(config, RATE_TOKENS, dtype)
    except ValueError as exc:
        raise ReportError(f"scripts/branch_rates.py: {exc}") from None
    rates = {measured["helper"]: measured["rate"]}
    for count in tokens:
        trace = capture(fused, count, dtype)
        notes = _notes(trace)
        for launch, name in zip(trace.launches, _unique_names(trace.launches), strict=True):
            analysis = analyse(launch, compile_launch(launch, sm), cubin_dir, rates)
            row = row_of(launch, count, analysis, report.device)
            row["kernel"] = name
            report.rows.append(row)
            notes += [
                f"{name}: loop {c.source} runs {c.trips} times ({c.loop.size} SASS instructions)"
                for c in analysis.loops
            ]
            notes += [
                _rare_note(name, helper, size, rate, measured)
                for helper, size, rate in analysis.rare
            ]
        for note in notes:
            report.notes.setdefault(note, []).append(count)
    return report


def _ratio(est: float, floor: float) -> str:
    return f"{est / floor:.1f}×" if floor > 0 else "-"


def markdown(report: Report, command: str) -> str:
    head = (
        f"**Static estimate, not a measurement** ({report.device.describe()}; "
        f"{date.today().isoformat()}; `{command}`)\n\n"
    )
    cols = [
        ("kernel", "kernel"), ("tokens", "tokens"), ("programs", "programs"),
        ("registers", "regs"), ("spills", "spills"), ("shared_bytes", "smem B"),
        ("sass_instructions", "SASS instr"),
        ("warp_instructions_per_program", "warp-instr/program"),
        ("est_us", "est µs"), ("floor_us", "floor µs"),
    ]  # fmt: skip
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c[0]]) for c in cols) + " |" for r in report.rows]
    totals = [
        "",
        "| tokens | launches | est µs (whole lookup) | est µs (every path) | floor µs "
        "| est / floor |",
        "|---|---|---|---|---|---|",
    ]
    totals += [
        f"| {t['tokens']} | {t['launches']} | {t['est_us']} | {t['est_us_upper']} "
        f"| {t['floor_us']} | {_ratio(t['est_us'], t['floor_us'])} |"
        for t in report.totals()
    ]
    return head + "\n".join(lines + totals) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", help="a bench_lookup config (paper, tiny)")
    parser.add_argument("--sm", type=int, default=90, help="target architecture (90: H100)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the config's")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--cubin-dir", type=Path, help="keep each kernel's cubin and SASS")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    command = "python scripts/kernel_report.py " + " ".join(argv or sys.argv[1:])
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(_tempdir()))
        cubin_dir = args.cubin_dir or scratch / "cubins"
        # a cache of our own: a cached cubin's line info names the file it was first built
        # from, which may be another checkout's copy of the same source
        os.environ["TRITON_CACHE_DIR"] = str(scratch / "triton-cache")
        try:
            report = build_report(
                args.config, args.sm, tokens, DTYPES.get(args.dtype or ""), cubin_dir
            )
        except ReportError as exc:
            print(f"kernel_report: {exc}", file=sys.stderr)
            return 1
    print(markdown(report, command))
    for note, counts in report.notes.items():
        print(f"- at {', '.join(map(str, counts))} tokens: {note}")
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kernel_report.") as path:
        yield path


if __name__ == "__main__":
    sys.exit(main())
