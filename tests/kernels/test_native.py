"""How the native CPU kernels come to be, and what happens when they cannot.

The numbers of the kernels themselves are held by the tests of each op (``impl`` =
native); here: the schemas the library defines are the contract's, the build is cached,
and without a compiler (or with ``ULTRAMEM_NATIVE=0``) the ops still run, on the
references, after one warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ultramem.kernels import AGGREGATE, RETRIEVE, native, op_overload, registry

PROBE = """
import torch, ultramem.kernels as k
from ultramem.kernels import registry, native
x = [torch.randn(3, 2, 9, 2), torch.randn(3, 2, 9, 2), torch.randn(2, 2), torch.randn(2, 2),
     torch.randn(2, 2, 2, 2)]
got = torch.ops.ultramem.retrieve(*x, 4, 5, "softmax")
want = k.retrieve_reference(*x, 4, 5, "softmax")
assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])
print("native" if registry.NATIVE_LIBRARY else "reference", native.unavailable_reason())
"""


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "ULTRAMEM_CACHE": str(tmp_path / "cache"), **env},
    )


def test_the_library_defines_the_contracts_schemas() -> None:
    if not registry.NATIVE_LIBRARY:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    for spec in (RETRIEVE, AGGREGATE):
        assert str(op_overload(spec)._schema) == f"{spec.qualname}{spec.torch_schema()}"
    assert native.schemas_header().count("#define ULTRAMEM_") == 2


def test_without_a_compiler_the_references_run_after_one_warning(tmp_path: Path) -> None:
    done = _probe(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "reference"
    warnings = [line for line in done.stderr.splitlines() if "native CPU kernels" in line]
    assert len(warnings) == 1 and "using the reference" in warnings[0]


def test_native_off_by_choice(tmp_path: Path) -> None:
    done = _probe(tmp_path, ULTRAMEM_NATIVE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["reference", "ULTRAMEM_NATIVE=0"]
    assert not (tmp_path / "cache").exists()  # nothing built, nothing written


def test_the_build_is_cached_by_what_it_is_built_from() -> None:
    if not registry.NATIVE_LIBRARY:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    library = Path(registry.NATIVE_LIBRARY)
    assert library.is_file() and library.parent.parent == native.cache_root() / "native"
    assert native.build() == library  # a second call finds it, compiles nothing
    assert len(library.parent.name) == 16  # the key: source, schemas, torch, compiler
