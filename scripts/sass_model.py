"""From a kernel's SASS and its Triton source: loops, trip counts, instructions per program.

Used by ``scripts/kernel_report.py``; no GPU, no Triton needed (the SASS comes from
``nvdisasm -gi``, the source from the files its line information names).

Loops are the backward branches of the SASS. Each is attributed, through the line (and,
from Triton 3.9 on, inlining) information Triton puts in the cubin, to a ``for ... in
range(...)`` / ``tl.range(...)`` of the kernel's source: the innermost one whose body holds
at least half of the SASS loop's own instructions (those in no loop nested in it, and
placed in the kernel's own files: Triton 3.6 places a reduction's in ``triton/language``
alone), never one a loop nested in it took. Its trip count is that ``range``'s bounds,
evaluated with the launch's arguments and constexprs: a helper's parameters are mapped
through its call sites (the inline chain where the line info has one, else every call
path from the kernel, in source order), simple local assignments followed,
``tl.program_id`` taken as 0. Copies of a loop (two call sites, a ``tl.static_range``
around the call) pair with the SASS loops in address order; one copy compiled into a main
loop unrolled u times and a remainder runs trips // u and trips % u times. A loop that
cannot be attributed, or whose bounds the launch does not fix, raises ``ReportError`` with
its place: never a guess.

The dynamic count of one warp: each executable instruction (NOP padding and the closing
self-branch left out) once per iteration of every loop around it; code outside loops
once, both sides of a runtime branch included (an upper bound), except code inlined from a
helper the kernel's module names in ``RARE_HELPERS`` (called only on a rarely taken
branch): that counts at the rate the caller measured for it (``helpers_of``).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import triton


class ReportError(RuntimeError):
    """The report cannot be made without guessing; the message says what and where."""


Location = tuple[str, int]  # (file, line)


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str
    chain: tuple[Location, ...]  # innermost source location first, then its call sites

    @property
    def opcode(self) -> str:
        words = [w for w in self.text.split() if not w.startswith("@")]
        return words[0] if words else ""


@dataclass(frozen=True)
class SassLoop:
    head: int  # index of the first instruction of the body (the branch target)
    branch: int  # index of the backward branch

    def contains(self, index: int) -> bool:
        return self.head <= index <= self.branch

    @property
    def size(self) -> int:
        return self.branch - self.head + 1


_LOC = re.compile(r'File "([^"]+)", line (\d+)')
_INST = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions (with their inline chains) and each label's instruction index."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    chain: list[Location] = []
    fresh = False  # the next //## line starts a new chain
    for line in text.splitlines():
        if line.lstrip().startswith("//##"):
            if fresh:
                chain, fresh = [], False
            found = _LOC.findall(line)
            if found:  # 'line A inlined at ..., line B': A is this level, B its call site
                chain.append((found[0][0], int(found[0][1])))
            continue
        if (label := _LABEL.match(line)) is not None:
            labels[label.group(1)] = len(instructions)
            continue
        if (inst := _INST.search(line)) is not None:
            instructions.append(Instruction(int(inst.group(1), 16), inst.group(2), tuple(chain)))
            fresh = True
    return instructions, labels


def sass_loops(instructions: list[Instruction], labels: dict[str, int]) -> list[SassLoop]:
    """Backward branches: each closes a loop from its target to itself."""
    loops = []
    for index, inst in enumerate(instructions):
        if not inst.opcode.startswith("BRA"):
            continue
        target = _TARGET.search(inst.text)
        if target is None or target.group(1) not in labels:
            continue
        head = labels[target.group(1)]
        if head <= index and not _is_self_branch(inst, index, labels):
            loops.append(SassLoop(head, index))
    return loops


def counted(instructions: list[Instruction], labels: dict[str, int]) -> list[int]:
    """Indices of the instructions a program can execute: NOP padding and the self-branch
    that closes every kernel (after its last EXIT, never reached) left out."""
    return [
        i
        for i, inst in enumerate(instructions)
        if inst.opcode != "NOP" and not _is_self_branch(inst, i, labels)
    ]


def _is_self_branch(inst: Instruction, index: int, labels: dict[str, int]) -> bool:
    target = _TARGET.search(inst.text) if inst.opcode.startswith("BRA") else None
    return target is not None and "@" not in inst.text and labels.get(target.group(1)) == index


# ---- loops in the source and their trip counts ------------------------------------------


@dataclass(frozen=True)
class SourceLoop:
    file: str
    line: int
    end_line: int
    node: ast.For
    function: ast.FunctionDef
    outer: tuple[Location, ...]  # the call sites that inlined the function


@cache
def _module_ast(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text(), filename=path)


def functions_in(path: str) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(_module_ast(path)) if isinstance(n, ast.FunctionDef)]


@cache
def _function_at(path: str, line: int) -> ast.FunctionDef | None:
    spans = [f for f in functions_in(path) if f.lineno <= line <= (f.end_lineno or f.lineno)]
    return min(spans, key=lambda f: (f.end_lineno or 0) - f.lineno, default=None)


def _is_runtime_range(node: ast.For) -> bool:
    """``range(...)`` / ``tl.range(...)``: a loop in the compiled code (static_range unrolls)."""
    call = node.iter
    if not isinstance(call, ast.Call):
        return False
    callee = call.func
    name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
    return name == "range"


@cache
def _user_file(path: str) -> bool:
    return Path(path).is_file() and Path(triton.__file__).parent not in Path(path).parents


@cache
def _loops_at(path: str, line: int) -> tuple[ast.FunctionDef | None, tuple[ast.For, ...]]:
    """The function holding a source line and the runtime ``for`` loops whose body holds it
    (the body's lines only: the header's code, bounds and counter, runs around it)."""
    if not _user_file(path):
        return None, ()
    function = _function_at(path, line)
    if function is None:
        return None, ()
    loops = tuple(
        node
        for node in ast.walk(function)
        if isinstance(node, ast.For)
        and _is_runtime_range(node)
        and node.body[0].lineno <= line <= (node.end_lineno or node.lineno)
    )
    return function, loops


@cache
def _source_loops_of(chain: tuple[Location, ...]) -> tuple[SourceLoop, ...]:
    """Every runtime ``for`` around a source location, at every level of its inline chain."""
    found = []
    for level, (path, line) in enumerate(chain):
        function, loops = _loops_at(path, line)
        for node in loops:
            assert function is not None
            end = node.end_lineno or node.lineno
            found.append(SourceLoop(path, node.lineno, end, node, function, chain[level + 1 :]))
    return tuple(found)


def _inner_first(loop: SourceLoop) -> tuple[int, int]:
    # deeper inlining is further in; in one function a later-starting loop is further in
    return (-len(loop.outer), -loop.line)


def attribute(
    instructions: list[Instruction],
    loop: SassLoop,
    nested: list[SassLoop],
    taken: set[tuple[Any, ...]],
) -> SourceLoop | None:
    """The source loop a SASS loop compiles: the innermost one whose body holds at least
    half of the SASS loop's own instructions (those in no loop nested in it, and placed in
    the kernel's source: Triton 3.6 places a reduction's in triton/language alone) and that
    no nested loop took; else the free one holding most of them."""
    own = [
        i
        for i in range(loop.head, loop.branch + 1)
        if not any(inner.contains(i) for inner in nested)
        and any(_user_file(path) for path, _ in instructions[i].chain)
    ]
    votes: dict[tuple[Any, ...], tuple[SourceLoop, int]] = {}
    for index in own:
        for source in _source_loops_of(instructions[index].chain):
            count = votes.get(_key(source), (source, 0))[1]
            votes[_key(source)] = (source, count + 1)
    free = [(s, n) for k, (s, n) in votes.items() if k not in taken]
    for source, n in sorted(free, key=lambda sn: _inner_first(sn[0])):
        if n >= len(own) / 2:
            return source
    # most votes; of equals, the innermost (an enclosing loop holds all its inner one's)
    most = max(free, key=lambda sn: (sn[1], _inner_first(sn[0])), default=None)
    return most[0] if most else None


def _key(source: SourceLoop) -> tuple[Any, ...]:
    return (source.file, source.line, source.outer)


class _Unknown(Exception):
    """Raised for a value the launch does not fix; the class itself marks one in an env."""


UNKNOWN = _Unknown  # the value of a name the launch does not fix (a tensor, a loop variable)


_MATH: dict[str, Callable[..., int]] = {
    "cdiv": lambda a, b: -(-a // b),
    "min": min,
    "max": max,
    "minimum": min,
    "maximum": max,
    "int": int,
    "next_power_of_2": lambda a: 1 << max(0, int(a) - 1).bit_length(),
}
_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.LShift: lambda a, b: a << b,
    ast.RShift: lambda a, b: a >> b,
}


def evaluate(node: ast.expr, env: dict[str, Any]) -> Any:
    """An integer expression of a kernel's source over known values; _Unknown otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        value = env.get(node.id, _Unknown)
        if value is _Unknown:
            raise _Unknown(node.id)
        return getattr(value, "value", value)  # a tl.constexpr global holds .value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](evaluate(node.left, env), evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -evaluate(node.operand, env)
    if isinstance(node, ast.Call):
        return _evaluate_call(node, env)
    raise _Unknown(ast.unparse(node))


