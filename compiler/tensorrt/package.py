"""Which TensorRT is installed, and whether its engines can run here.

One backend for ``tensorrt`` (10.x/11.x) and ``tensorrt_rtx``: ``import_tensorrt`` picks the
package (``tensorrt`` first), ``can_run_engine`` says whether an engine built with it runs on
this machine (TensorRT-RTX 1.7 engines run on a few compute capabilities only).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..inputs.errors import TensorRTError

PACKAGES = ("tensorrt", "tensorrt_rtx")
PIP_NAMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}
# TensorRT-RTX 1.7 engines run on these only (its runtime's message on sm_90, docs/platforms.md).
RTX_COMPUTE_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


def import_tensorrt(package: str | None = None) -> ModuleType:
    """``tensorrt`` or ``tensorrt_rtx``; ``None`` prefers ``tensorrt``, then ``tensorrt_rtx``."""
    if package is not None and package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES} or None, got {package!r}")
    for name in [package] if package else PACKAGES:
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        if name == "tensorrt" and int(trt.__version__.split(".")[0]) < 10:
            raise TensorRTError(
                f"tensorrt {trt.__version__} is too old: pip install 'tensorrt>=10'"
            )
        return trt
    wanted = [package] if package else list(PACKAGES)
    pips = " or ".join(f"`pip install {PIP_NAMES[n]}`" for n in wanted)
    raise TensorRTError(f"no TensorRT package ({' / '.join(wanted)} not importable); {pips}")


def package_name(trt: ModuleType) -> str:
    """Which of ``PACKAGES`` an imported module is."""
    return "tensorrt_rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


def can_run_engine(package: str) -> tuple[bool, str]:
    """Whether an engine built with ``package`` can execute on this machine, and why not."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if package == "tensorrt_rtx" and (major, minor) not in RTX_COMPUTE_CAPABILITIES:
        supported = " ".join(f"{a}.{b}" for a, b in RTX_COMPUTE_CAPABILITIES)
        return False, f"TensorRT-RTX does not run on compute capability {major}.{minor} " + (
            f"(supported: {supported})"
        )
    return True, f"CUDA device with compute capability {major}.{minor}"
