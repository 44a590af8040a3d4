"""A ``.pt2`` whose graph names a file-touching or side-effect operator is refused before
anything runs, and an archive that inflates far past its size (a zip bomb) is refused
before it is inflated.

The operators are checked against what their schemas say they take (a path, a message, a
Python object), and fuzzed over every ATen operator with a string argument; the bombs are
real deflate streams of hundreds of megabytes of zeros in an otherwise valid archive. A
symbolic size that would make sympy compute an enormous number (``9**9**99999``) is
refused before torch parses it, while what real exports with dynamic shapes write loads.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from ultramem.compiler import safe_pt2
from ultramem.compiler.safe_pt2 import (
    CorruptArchive,
    OversizedArchive,
    UnsafeArchive,
    load_untrusted_pt2,
)
from ultramem.tests.compiler.test_safe_pt2 import Small, _first_call, _program, _rewrite

MB = 1 << 20
WEIGHT = "small/data/weights/weight_0"  # the Linear's 4x4 float32 weight: 64 bytes
INPUT = torch.randn(3, 5, 4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = torch.export.export(Small().eval(), (INPUT,), dynamic_shapes=({0: Dim("b")},))
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and refuses) any call to ``torch.export.load``: a refusal must come first."""
    calls: list[str] = []

    def load(path: str, *_: Any, **__: Any) -> Any:
        calls.append(path)
        raise AssertionError("torch.export.load ran on a hostile archive")

    monkeypatch.setattr(torch.export, "load", load)
    return calls


# ---- operators ---------------------------------------------------------------------------


def _arg(name: str, value: Any) -> dict[str, Any]:
    kind = {bool: "as_bool", int: "as_int", str: "as_string"}[type(value)]
    return {"name": name, "arg": {kind: value}, "kind": 1}


def _call(target: str, *inputs: dict[str, Any]) -> Callable[[dict], None]:
    """Make the graph's first ATen call ``target(*inputs)``, keeping its output name."""

    def mutate(program: dict) -> None:
        node = _first_call(program)
        node["target"], node["inputs"] = target, list(inputs)

    return mutate


def _from_file(path: Path, shared: bool, size: int = 16) -> Callable[[dict], None]:
    return _call(
        "torch.ops.aten.from_file.default",
        _arg("filename", str(path)),
        _arg("shared", shared),
        _arg("size", size),
    )


def _wrapping(hop: str, inner: str, path: Path) -> Callable[[dict], None]:
    """A higher-order call whose operator argument is ``inner`` (as with_effects writes)."""
    return _call(
        f"torch.ops.higher_order.{hop}",
        {"name": "", "arg": {"as_operator": inner}, "kind": 1},
        _arg("filename", str(path)),
    )


def _hostile_graphs(victim: Path) -> dict[str, tuple[Callable[[dict], None], str]]:
    """Each graph and the operator its refusal must name."""
    from_file = "torch.ops.aten.from_file.default"
    return {
        "from_file shared creates or grows": (_from_file(victim, True, 1 << 20), from_file),
        "from_file reads": (_from_file(victim, False), from_file),
        "from_file.out": (
            _call("torch.ops.aten.from_file.out", _arg("filename", str(victim))),
            "torch.ops.aten.from_file.out",
        ),
        "aten.save": (
            _call("torch.ops.aten.save.default", _arg("filename", str(victim))),
            "torch.ops.aten.save.default",
        ),
        "aten._print": (
            _call("torch.ops.aten._print.default", _arg("s", "hello")),
            "torch.ops.aten._print.default",
        ),
        "higher_order.print": (
            _call("torch.ops.higher_order.print", _arg("format_str", "hi")),
            "torch.ops.higher_order.print",
        ),
        "debugprims.load_tensor": (
            _call("torch.ops.debugprims.load_tensor.default", _arg("name", "x")),
            "torch.ops.debugprims.load_tensor.default",
        ),
        "with_effects around from_file": (
            _wrapping("with_effects", from_file, victim),
            "torch.ops.higher_order.with_effects",
        ),
        "auto_functionalized of from_file": (
            _wrapping("auto_functionalized", from_file, victim),
            from_file,
        ),
    }


