"""The GPU architectures kernel bundles are built for (no import of Triton here: the CLI
checks ``--sm`` against these before anything heavy loads)."""

from __future__ import annotations

DEFAULT_SMS = (80, 86, 89, 90, 100, 120)
# SMs this Triton compiles the kernels for (each tried on 2026-12-01, Triton 3.x on CPU);
# sm_101 aborts inside LLVM ("Cannot select: intrinsic redux.sync.fmax"), and a size
# that is no SM at all (7, 999) aborts the process: both are refused before compiling
SUPPORTED_SMS = (60, 70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)
