"""The C++ deployment: an AOTInductor package of the bundled model, with the fused ops'
native library, loaded and run by a small C++ program that never starts Python.

Compiles ``tests/compiler/cpp/run_aoti.cpp`` against the installed libtorch, runs it on
token ids the test draws, and holds its logits against the original model's (eager
PyTorch, the independent reference).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ultramem.compiler.aoti import export_aoti
from ultramem.compiler.pipeline import compile_model
from ultramem.kernels import native, registry
from ultramem.models.builtin import load_builtin

PROGRAM = Path(__file__).with_name("cpp") / "run_aoti.cpp"

pytestmark = pytest.mark.skipif(
    not registry.NATIVE_LIBRARY or shutil.which("g++") is None,
    reason=f"needs g++ and the native kernels ({native.unavailable_reason()})",
)


def _build_program(out: Path) -> Path:
    from torch.utils.cpp_extension import include_paths

    lib_dir = Path(torch.__file__).parent / "lib"
    ops = Path(registry.NATIVE_LIBRARY)  # type: ignore[arg-type]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        "g++", "-O0", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{d}" for d in include_paths()), str(PROGRAM), "-o", str(out),
        # --no-as-needed: nothing calls into the ops library by symbol; it must load anyway
        f"-L{lib_dir}", "-Wl,--no-as-needed", str(ops), "-ltorch", "-ltorch_cpu", "-lc10",
        f"-Wl,-rpath,{lib_dir}", f"-Wl,-rpath,{ops.parent}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return out


def test_the_aoti_package_runs_from_cpp_without_python(tmp_path: Path) -> None:
    loaded = load_builtin()
    compiled = compile_model(loaded)
    package = export_aoti(compiled.rewrite.program, tmp_path / "model.aoti.pt2")
    program = _build_program(tmp_path / "run_aoti")
    tokens = torch.randint(
        0, loaded.model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )
    (tmp_path / "tokens.bin").write_bytes(tokens.numpy().tobytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    args = [program, package, tmp_path / "tokens.bin", "2", "11", tmp_path / "out.bin"]
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        want = loaded.model(tokens)
    want = (want[0] if isinstance(want, tuple) else want).float()
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32)
    torch.testing.assert_close(got.view(want.shape), want, atol=1e-4, rtol=1e-4)
    # the program links no Python: what it ran was C++ end to end
    linked = subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    assert "libpython" not in linked and "libtorch_python" not in linked