HOSTILE = list(_hostile_graphs(Path("/unused")))


def test_plain_torch_creates_the_file_from_file_names(saved: Path, tmp_path: Path) -> None:
    victim = tmp_path / "created"
    path = _rewrite(saved, tmp_path / "evil.pt2", _program(_from_file(victim, True, 1 << 20)))
    with pytest.raises(RuntimeError):  # the program fails on the tensor's shape, too late
        torch.export.load(str(path)).module()(INPUT)
    assert victim.stat().st_size == 4 << 20  # 1 Mi float32 elements, zeroed


@pytest.mark.parametrize("graph", HOSTILE)
def test_a_graph_calling_an_impure_operator_is_refused_before_load(
    saved: Path, tmp_path: Path, no_torch_load: list[str], graph: str
) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"secret")
    mutate, target = _hostile_graphs(victim)[graph]
    path = _rewrite(saved, tmp_path / "evil.pt2", _program(mutate))
    with pytest.raises(UnsafeArchive) as info:
        load_untrusted_pt2(path)
    message = str(info.value)
    assert f"{target!r} is not a pure tensor operator (" in message, message
    assert "\n" not in message and not no_torch_load
    assert victim.read_bytes() == b"secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2", "victim.bin"]


def test_the_from_file_refusal_says_what_and_why(saved: Path, tmp_path: Path) -> None:
    victim = tmp_path / "created"
    path = _rewrite(saved, tmp_path / "evil.pt2", _program(_from_file(victim, True)))
    with pytest.raises(UnsafeArchive) as info:
        load_untrusted_pt2(path)
    assert str(info.value) == (
        "node target 'torch.ops.aten.from_file.default' is not a pure tensor operator "
        "(it reads or writes files)"
    )
    assert not victim.exists()


# Written from the ATen docs, independently of the loader's list: string arguments whose
# values are a fixed set of choices (or einsum's index notation), never a path or a message
CHOICES = {
    "reduce": "sum prod mean amax amin add multiply",
    "rounding_mode": "trunc floor",
    "approximate": "none tanh",
    "mode": "constant reflect replicate circular nearest bilinear reduced complete r",
    "side": "left right",
    "interpolation": "linear lower higher midpoint nearest",
    "norm": "forward backward ortho",
    "driver": "gesvd gesvdj gesvda gels gelsy gelsd gelss",
    "UPLO": "L U",
    "ord": "fro nuc",
    "p": "fro nuc",
    "padding": "same valid",
    "equation": "einsum subscripts",
    "indexing": "ij xy",
    "padding_side": "left right",
    "pad_mode": "reflect constant",
    "activation": "relu silu",
    "algorithm": "cutlass",
    "assert_msg": "the message of the error an assertion raises",
    "api_name": "the name in the error a linalg check raises",
}
RAISE_ONLY = {"_assert_async", "_assert_scalar", "_functional_assert_async"}
RAISE_ONLY |= {"_functional_assert_scalar", "_linalg_check_errors"}


def _string_arguments(kind: Any, name: str) -> Iterator[str]:
    if kind.kind() == "StringType":
        yield name
    for contained in kind.containedTypes():
        yield from _string_arguments(contained, name)


def _free_text_operators() -> list[str]:
    """Every ATen/prims overload with a string argument that is not one of ``CHOICES``."""
    found = []
    for schema in torch._C._jit_get_all_schemas():
        namespace, name = schema.name.split("::")
        if namespace not in ("aten", "prims"):
            continue
        strings = {s for a in schema.arguments for s in _string_arguments(a.type, a.name)}
        allowed = set(CHOICES) if name in RAISE_ONLY else set(CHOICES) - {"assert_msg"}
        if strings - allowed:
            overload = schema.overload_name or "default"
            found.append(f"torch.ops.{namespace}.{name}.{overload}")
    return sorted(set(found))


