"""A ``.pt2`` from elsewhere is data: nothing in it runs, whatever it holds.

Each attack is a real ``torch.export.save`` archive with one part replaced by what an
attacker would write. The two that plain ``torch.export.load`` executes (a pickled sample
input, ``guards_code``) are shown to run there first, so the test would notice a torch
that stopped being a hazard as well as a loader that lets them through.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.export import Dim

from ultramem.compiler.loading import ModelLoadError, load_model
from ultramem.compiler.safe_pt2 import CorruptArchive, UnsafeArchive, load_untrusted_pt2


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.linear(x) + self.offset).topk(2, -1).values.reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = torch.randn(3, 5, 4)
    program = torch.export.export(Small().eval(), (x,), dynamic_shapes=({0: Dim("b")},))
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(program, str(path))
    return path


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))
    return dst


def _program(mutate: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            mutate(program)
            return json.dumps(program).encode()
        return data

    return change


def _pickled_sample(marker: Path) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("sample_inputs/model.pt"):
            buffer = io.BytesIO()
            torch.save((Payload(marker),), buffer)
            return buffer.getvalue()
        return data

    return change


def _first_call(program: dict) -> dict:
    return next(n for n in program["graph_module"]["graph"]["nodes"] if "aten" in n["target"])


def _size_expressions(program: dict, replace: Callable[[str], str]) -> None:
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str" and isinstance(item, str):
                    value[key] = replace(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program)


def _attacks(marker: Path) -> dict[str, Callable[[str, bytes], bytes]]:
    code = f"__import__('os').system('touch {marker}')"
    # no underscore, no quote: only builtins spelled as plain words, as sympify allows
    spelled = "+".join(f"chr({ord(c)})" for c in f"open('{marker}','w')")
    return {
        "pickled sample input": _pickled_sample(marker),
        "guards_code": _program(lambda p: p.__setitem__("guards_code", [code])),
        "sympy expression": _program(
            lambda p: p["range_constraints"].__setitem__(code, {"min_val": 0, "max_val": 3})
        ),
        "builtins in a size expression": _program(
            lambda p: _size_expressions(p, lambda _expr: f"eval({spelled})")
        ),
        "target outside torch.ops": _program(
            lambda p: _first_call(p).__setitem__("target", "torch.os.system")
        ),
        "torch.ops.load_library": _program(
            lambda p: _first_call(p).__setitem__("target", "torch.ops.load_library")
        ),
        "node name into generated code": _program(
            lambda p: _first_call(p).__setitem__("name", "x; import os")
        ),
        "carriage return in a stack trace": _program(
            lambda p: _first_call(p)["metadata"].__setitem__("stack_trace", f"File x\r{code}")
        ),
    }


ATTACKS = list(_attacks(Path("/unused")))


def test_a_saved_program_loads_and_runs_as_torch_loads_it(saved: Path) -> None:
    program = load_untrusted_pt2(saved)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(program.module()(x), torch.export.load(str(saved)).module()(x))


@pytest.mark.parametrize(
    "attack", ["pickled sample input", "guards_code", "builtins in a size expression"]
)
def test_plain_torch_export_load_runs_these(saved: Path, tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "ran"
    path = _rewrite(saved, tmp_path / "evil.pt2", _attacks(marker)[attack])
    with contextlib.suppress(Exception):  # the payload may break the program after running
        torch.export.load(str(path)).module()(torch.randn(3, 5, 4))
    assert marker.exists()


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_attack_runs_and_each_is_refused_or_neutralised(
    saved: Path, tmp_path: Path, attack: str
) -> None:
    marker = tmp_path / "ran"
    path = _rewrite(saved, tmp_path / "evil.pt2", _attacks(marker)[attack])
    try:
        program = load_untrusted_pt2(path)
    except UnsafeArchive:
        refused = True
    else:
        refused = False
        program.module()(torch.randn(3, 5, 4))  # guards and stack traces are dropped
    assert not marker.exists()
    assert refused or attack in ("guards_code", "carriage return in a stack trace")


def test_the_cli_loader_names_the_opt_in_for_an_unsafe_archive(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _rewrite(saved, tmp_path / "evil.pt2", _pickled_sample(marker))
    with pytest.raises(ModelLoadError, match="--allow-unsafe-pickle") as info:
        load_model(str(path))
    assert "\n" not in str(info.value) and not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(2048), b"PK\x03\x04" + os.urandom(200)],
    ids=["empty", "random", "zip-ish"],
)
def test_a_corrupt_file_is_not_called_unsafe(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pt2"
    path.write_bytes(content)
    with pytest.raises(CorruptArchive):
        load_untrusted_pt2(path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    assert "--allow-unsafe-pickle" not in str(info.value) and "\n" not in str(info.value)


def test_an_archive_without_its_sample_inputs_says_so(saved: Path, tmp_path: Path) -> None:
    path = tmp_path / "nosample.pt2"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("sample_inputs/model.pt"):
                zout.writestr(info, zin.read(info.filename))
    with pytest.raises(CorruptArchive, match=r"sample_inputs/model\.pt is missing"):
        load_untrusted_pt2(path)
