"""What the CLI's options can be, and the checks on them that need no model.

Nothing here imports torch, ONNX or Triton: ``ultramem --help`` and every bad option are
answered from this module alone, in well under a second, before any long import or work
(``tests/cli/test_startup.py`` holds it to that). The modules that do the work import
their defaults from here, so each value is written once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from ...plugins.sms import DEFAULT_SMS, SUPPORTED_SMS
from ..tensorrt.package import PACKAGES as TRT_PACKAGES
from ..tensorrt.package import PIP_NAMES as TRT_PIP_NAMES
from ..tensorrt.profile import parse_range
from .errors import OptionError

DEFAULT_OPSET = 20
# what torch.onnx writes as asked (below 17 it writes 18 instead) and ONNX Runtime 1.32
# loads (26 and up: its checker rejects the attention nodes torch.onnx writes there)
ONNX_OPSETS = range(17, 26)
ONNX_FORMS = ("custom", "portable")

FORWARD_TASK = "forward"
GENERATION_TASK = "text-generation"

ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
KERNELS_DIR = "kernels"
AOTI_FILE = "model.aoti.pt2"

# every format, in the order they are written, with the formats whose files each reads;
# ``compiler/formats.py`` holds one writer per name (checked there when it loads)
FORMAT_NEEDS: dict[str, tuple[str, ...]] = {
    "onnx": (),
    "kernels": (),
    "aoti": (),
    "tensorrt": ("onnx",),
}
# the file whose manifest entry says a format was written
FORMAT_MARKERS: dict[str, str] = {
    "onnx": ONNX_FILE,
    "kernels": f"{KERNELS_DIR}/bundle.json",
    "aoti": AOTI_FILE,
    "tensorrt": ENGINE_FILE,
}

BENCH_SCHEMA = "ultramem-bench/1"
BENCH_BACKENDS = (
    "eager",
    "torch.compile",
    "fused-ops",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "plugin-kernels",
    "aotinductor",
    "tensorrt",
)


@dataclass(frozen=True)
class TensorRTOptions:
    mode: str = "native"
    package: str | None = None
    precision: str = "fp32"
    profile_batch: str | None = None  # "min,opt,max"; default 1,1,8
    profile_tokens: str | None = None  # default: up to what the capture admits (≤ 256)
    sms: tuple[int, ...] = DEFAULT_SMS
    build_sm: int | None = None  # plugin mode: the GPU the engine is built on


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    onnx_form: str = "custom"
    trt: TensorRTOptions = field(default_factory=TensorRTOptions)


def plan_formats(formats: tuple[str, ...], options: ExportOptions) -> list[str]:
    """The formats to write, each after those it needs, in ``FORMAT_NEEDS``' order; every
    option checked against them first (``OptionError``), so nothing is silently ignored."""
    unknown = [f for f in formats if f not in FORMAT_NEEDS]
    if unknown:
        raise OptionError(
            f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMAT_NEEDS)}"
        )
    if not formats:
        raise OptionError(f"--format is empty; choose from {', '.join(FORMAT_NEEDS)}")
    check_options(set(formats), options)
    wanted = set(formats)
    if "tensorrt" in wanted and options.trt.mode == "plugin":
        wanted.add("kernels")  # the plugins' kernels are the bundle's
    for name in list(wanted):
        wanted.update(FORMAT_NEEDS[name])
    return [name for name in FORMAT_NEEDS if name in wanted]


def check_options(formats: set[str], options: ExportOptions) -> None:
    if not ONNX_OPSETS[0] <= options.opset <= ONNX_OPSETS[-1]:
        raise OptionError(
            f"--opset {options.opset} is outside {ONNX_OPSETS[0]}..{ONNX_OPSETS[-1]}, the "
            "opsets torch.onnx writes as asked and ONNX Runtime runs"
        )
    trt, default = options.trt, TensorRTOptions()
    if "tensorrt" not in formats:
        given = [
            flag
            for flag, value, unset in (
                ("--precision", trt.precision, default.precision),
                ("--trt-mode", trt.mode, default.mode),
                ("--trt-package", trt.package, default.package),
                ("--profile-batch", trt.profile_batch, None),
                ("--profile-tokens", trt.profile_tokens, None),
            )
            if value != unset
        ]
        if given:
            raise OptionError(
                f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to TensorRT "
                "engines: add tensorrt to --format"
            )
    if "tensorrt" in formats:
        wanted = [trt.package] if trt.package else list(TRT_PACKAGES)
        if not any(importlib.util.find_spec(name) for name in wanted):
            pips = " or ".join(f"`pip install {TRT_PIP_NAMES[n]}`" for n in wanted)
            raise OptionError(f"--format tensorrt: {' / '.join(wanted)} is not installed; {pips}")
    if not trt.sms:
        raise OptionError("--sm is empty; give the GPUs' SMs, such as 80,90")
    unsupported = [sm for sm in trt.sms if sm not in SUPPORTED_SMS]
    if unsupported:
        raise OptionError(
            f"--sm {','.join(map(str, unsupported))}: not an SM the kernels compile for; "
            f"choose from {','.join(map(str, SUPPORTED_SMS))}"
        )
    for flag, text in (
        ("--profile-batch", trt.profile_batch),
        ("--profile-tokens", trt.profile_tokens),
    ):
        if text is not None:
            try:
                parse_range(text)
            except ValueError as exc:
                raise OptionError(f"{flag}: {exc}") from None
