"""``scripts/kernel_report.py``: the static sm_90 report, compiled here on the CPU.

The report runs as a subprocess (it compiles for a GPU, so it drops the
``TRITON_INTERPRET=1`` this test session runs under) on the tiny config at every default
token count, and (``-m slow``) on the paper config at one. Its registers are checked
against the cubins themselves (the ``EIATTR_REGCOUNT`` and frame size the ELF records, read
here without cuobjdump), its totals against its rows. ``sass_model``'s trip counts are
checked on a small source file: a loop whose bounds the launch fixes is counted, one it
does not stops the report.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "kernel_report.py"
ROW_KEYS = {
    "kernel", "tokens", "programs", "registers", "spills", "shared_bytes", "sass_instructions",
    "warp_instructions_per_program", "est_us", "floor_us", "warp_instructions_upper",
    "est_us_upper",
}  # fmt: skip
TOTAL_KEYS = {"tokens", "est_us", "floor_us", "launches", "est_us_upper"}
EIATTR_REGCOUNT, EIATTR_FRAME_SIZE = 0x2F, 0x11


def run_report(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str, Path]:
    out, cubins = tmp_path / "report.json", tmp_path / "cubins"
    command = [sys.executable, str(SCRIPT), *args, "--json", str(out), "--cubin-dir", str(cubins)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, cubins


def elf_attributes(cubin: bytes) -> dict[int, int]:
    """The kernel's attributes in the cubin's ``.nv.info`` section: {attribute: value}."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strings = sections[names][4]

    def name(offset: int) -> bytes:
        start = strings + offset
        return cubin[start : cubin.index(b"\0", start)]

    info = next(s for s in sections if name(s[0]) == b".nv.info")
    blob, found, at = cubin[info[4] : info[4] + info[5]], {}, 0
    while at < len(blob):
        form, attribute = blob[at], blob[at + 1]
        if form == 4:  # EIFMT_SVAL: a size, then (symbol, value) words
            size = struct.unpack_from("<H", blob, at + 2)[0]
            if size == 8:
                found[attribute] = struct.unpack_from("<II", blob, at + 4)[1]
            at += 4 + size
        else:
            at += 4
    return found


def check_schema(report: dict[str, Any]) -> None:
    assert set(report) == {"device_model", "rows", "totals"}
    assert "sm_90" in report["device_model"] and "static" in report["device_model"]
    for row in report["rows"]:
        assert set(row) == ROW_KEYS, row
        for key in ROW_KEYS - {"kernel", "spills", "shared_bytes"}:
            assert row[key] > 0, (key, row)
        assert row["spills"] >= 0 and row["shared_bytes"] >= 0
        # every path: each instruction counted at least once (a loop may run fewer times);
        # a rare path's instructions at their measured rate, never more
        assert row["warp_instructions_upper"] >= row["sass_instructions"] / 2
        assert row["warp_instructions_per_program"] <= row["warp_instructions_upper"]
        assert row["floor_us"] <= row["est_us"] <= row["est_us_upper"]
    for total in report["totals"]:
        assert set(total) == TOTAL_KEYS
        rows = [r for r in report["rows"] if r["tokens"] == total["tokens"]]
        assert total["launches"] == len(rows) > 0
        assert total["est_us"] == pytest.approx(sum(r["est_us"] for r in rows), abs=1e-2)
        assert total["floor_us"] == pytest.approx(sum(r["floor_us"] for r in rows), abs=1e-3)
        upper = sum(r["est_us_upper"] for r in rows)
        assert total["est_us_upper"] == pytest.approx(upper, abs=1e-2)