def _fuzz_refuses(saved: Path, tmp_path: Path, targets: list[str]) -> dict[str, str]:
    """The refusal of each target, through a real archive whose string arguments name a
    file in ``tmp_path``; fails on any target that is let through."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"secret")
    reasons = {}
    for i, target in enumerate(targets):
        mutate = _call(target, _arg("filename", str(victim)), _arg("s", "victim.bin"))
        path = _rewrite(saved, tmp_path / f"fuzz{i}.pt2", _program(mutate))
        try:
            load_untrusted_pt2(path)
        except UnsafeArchive as exc:
            reasons[target] = str(exc)
        else:
            raise AssertionError(f"{target} was let through")
        path.unlink()
    assert victim.read_bytes() == b"secret"
    assert [p.name for p in tmp_path.iterdir()] == ["victim.bin"]
    return reasons


def test_fuzz_every_operator_taking_free_text_is_refused(
    saved: Path, tmp_path: Path, no_torch_load: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path in an argument would land here
    targets = _free_text_operators()
    assert len(targets) > 80 and "torch.ops.aten.from_file.default" in targets
    reasons = _fuzz_refuses(saved, tmp_path, targets)
    for target, reason in reasons.items():
        assert reason.startswith(f"node target {target!r} is not"), reason
        assert "\n" not in reason
    assert not no_torch_load


def _denied_names(seed: int, count: int) -> list[str]:
    """Operators from every other namespace, Python callables, and malformed names."""
    rng = random.Random(seed)
    foreign = sorted(
        {
            f"torch.ops.{s.name.replace('::', '.')}.{s.overload_name or 'default'}"
            for s in torch._C._jit_get_all_schemas()
            if s.name.split("::")[0] not in ("aten", "prims")
        }
    )
    python = [
        "torch.load", "torch.save", "torch.from_file", "torch.ops.load_library",
        "torch._C._set_grad_enabled", "builtins.eval", "builtins.open", "os.system",
        "_operator.attrgetter", "_operator.methodcaller", "math.__loader__",
        "torch.ops.aten.from_file", "torch.ops.aten.from_file.default.__call__",
        "torch.ops.aten.__class__.__init__", "torch.ops.higher_order.__class__",
        "torch.ops.higher_order.flat_apply", "torch.ops.higher_order.inline_asm_elementwise",
        "torch.ops.higher_order.executorch_call_delegate", "torch.ops.higher_order.nope",
        "#custom.op", "", "torch..ops.aten.add.Tensor",
    ]  # fmt: skip
    garbage = [
        "torch.ops.aten." + "".join(rng.choice("abcdefg_.") for _ in range(rng.randint(1, 12)))
        for _ in range(10)
    ]
    return rng.sample(foreign, count) + python + garbage


def test_fuzz_operators_outside_the_allow_list_are_refused(
    saved: Path, tmp_path: Path, no_torch_load: list[str]
) -> None:
    reasons = _fuzz_refuses(saved, tmp_path, _denied_names(seed=27, count=40))
    assert all("\n" not in r for r in reasons.values()) and not no_torch_load


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.aten.gelu.default",
        "torch.ops.aten.div.Tensor_mode",
        "torch.ops.aten.scatter_reduce.two",
        "torch.ops.aten.einsum.default",
        "torch.ops.aten.conv2d.padding",
        "torch.ops.aten.searchsorted.Tensor",
        "torch.ops.aten.linalg_svd.default",
        "torch.ops.aten._assert_scalar.default",
        "torch.ops.aten._assert_tensor_metadata.default",
        "torch.ops.aten.sym_constrain_range_for_size.default",
        "torch.ops.aten.__and__.Tensor",
        "torch.ops.higher_order.cond",
        "torch.ops.higher_order.while_loop",
        "torch.ops.higher_order.wrap_with_set_grad_enabled",
    ],
)
def test_operators_torch_export_writes_are_pure(target: str) -> None:
    safe_pt2.operators.check_operator(target, "node target")  # raises UnsafeArchive if not


# ---- sizes -------------------------------------------------------------------------------


def _replace_member(
    src: Path,
    dst: Path,
    member: str,
    megabytes: int,
    declared: int | None = None,
    crc: int | None = None,
) -> Path:
    """``src`` with ``member`` replaced by ``megabytes`` of zeros, deflated as they are
    written; ``declared``/``crc`` make the central directory lie about the result."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info.filename))
                continue
            bomb = zipfile.ZipInfo(member, info.date_time)
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(bomb, "w") as out:
                for _ in range(megabytes):
                    out.write(bytes(MB))
            bomb.file_size = bomb.file_size if declared is None else declared
            bomb.CRC = bomb.CRC if crc is None else crc
    return dst


