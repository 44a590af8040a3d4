"""The ops' native CPU kernels (``ultramem_cpu.cpp``), compiled on first use and cached.

``load()`` returns the path of ``libultramem_cpu.so`` after loading it into the
dispatcher: it defines ``ultramem::retrieve`` and ``ultramem::aggregate`` (schemas from the
contract) with their CPU kernels, so eager PyTorch, ``torch.compile`` and AOTInductor
packages run native code, the last from C++ with no Python at all
(``tests/compiler/test_cpp_deployment.py``). Python then adds the fake kernels and the
CUDA (Triton) kernels to the same ops (``registry``).

The first build takes about 20 s of one core (it compiles against the installed torch's
headers with the system's ``g++``); it is cached under ``$ULTRAMEM_CACHE`` (default
``~/.cache/ultramem``) by a hash of the source, the schemas, torch's version and the
compiler's, so later imports load it in milliseconds. ``ULTRAMEM_NATIVE=0`` turns it off.
Without a compiler, or when the build fails, one warning says why and the ops keep the
reference kernels (plain PyTorch), which compute the same numbers more slowly.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from ..contract import AGGREGATE, RETRIEVE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ultramem_cpu.cpp")
LIBRARY = "libultramem_cpu.so"
FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-Wall", "-Wno-unused-function")
# a compile that hangs (a broken toolchain) must not hang every import
BUILD_TIMEOUT_S = 600


def cache_root() -> Path:
    return Path(os.environ.get("ULTRAMEM_CACHE") or Path.home() / ".cache" / "ultramem")


def schemas_header() -> str:
    """The C++ side of the op contract: each op's schema, as torch.library reads it."""
    lines = ["// generated from kernels/contract.py by kernels/native/__init__.py"]
    for spec in (RETRIEVE, AGGREGATE):
        schema = (spec.name + spec.torch_schema()).replace('"', '\\"')
        lines.append(f'#define ULTRAMEM_{spec.name.upper()}_SCHEMA "{schema}"')
    return "\n".join(lines) + "\n"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _torch_dirs() -> tuple[list[str], str]:
    from torch.utils.cpp_extension import include_paths

    return include_paths(), str(Path(torch.__file__).parent / "lib")


def _command(compiler: str, source: Path, header_dir: Path, out: Path) -> list[str]:
    includes, lib_dir = _torch_dirs()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{d}" for d in [str(header_dir), *includes, sysconfig.get_paths()["include"]]),
        str(source),
        "-o",
        str(out),
        f"-L{lib_dir}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib_dir}",
    ]


def _key(compiler: str) -> str:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()[:1]
    digest = hashlib.sha256()
    for part in (SOURCE.read_text(), schemas_header(), torch.__version__, *version, *FLAGS):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


class NativeBuildError(RuntimeError):
    """The native kernels could not be built here; the message says why, in one line."""


def build() -> Path:
    """The cached library, compiled first if needed (``NativeBuildError`` if it cannot be)."""
    compiler = _compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler (g++) on PATH")
    folder = cache_root() / "native" / _key(compiler)
    library = folder / LIBRARY
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if library.is_file():
            return library
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            (Path(tmp) / "schemas.h").write_text(schemas_header())
            staged = Path(tmp) / LIBRARY
            started = time.perf_counter()
            log.warning("ultramem: compiling the native CPU kernels (once, about 20 s)")
            try:
                done = subprocess.run(
                    _command(compiler, SOURCE, Path(tmp), staged),
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT_S,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NativeBuildError(f"{compiler} did not run: {exc}") from None
            if done.returncode != 0:
                first = next((ln for ln in done.stderr.splitlines() if "error" in ln), "")
                raise NativeBuildError(f"{compiler} failed: {first.strip()[:300]}")
            os.replace(staged, library)
            log.info("native kernels built in %.1f s: %s", time.perf_counter() - started, library)
    return library


_loaded: Path | None = None
_failure: str | None = None


def load() -> Path | None:
    """Build (once) and load the native kernels; ``None`` (with one warning) if they cannot
    be, or ``ULTRAMEM_NATIVE=0`` is set."""
    global _loaded, _failure
    if _loaded is not None or _failure is not None:
        return _loaded
    if os.environ.get("ULTRAMEM_NATIVE", "1") == "0":
        _failure = "ULTRAMEM_NATIVE=0"
        return None
    try:
        library = build()
        torch.ops.load_library(str(library))
    except (NativeBuildError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("ultramem: native CPU kernels unavailable (%s); using the reference", _failure)
        return None
    _loaded = library
    return library


def unavailable_reason() -> str | None:
    """Why the native kernels are not in use (after ``load``), or ``None`` if they are."""
    return _failure