def test_tiny_config_reports_every_kernel_from_its_cubin(tmp_path: Path) -> None:
    report, stdout, cubins = run_report(tmp_path, "--config", "tiny")
    check_schema(report)
    assert [t["tokens"] for t in report["totals"]] == [1, 64, 4096]
    assert "Static estimate, not a measurement" in stdout and "| kernel | tokens |" in stdout
    # registers and spills as the cubins record them (not cuobjdump's reading of them)
    from_elf: dict[str, set[tuple[int, int]]] = {}
    for cubin in cubins.glob("*.cubin"):
        attributes = elf_attributes(cubin.read_bytes())
        entry = cubin.name.rsplit("-", 1)[0]
        regs_spills = (attributes[EIATTR_REGCOUNT], attributes.get(EIATTR_FRAME_SIZE, 0) // 4)
        from_elf.setdefault(entry, set()).add(regs_spills)
    assert from_elf, "no cubin kept"
    for row in report["rows"]:
        kernel = row["kernel"].split("#")[0]
        assert (row["registers"], row["spills"]) in from_elf[kernel], (row, from_elf)
    # retrieve's rare path (_full_top, on full keys) counts at its measured rate, below 1,
    # where the line information names inlined calls (Triton 3.9 on; before, every path)
    if "no SASS instruction is attributed to _full_top" not in stdout:
        for row in report["rows"]:
            if row["kernel"] == "_retrieve_kernel":
                assert row["warp_instructions_per_program"] < row["warp_instructions_upper"]
        assert "_full_top (" in stdout and "scripts/branch_rates.py" in stdout
    # the whole lookup grows with its tokens; its memory floor too
    est = [t["est_us"] for t in report["totals"]]
    floor = [t["floor_us"] for t in report["totals"]]
    assert est[0] <= est[-1] and floor[0] < floor[1] < floor[2]


@pytest.mark.slow  # the paper-size kernels take 20-60 s of compiling on two busy cores
def test_paper_config_compiles_for_sm_90(tmp_path: Path) -> None:
    report, _, _ = run_report(tmp_path, "--config", "paper", "--sm", "90", "--tokens", "1")
    check_schema(report)
    assert {r["kernel"] for r in report["rows"]} >= {"_retrieve_kernel", "_aggregate_kernel"}
    # 2 heads, one token: the programs the launchers' grids give
    assert all(r["programs"] < 132 for r in report["rows"])


def test_an_unknown_sm_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT), "--config", "tiny", "--sm", "75"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "no device model for sm_75" in done.stderr


# ---- sass_model's trip counts, on a source file of our own ---------------------------------


def sass_model() -> ModuleType:
    path = REPO / "scripts" / "sass_model.py"
    spec = importlib.util.spec_from_file_location("sass_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


KERNEL = """
def helper(n, BLOCK):
    for start in range(0, n, BLOCK):
        pass


def kernel(x_ptr, n, BLOCK):
    half = n // 2
    for i in range(half):
        pass
    helper(n, BLOCK)
    helper(half, BLOCK)
    for j in range(tl.load(x_ptr)):
        pass
"""


def test_trip_counts_follow_the_launch_and_refuse_to_guess(tmp_path: Path) -> None:
    sass = sass_model()
    source = tmp_path / "kern.py"
    source.write_text(KERNEL)
    path = str(source)
    functions = {f.name: f for f in sass.functions_in(path)}
    kernel = functions["kernel"]
    env = {"n": 64, "BLOCK": 16, "x_ptr": sass.UNKNOWN}

    def loop(function: str, index: int) -> Any:
        loops = [n for n in ast.walk(functions[function]) if isinstance(n, ast.For)]
        node = sorted(loops, key=lambda n: n.lineno)[index]
        return sass.SourceLoop(path, node.lineno, node.end_lineno, node, functions[function], ())

    assert sass.expected_trips(loop("kernel", 0), path, kernel, env) == [32]
    # a helper called twice: one copy per call path, in source order (n, then n // 2)
    assert sass.expected_trips(loop("helper", 0), path, kernel, env) == [4, 2]
    with pytest.raises(sass.ReportError, match="bounds depend on"):
        sass.expected_trips(loop("kernel", 1), path, kernel, env)