def _peak_bytes(action: Callable[[], Any]) -> tuple[int, BaseException | None]:
    """The most Python (and zlib) memory held while ``action`` ran, and what it raised."""
    tracemalloc.start()
    try:
        action()
        error = None
    except Exception as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


def test_a_zip_bomb_is_refused_from_its_declared_sizes(saved: Path, tmp_path: Path) -> None:
    bomb = _replace_member(saved, tmp_path / "bomb.pt2", WEIGHT, 128)
    assert bomb.stat().st_size < MB
    peak, error = _peak_bytes(lambda: load_untrusted_pt2(bomb))
    with zipfile.ZipFile(bomb) as archive:
        declared = sum(i.file_size for i in archive.infolist())
    assert isinstance(error, OversizedArchive), error
    assert f"inflates to {declared} bytes from {bomb.stat().st_size}" in str(error)
    assert "\n" not in str(error) and peak < 8 * MB


def test_a_member_that_lies_about_its_size_inflates_no_further(
    saved: Path, tmp_path: Path, no_torch_load: list[str]
) -> None:
    # declares its real weight size, holds 64 MB: the CRC of all of it cannot match
    liar = _replace_member(saved, tmp_path / "liar.pt2", WEIGHT, 64, declared=64)
    peak, error = _peak_bytes(lambda: load_untrusted_pt2(liar))
    assert isinstance(error, CorruptArchive) and "CRC" in str(error), error
    assert peak < 16 * MB and not no_torch_load


def test_a_lying_member_with_a_matching_crc_is_read_to_its_declared_size(
    saved: Path, tmp_path: Path
) -> None:
    liar = _replace_member(
        saved, tmp_path / "liar.pt2", WEIGHT, 128, declared=64, crc=zlib.crc32(bytes(64))
    )
    program: list[Any] = []
    peak, error = _peak_bytes(lambda: program.append(load_untrusted_pt2(liar)))
    assert error is None and peak < 16 * MB, (error, peak)
    weight = program[0].state_dict["linear.weight"]
    torch.testing.assert_close(weight, torch.zeros(4, 4))  # the 64 declared bytes, no more


def test_a_recompressed_archive_still_loads(saved: Path, tmp_path: Path) -> None:
    path = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info in zin.infolist():
            z.writestr(info.filename, zin.read(info.filename))
    expected = torch.export.load(str(saved)).module()(INPUT)
    torch.testing.assert_close(load_untrusted_pt2(path).module()(INPUT), expected)


def test_json_is_parsed_only_below_a_bound(
    saved: Path, monkeypatch: pytest.MonkeyPatch, no_torch_load: list[str]
) -> None:
    with zipfile.ZipFile(saved) as archive:
        size = archive.getinfo("small/models/model.json").file_size
    monkeypatch.setattr(safe_pt2.archive, "MAX_JSON_BYTES", size - 1)
    with pytest.raises(OversizedArchive, match=f"inflates to {size} bytes"):
        load_untrusted_pt2(saved)
    assert not no_torch_load


def test_an_archive_larger_than_the_room_to_copy_it_is_refused(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = safe_pt2.shutil.disk_usage
    monkeypatch.setattr(safe_pt2.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OversizedArchive, match="more than the 1000 bytes free"):
        load_untrusted_pt2(saved)


@pytest.mark.parametrize("attack", ["bzip2 member", "duplicate member"])
def test_members_torch_export_save_never_writes_are_refused(
    saved: Path, tmp_path: Path, attack: str
) -> None:
    path = tmp_path / "odd.pt2"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == WEIGHT and attack == "bzip2 member":
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_BZIP2)
                continue
            zout.writestr(info, data)
        if attack == "duplicate member":
            with pytest.warns(UserWarning, match="Duplicate name"):
                zout.writestr(WEIGHT, bytes(64))
    expected = CorruptArchive if attack == "bzip2 member" else UnsafeArchive
    with pytest.raises(expected):
        load_untrusted_pt2(path)