def _evaluate_call(node: ast.Call, env: dict[str, Any]) -> Any:
    callee = node.func
    name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
    if name in ("program_id",):
        return 0  # the first program: a loop split over programs is as long there as anywhere
    if name == "to" and isinstance(callee, ast.Attribute):
        return evaluate(callee.value, env)  # a cast leaves an integer's value
    if name in _MATH:
        return _MATH[name](*(evaluate(a, env) for a in node.args))
    raise _Unknown(ast.unparse(node))


def _assign(env: dict[str, Any], target: ast.expr, value: Any) -> None:
    if isinstance(target, ast.Name):
        env[target.id] = value
    elif isinstance(target, ast.Tuple):
        for t in target.elts:
            _assign(env, t, _Unknown)


def _locals_before(function: ast.FunctionDef, line: int, env: dict[str, Any]) -> dict[str, Any]:
    """``env`` with the function's simple assignments before ``line``; names assigned in a
    loop around ``line`` (and that loop's variable) unknown."""
    env = dict(env)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and node.lineno < line:
            try:
                value = evaluate(node.value, env)
            except (_Unknown, TypeError, ZeroDivisionError):
                value = _Unknown
            for target in node.targets:
                _assign(env, target, value)
        if isinstance(node, ast.For) and node.lineno < line <= (node.end_lineno or 0):
            _assign(env, node.target, _Unknown)
    return env


