"""AOTInductor package: the rewritten program compiled ahead of time into one ``.pt2``.

PyTorch's own deployment path: ``torch._inductor.aoti_compile_and_package`` compiles the
program (with our fused ops) into a shared library inside the package, which C++
(``torch::inductor::AOTIModelPackageLoader``) and Python (``aoti_load_package``) load
without the model's code. On CUDA our ``triton_op`` kernels are compiled into cubins in
the package; on the CPU the fused ops are called through AOTInductor's proxy executor,
by name, so the loading process must have them registered: ``import ultramem.kernels`` in
Python, or, from C++ with no Python, link ``libultramem_cpu.so`` (the native kernels,
``kernels/native``; ``tests/compiler/test_cpp_deployment.py`` builds such a program).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from .inputs.options import AOTI_FILE as AOTI_FILE


def export_aoti(program: ExportedProgram, path: Path) -> Path:
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def load_aoti(path: Path) -> Callable[..., Any]:
    import ultramem.kernels  # noqa: F401  (the package calls our ops by name)

    return torch._inductor.aoti_load_package(str(path))