def test_ratios_are_judged_on_declared_sizes(tmp_path: Path) -> None:
    def member(name: str, size: int, compressed: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size = size, compressed
        return info

    check = safe_pt2.archive.check_sizes
    check([member("a", 100 * MB, MB)], 6 * MB, 1 << 40)  # ratio 100: zeros in a big model
    with pytest.raises(OversizedArchive, match="alone is"):
        check([member("a", 300 * MB, MB)], 2 * MB, 1 << 40)
    many = [member(f"m{i}", MB, MB // 150) for i in range(100)]  # each fine, 100 MB in all
    with pytest.raises(OversizedArchive, match=f"inflates to {100 * MB} bytes from {MB}"):
        check(many, MB, 1 << 40)
    with pytest.raises(CorruptArchive, match="claim more compressed bytes"):
        check([member("a", MB, 3 * MB)], 2 * MB, 1 << 40)
    check([member("json", MB, 100)], 1000, 1 << 40)  # below the ratio-free size


def test_checking_operators_leaves_torch_ops_as_it_was(saved: Path) -> None:
    # decomposition tables are keyed by these objects: a check that made new ones would
    # silently change how every later program is lowered
    packet, overload, dunder = torch.ops.aten.add, torch.ops.aten.add.Tensor, torch.ops.aten.__and__
    load_untrusted_pt2(saved)
    for target in ("torch.ops.aten.add.Tensor", "torch.ops.aten.__and__.Tensor"):
        safe_pt2.operators._operator_impurity.cache_clear()
        safe_pt2.operators.check_operator(target, "node target")
    assert torch.ops.aten.add is packet and torch.ops.aten.add.Tensor is overload
    assert torch.ops.aten.__and__ is dunder


# ---- symbolic expressions ----------------------------------------------------------------

S77 = "Symbol('s77', positive=True, integer=True)"  # what Small's batch size is written as
BIG = "9999999999999999999"  # the most an int64-sized literal may spell

# Each makes sympify (which evaluates what it parses) compute an enormous number, or spend
# long, and the words its refusal must hold. The first two are a tester's: plain torch
# never finishes loading either
HOSTILE_EXPRESSIONS = {
    "a power of a power": ("Pow(Integer(9), Pow(Integer(9), Integer(99999)))", "raises to"),
    "a literal of 10**10**8": (f"{S77} + Integer(10**10**8)", "raises to"),
    "** by a big exponent": (f"{S77}**99999", "raises to"),
    "** of **": ("Integer(2)**Integer(2)**Integer(62)", "raises to"),
    "Pow inside Pow's base": (f"Pow(Pow({S77}, Integer(64)), Integer(64))", "nests Pow inside"),
    "nested PowByNatural": (
        "PowByNatural(Integer(9), PowByNatural(Integer(9), Integer(64)))",
        "raises to",
    ),
    "PowByNatural in a base": (
        f"FloatPow(PowByNatural({S77}, Integer(64)), Integer(64))",
        "nests PowByNatural inside FloatPow",
    ),
    "an exponent that cancels to a literal": (
        f"PowByNatural(Symbol('s1'), Add({S77}, Mul(Integer(-1), {S77}), Integer({BIG})))",
        "raises to",
    ),
    "an exponent of literals alone": (
        f"PowByNatural({S77}, Add(Integer(1), Integer(-1), Mul(Add(1, -1), s5)))",
        "raises to",
    ),
    "Pow by a symbol": (f"Pow(Integer(9), {S77})", "raises to"),
    "a 30-digit literal": (f"Add({S77}, Integer({'1234567890' * 3}))", "more than 19 digits"),
    "a 30-digit hex literal": (f"Add({S77}, 0x{'9' * 30})", "more than 19 digits"),
    "deep brackets": ("Add(" * 40 + "s77" + ", 1)" * 40, "nests more than 32 brackets"),
    "a shift": ("Integer(1) << Integer(999999999999999999)", "not sympy arithmetic"),
    "^, which sympify reads as **": ("Integer(9)^Integer(9)^Integer(99)", "holds '^'"),
    "factorial": ("Integer(99999999)!", "is not an expression"),
    "a huge float": ("Float('1e999999', precision=53)", "not a finite double"),
    "a float of a million bits": ("Float('1.5', precision=999999)", "not a double"),
    "many Max arguments": (
        "Max(" + ", ".join(f"Symbol('u{i}', integer=True)" for i in range(17)) + ")",
        "Max and Min arguments",
    ),
    "many terms": ("+".join(f"s{i}" for i in range(300)), "more than 256 terms"),
}


def _first_size(expression: str, hint: Any = None) -> Callable[[dict], None]:
    """Write ``expression`` as the size of the input's first dimension."""

    def mutate(program: dict) -> None:
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
        size["expr_str"] = expression
        if hint is not None:
            size["hint"] = hint

    return mutate


def _refusal(path: Path) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(UnsafeArchive) as info:
        load_untrusted_pt2(path)
    return str(info.value), time.perf_counter() - started


@pytest.mark.parametrize("attack", list(HOSTILE_EXPRESSIONS))
def test_an_expression_sympy_cannot_evaluate_quickly_is_refused_before_load(
    saved: Path, tmp_path: Path, no_torch_load: list[str], attack: str
) -> None:
    expression, reason = HOSTILE_EXPRESSIONS[attack]
    path = _rewrite(saved, tmp_path / "evil.pt2", _program(_first_size(expression)))
    message, seconds = _refusal(path)
    assert message.startswith(f"symbolic expression {expression[:60]!r} "), message
    assert reason in message and "\n" not in message, message
    assert seconds < 2 and not no_torch_load


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_first_size(S77, {"as_int": 10**30}), "has the hint {'as_int': 1000000000000000000"),
        (_first_size(S77, {"as_int": "3"}), "has the hint"),
        (
            lambda p: p["range_constraints"].__setitem__("s77", {"min_val": 0, "max_val": 10**30}),
            "range constraint 's77' has bounds",
        ),
        (  # torch counts up to an unbacked symbol's number, one by one
            lambda p: p["range_constraints"].__setitem__("u99999999999", {"min_val": 0}),
            "range constraint 'u99999999999' is not an unbacked symbol's name",
        ),
        (
            lambda p: p["range_constraints"].__setitem__("Pow(9, Pow(9, 99))", {"min_val": 0}),
            "raises to",
        ),
    ],
    ids=["huge hint", "string hint", "huge bound", "unbacked key", "expression key"],
)
def test_hints_and_range_constraints_are_bounded_before_load(
    saved: Path,
    tmp_path: Path,
    no_torch_load: list[str],
    mutate: Callable[[dict], None],
    reason: str,
) -> None:
    path = _rewrite(saved, tmp_path / "evil.pt2", _program(mutate))
    message, seconds = _refusal(path)
    assert reason in message and "\n" not in message, message
    assert seconds < 2 and not no_torch_load