def _callee_env(
    caller: ast.FunctionDef, call_line: int, callee: ast.FunctionDef, env: dict[str, Any]
) -> dict[str, Any]:
    """The callee's parameters from the call at ``call_line`` in ``caller``."""
    calls = [
        n
        for n in ast.walk(caller)
        if isinstance(n, ast.Call)
        and getattr(n.func, "id", getattr(n.func, "attr", None)) == callee.name
        and n.lineno <= call_line <= (n.end_lineno or n.lineno)
    ]
    if not calls:
        raise _Unknown(f"no call of {callee.name} at line {call_line}")
    call, scope = calls[0], _locals_before(caller, call_line, env)
    params = [a.arg for a in callee.args.args]
    defaults = callee.args.defaults
    out: dict[str, Any] = {k: v for k, v in env.items() if k not in params}
    for name, default in zip(params[len(params) - len(defaults) :], defaults, strict=True):
        out[name] = _try(default, scope)
    for name, arg in zip(params, call.args, strict=False):
        out[name] = _try(arg, scope)
    for keyword in call.keywords:
        if keyword.arg:
            out[keyword.arg] = _try(keyword.value, scope)
    return out


def _try(node: ast.expr, env: dict[str, Any]) -> Any:
    try:
        return evaluate(node, env)
    except (_Unknown, TypeError, ZeroDivisionError):
        return _Unknown


def _same(a: ast.FunctionDef | None, b: ast.FunctionDef) -> bool:
    return a is not None and (a.name, a.lineno) == (b.name, b.lineno)


def call_paths(
    kernel_file: str, kernel: ast.FunctionDef, target: SourceLoop
) -> list[tuple[Location, ...]]:
    """Every chain of call sites from the kernel to the loop's function, innermost call
    first (as an inline chain lists them), in source order. For line info without inlining
    (Triton 3.6): a helper's loop then names no call site."""
    helpers = {f.name: f for f in _module_ast(kernel_file).body if isinstance(f, ast.FunctionDef)}
    paths: list[tuple[Location, ...]] = []

    def walk(function: ast.FunctionDef, chain: tuple[Location, ...]) -> None:
        if kernel_file == target.file and _same(function, target.function):
            paths.append(chain)
            return
        calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
        for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset)):
            callee = helpers.get(getattr(call.func, "id", ""))
            if callee is not None and callee is not function and len(chain) < 16:
                walk(callee, ((kernel_file, call.lineno), *chain))

    walk(kernel, ())
    return paths


def _static_copies(function: ast.FunctionDef, line: int, env: dict[str, Any], where: str) -> int:
    """How many copies of ``line`` the ``tl.static_range`` loops around it unroll into."""
    scope, copies = _locals_before(function, line, env), 1
    for node in ast.walk(function):
        if (
            isinstance(node, ast.For)
            and isinstance(node.iter, ast.Call)
            and getattr(node.iter.func, "attr", "") == "static_range"
            and node.body[0].lineno <= line <= (node.end_lineno or node.lineno)
        ):
            copies *= _range_trips(node, scope, where)
    return copies


def _range_trips(node: ast.For, scope: dict[str, Any], where: str) -> int:
    call = node.iter
    assert isinstance(call, ast.Call)
    try:
        bounds = [int(evaluate(a, scope)) for a in call.args[:3]]
    except (_Unknown, TypeError) as exc:
        raise ReportError(
            f"loop {where} (`{ast.unparse(call)}`): its bounds depend on {exc}, which the "
            "launch does not fix; write the loop over sizes the launch passes"
        ) from None
    start, stop, step = {1: [0, *bounds, 1], 2: [*bounds, 1], 3: bounds}[len(bounds)]
    return max(0, math.ceil((stop - start) / step))


def _follow(
    source: SourceLoop,
    path: tuple[Location, ...],
    kernel_env: dict[str, Any],
    kernel: ast.FunctionDef,
) -> tuple[dict[str, Any], int]:
    """The values in the loop's function along one call path (outermost call first, each
    mapping a caller's values onto the callee's parameters), and how many copies of the
    loop the static_range loops on the way unroll into."""
    where = _where(source)
    root = path[-1] if path else (source.file, source.line)
    if not _same(_function_at(*root), kernel):
        raise ReportError(f"loop {where}: its outermost call site {root} is not in the kernel")
    env, caller, copies = kernel_env, kernel, 1
    sites = list(reversed(path))
    for index, (file, line) in enumerate(sites):
        nxt = sites[index + 1] if index + 1 < len(sites) else (source.file, source.line)
        callee = _function_at(*nxt)
        if callee is None or not _user_file(file):
            raise ReportError(f"loop {where}: cannot follow its call site {file}:{line}")
        copies *= _static_copies(caller, line, env, where)
        try:
            env = _callee_env(caller, line, callee, env)
        except _Unknown as exc:
            raise ReportError(f"loop {where}: {exc}") from None
        caller = callee
    return env, copies * _static_copies(source.function, source.line, env, where)


def expected_trips(
    source: SourceLoop, kernel_file: str, kernel: ast.FunctionDef, kernel_env: dict[str, Any]
) -> list[int]:
    """The trip count of every copy of the source loop the SASS should hold, in source
    order: one per call path (and per static_range unrolling on the way)."""
    root = _function_at(*source.outer[-1]) if source.outer else source.function
    complete = _same(root, kernel)
    paths = [source.outer] if complete else call_paths(kernel_file, kernel, source)
    if not paths:
        raise ReportError(f"loop {_where(source)} is not reached from {kernel.name}")
    trips = []
    for path in paths:
        env, copies = _follow(source, path, kernel_env, kernel)
        scope = _locals_before(source.function, source.line, env)
        trips += [_range_trips(source.node, scope, _where(source))] * copies
    return trips