def test_the_testers_expressions_end_in_a_refusal_not_a_hang(saved: Path, tmp_path: Path) -> None:
    # in a process of its own, with the real torch.export.load behind the check: a check
    # that let them through would never return, and the timeout would say so
    paths = [
        _rewrite(saved, tmp_path / f"evil{i}.pt2", _program(_first_size(expression)))
        for i, expression in enumerate(
            [HOSTILE_EXPRESSIONS[a][0] for a in ("a power of a power", "a literal of 10**10**8")]
        )
    ]
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ultramem.compiler.safe_pt2 import UnsafeArchive, load_untrusted_pt2\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_untrusted_pt2(Path(path))\n"
        "    except UnsafeArchive as exc:\n"
        "        print('refused', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stderr[-2000:]
    assert all(line.startswith("refused symbolic expression") for line in lines), lines


# what torch.export writes for dynamic shapes, each of which must still load
class Derived(nn.Module):  # s0 - 1 (a derived Dim whose range ends at int64's maximum)
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x[:, :-1] + y


class Doubled(nn.Module):  # 2*s0 (a derived Dim), a concatenation, a bounded Dim
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.reshape(-1, 2).sum(1), y]) * x.shape[0]


class Unbacked(nn.Module):  # u0, u1 from data: sizes and assertions on them
    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        m = k.item()
        torch._check(m >= 0)
        torch._check(m < 1000)
        rows = torch.nonzero(x > 0).float().sum(0)
        return x.new_ones(m * 2 + 1, m // 3 + 1).sum() + rows.sum()


class Powers(nn.Module):  # Pow(s0, 2), PowByNatural(2, s0 + 1), PowByNatural(s0, s1), FloatPow
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, m = x.shape
        return x.new_zeros(2 ** (n + 1)), x.new_zeros(n**m), x.new_zeros((3 * n) ** 2), x * n**0.5


class Scaled(nn.Module):  # Float('1.5', precision=53), Max(1, TruncToInt(...)), FloatTrueDiv
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * (x.shape[0] / 3.0), F.interpolate(x[None, None], scale_factor=1.5)


DIM = Dim("d", min=3, max=9223372036854775806)
HALF = Dim("e", min=1, max=1000)
DYNAMIC_EXPORTS: dict[str, Callable[[], tuple[nn.Module, tuple, Any]]] = {
    "derived s0 - 1, int64 maximum": lambda: (
        Derived(),
        (torch.randn(2, 5), torch.randn(2, 4)),
        ({1: DIM}, {1: DIM - 1}),
    ),
    "derived 2*s0, min and max": lambda: (
        Doubled(),
        (torch.randn(6), torch.randn(3)),
        ({0: 2 * HALF}, {0: HALF}),
    ),
    "unbacked u0": lambda: (Unbacked(), (torch.randn(3, 4), torch.tensor(5)), None),
    "powers": lambda: (
        Powers(),
        (torch.randn(3, 2),),
        ({0: Dim("n", max=6), 1: Dim("m", max=4)},),
    ),
    "float scale": lambda: (Scaled(), (torch.randn(6, 4),), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)),
}