# ---- dynamic count ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoopCount:
    loop: SassLoop
    source: str  # file:line of the source loop
    trips: int


def loop_trips(
    instructions: list[Instruction],
    loops: list[SassLoop],
    kernel_env: dict[str, Any],
    kernel_file: str,
    kernel: ast.FunctionDef,
) -> list[LoopCount]:
    """Each SASS loop with the trip count of its source loop (see the module docstring),
    inner loops first so that an outer one cannot claim their source loop."""
    by_source: dict[tuple[Any, ...], list[SassLoop]] = {}
    sources: dict[tuple[Any, ...], SourceLoop] = {}
    done: list[tuple[SassLoop, tuple[Any, ...]]] = []
    for loop in sorted(loops, key=lambda lp: lp.size):
        inner = [(lp, k) for lp, k in done if loop.contains(lp.head)]
        source = attribute(instructions, loop, [lp for lp, _ in inner], {k for _, k in inner})
        if source is None:
            branch = instructions[loop.branch]
            lines = sorted(
                {i.chain[0][1] for i in instructions[loop.head : loop.branch + 1] if i.chain}
            )
            raise ReportError(
                f"a loop of the SASS ({loop.size} instructions, branch at 0x{branch.address:04x}, "
                f"source lines {lines[:10]}) is no `for ... in range` of the kernel's source: "
                "extend kernel_report's loop model"
            )
        by_source.setdefault(_key(source), []).append(loop)
        sources[_key(source)] = source
        done.append((loop, _key(source)))
    counts = []
    for key, group in by_source.items():
        source = sources[key]
        trips = expected_trips(source, kernel_file, kernel, kernel_env)
        counts += _assign_trips(sorted(group, key=lambda lp: lp.head), trips, _where(source))
    return counts


def _where(source: SourceLoop) -> str:
    calls = "".join(f" (from line {line})" for _, line in source.outer)
    return f"{Path(source.file).name}:{source.line}{calls}"


def _assign_trips(group: list[SassLoop], trips: list[int], where: str) -> list[LoopCount]:
    """The SASS loops of one source loop, in address order, to its expected copies, in
    source order. One copy in two SASS loops is a main loop unrolled u times plus a
    remainder loop: the main runs trips // u times, the remainder trips % u."""
    if len(group) == len(trips):
        return [LoopCount(lp, where, t) for lp, t in zip(group, trips, strict=True)]
    nested = any(a is not b and a.contains(b.head) for a in group for b in group)
    if len(trips) != 1 or len(group) != 2 or nested:
        raise ReportError(
            f"loop {where} should compile into {len(trips)} SASS loop(s) but compiled into "
            f"{len(group)}{' nested in each other' if nested else ''}: no trip count without "
            "a guess"
        )
    main, rest = sorted(group, key=lambda g: -g.size)
    unroll = max(1, round(main.size / rest.size))
    return [LoopCount(main, where, trips[0] // unroll), LoopCount(rest, where, trips[0] % unroll)]


def helpers_of(
    instructions: list[Instruction], kernel_file: str, names: set[str]
) -> list[str | None]:
    """Per instruction, the helper among ``names`` (functions of ``kernel_file``) its code
    was inlined from, else None."""
    found: list[str | None] = []
    for inst in instructions:
        helper = None
        for path, line in inst.chain:
            function = _function_at(path, line) if path == kernel_file else None
            if function is not None and function.name in names:
                helper = function.name
                break
        found.append(helper)
    return found


def dynamic_instructions(
    instructions: list[Instruction],
    labels: dict[str, int],
    counts: list[LoopCount],
    weights: list[float] | None = None,
) -> float:
    """Σ over executable instructions of the product of the trip counts of the loops
    around each (times its ``weights`` entry, when given): one warp's instruction count for
    one program."""
    total = 0.0
    for index in counted(instructions, labels):
        times = 1.0 if weights is None else weights[index]
        for c in counts:
            if c.loop.contains(index):
                times *= c.trips
        total += times
    return total