@pytest.mark.parametrize("name", list(DYNAMIC_EXPORTS))
def test_what_exports_with_dynamic_shapes_write_loads(tmp_path: Path, name: str) -> None:
    model, example, dynamic_shapes = DYNAMIC_EXPORTS[name]()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic_shapes), path)
    with zipfile.ZipFile(path) as archive:
        program = json.loads(archive.read(next(n for n in archive.namelist() if "models/" in n)))
    assert program["range_constraints"]  # the shapes are symbolic, so there is something to check
    loaded = load_untrusted_pt2(path)
    torch.testing.assert_close(loaded.module()(*example), model(*example))


@pytest.mark.parametrize(
    "expression",
    [
        "Add(Symbol('s94', positive=True, integer=True), Integer(-1))",
        "LessThan(Symbol('u0', integer=True), Mul(Symbol('s27', positive=True, integer=True), "
        "Symbol('s77', positive=True, integer=True)))",
        "Mul(Integer(9), Pow(Symbol('s77', positive=True, integer=True), Integer(2)))",
        "PowByNatural(Integer(2), Add(Symbol('s77', positive=True, integer=True), Integer(1)))",
        "FloatPow(ToFloat(Symbol('s77', positive=True, integer=True)), Float('0.5', precision=53))",
        "Max(Integer(1), TruncToInt(Mul(Float('1.5', precision=53), "
        "ToFloat(Symbol('s27', positive=True, integer=True)))))",
        "Max(Integer(1), Add(FloorDiv(Symbol('u0', integer=True), Integer(3)), Integer(1)))",
        "s94 + 1",  # range-constraint keys are printed, not srepr'd
        "2*s17",
        f"Add(Symbol('s0', positive=True, integer=True), Integer({BIG}))",
        "Pow(Symbol('s0', positive=True, integer=True), Integer(-64))",
        "Min(" + ", ".join(f"Symbol('u{i}', integer=True)" for i in range(16)) + ")",
        "Add(" * 31 + "s0" + ", 1)" * 31,
    ],
)
def test_what_torch_export_writes_is_within_the_bounds(expression: str) -> None:
    safe_pt2.expressions.check_expression(expression)  # raises UnsafeArchive if not
