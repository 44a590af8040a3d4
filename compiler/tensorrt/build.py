"""TensorRT engines from ONNX with the lookup in TensorRT's own layers ("native" mode).

One backend for ``tensorrt`` (10.x/11.x) and ``tensorrt_rtx``; where they differ:

* Precision. ``tensorrt`` 10.x is weakly typed: ``fp16``/``bf16`` set ``BuilderFlag.FP16``/
  ``BF16`` and TensorRT *may* pick such kernels per layer. ``tensorrt`` 11.x and
  ``tensorrt_rtx`` are strongly typed and have no such flags (RTX 1.7's ``BuilderFlag`` has no
  FP16, BF16, INT8, FP8 or OBEY_PRECISION_CONSTRAINTS): there the ONNX is converted before
  parsing (float weights, Casts and constants to the low type, the way NVIDIA's ModelOpt
  AutoCast prepares models for 11.x), so every layer runs in it. Graph I/O stays fp32 either
  way. TF32 is turned off (it is on by default in both): it can flip near-tied top-k picks.
* Timing cache. ``tensorrt`` loads it when present and saves it after the build. In
  ``tensorrt_rtx`` (>= 1.2) timing-cache calls are deprecated no-ops and loading one needs
  CUDA, so it is skipped and the info says so.
* Layer list. ``Runtime.deserialize_cuda_engine`` needs a CUDA device (``tensorrt_rtx`` on a
  CPU machine returns None: "CUDA driver version is insufficient"), so the engine
  inspector's list is used where an engine deserializes, else the parsed network's layers.

Lookup modes: ``native`` inlines the ``ultramem`` function bodies into TensorRT's own
layers; ``plugin`` maps the nodes to our AOT plugins (``plugins/trt_plugin.py``). Before
parsing, the graph is checked and rewritten for TensorRT (``trt_onnx``: limits, scatter-add
lowering, precision).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from ...files import atomic_write
from ...plugins.trt_plugin import PLUGIN_NAMESPACE
from ..onnx.domain import inline_functions
from .package import TensorRTError, can_run_engine, import_tensorrt, package_name
from .plugin_onnx import plugin_onnx
from .prepare import (
    Precision,
    check_limits,
    convert_precision,
    lower_scatter_add,
)
from .profile import ShapeProfile

log = logging.getLogger(__name__)


@dataclass
class EngineInfo:
    engine_path: str
    package: str
    version: str
    precision: str
    precision_mode: str
    profile: dict[str, Any]
    build_seconds: float
    engine_bytes: int
    layers: list[dict[str, str]]
    layers_source: str
    rewrites: list[str] = field(default_factory=list)
    timing_cache: dict[str, Any] = field(default_factory=dict)
    executed: bool = False
    runnable_here: bool = False
    execution_note: str = ""

    def layer_counts(self) -> Counter[str]:
        return Counter(layer["type"] for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- the ONNX graph: limits and native lowering ------------------------------------------


def _collecting_logger(trt: ModuleType) -> Any:
    class Collect(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg.strip())
            log.debug("TensorRT %s: %s", severity, msg)

    return Collect()


def _parser_errors(parser: Any) -> str:
    """Every error the parser recorded, ``node <name> (<op>): <message>`` joined by `` | ``."""
    lines = []
    for e in (parser.get_error(i) for i in range(parser.num_errors)):
        node = e.node_name() or (str(e.node()) if e.node() >= 0 else "")
        lines.append(f"node {node} ({e.node_operator()}): {e.desc()}" if node else e.desc())
    return " | ".join(lines)


def _load_onnx(parser: Any, onnx_path: Path) -> onnx.ModelProto:
    """The graph without its weights; an unreadable file reports the parser's messages too."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except DecodeError as exc:  # the parser's own words too
        parser.parse(onnx_path.read_bytes(), str(onnx_path))
        raise TensorRTError(
            f"{onnx_path} is not a valid ONNX model ({exc}); TensorRT's "
            f"parser: {_parser_errors(parser) or 'no messages'}"
        ) from None
    return model


def _load_network(parser: Any, network: Any, model: onnx.ModelProto, onnx_path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if model.ByteSize() < 2**31 - 1:  # external weights resolve against onnx_path
            ok = parser.parse(model.SerializeToString(), str(onnx_path))
        else:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            ok = parser.parse_from_file(str(path))
    if not ok:
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser failed: {_parser_errors(parser)}")
    if network.num_outputs == 0:
        raise TensorRTError(f"{onnx_path}: the parsed network has no outputs; is it an ONNX model?")


def timing_cache_supported(trt: ModuleType) -> bool:
    """``tensorrt_rtx`` >= 1.2 deprecates timing-cache calls as no-ops (and loading one needs
    CUDA); ``tensorrt`` loads, extends and serializes it."""
    return package_name(trt) != "tensorrt_rtx"


def _timing_cache(trt: ModuleType, config: Any, path: Path | None) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path) if path else None, "loaded": False, "saved": False}
    if path is not None and not timing_cache_supported(trt):
        info["note"] = "skipped: timing-cache calls are deprecated no-ops in TensorRT-RTX >= 1.2"
    elif path is not None:
        data = path.read_bytes() if path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), False)
        info["loaded"] = bool(data)
    return info


def _layers(trt: ModuleType, network: Any, serialized: Any) -> tuple[list[dict[str, str]], str]:
    import torch

    why = "no CUDA device to deserialize the engine on"
    if torch.cuda.is_available():
        engine = trt.Runtime(_collecting_logger(trt)).deserialize_cuda_engine(serialized)
        if engine is not None:
            text = engine.create_engine_inspector().get_engine_information(
                trt.LayerInformationFormat.JSON
            )
            return [
                {"name": la, "type": "?"}
                if isinstance(la, str)
                else {"name": la.get("Name", "?"), "type": str(la.get("LayerType", "?"))}
                for la in json.loads(text).get("Layers", [])
            ], "engine inspector"
        why = "the engine did not deserialize on this GPU"
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return [{"name": la.name, "type": la.type.name} for la in layers], f"network definition ({why})"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    profile: ShapeProfile | None = None,
    precision: Precision = "fp32",
    timing_cache: Path | None = None,
    package: str | None = None,
    lookup: str = "native",
) -> EngineInfo:
    """Parse ``onnx_path``, build a serialized engine and write it atomically to ``engine_path``.

    ``lookup`` ``native`` inlines the ``ultramem`` functions into TensorRT's own layers;
    ``plugin`` maps the nodes to the AOT plugins, which ``register_plugins`` must have
    registered (``compiler/pipeline.py`` does).
    """
    if lookup not in ("native", "plugin"):
        raise ValueError(f"lookup must be native or plugin, got {lookup!r}")
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    profile = profile or ShapeProfile()
    trt = import_tensorrt(package)
    name = package_name(trt)
    weak = hasattr(trt.BuilderFlag, "FP16")  # tensorrt 10.x only; removed in 11.x and RTX
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0 if weak or strong is None else 1 << int(strong))
    parser = trt.OnnxParser(network, logger)

    model = _load_onnx(parser, onnx_path)
    rewrites: list[str] = []
    if lookup == "plugin":
        model, count = plugin_onnx(model)
        if not count:
            raise TensorRTError(
                f"{onnx_path}: no ultramem:: node to run as a plugin (no layer fused, or the "
                "portable form); use --trt-mode native"
            )
        rewrites.append(f"{count} ultramem nodes mapped to the AOT plugins ({PLUGIN_NAMESPACE})")
    elif model.functions:  # native mode: TensorRT's layers run the ultramem ops' bodies
        model = inline_functions(model)
        rewrites.append("model-local functions inlined (ultramem ops as standard-op bodies)")
    check_limits(model)
    rewrites += lower_scatter_add(model)
    mode = "fp32 (TF32 off)"
    if precision != "fp32" and weak:
        mode = f"BuilderFlag.{precision.upper()}, weakly typed: TensorRT picks per layer"
    elif precision != "fp32":
        onnx.load_external_data_for_model(model, str(onnx_path.parent))
        rewrites += convert_precision(model, precision)
        mode = f"ONNX converted to {precision}, strongly typed: every float layer in {precision}"
    _load_network(parser, network, model, onnx_path)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision != "fp32" and weak:
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    shapes = builder.create_optimization_profile()
    onnx_dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for tensor in (network.get_input(i) for i in range(network.num_inputs)):
        dims = onnx_dims[tensor.name]
        ranges = [
            (d, d, d) if d >= 0 else profile.axis_range(dims[n].dim_param, n)
            for n, d in enumerate(tensor.shape)
        ]
        shapes.set_shape(tensor.name, *(tuple(r[j] for r in ranges) for j in range(3)))
    config.add_optimization_profile(shapes)
    cache_info = _timing_cache(trt, config, timing_cache)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: engine build failed: " + " | ".join(logger.errors))
    atomic_write(engine_path, bytes(serialized))
    if timing_cache is not None and "note" not in cache_info:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
        cache_info["saved"] = True
    layers, source = _layers(trt, network, serialized)
    runnable, why = can_run_engine(name)
    log.info("built %s in %.2f s, %d bytes, %s", engine_path, seconds, serialized.nbytes, name)
    return EngineInfo(
        engine_path=str(engine_path),
        package=name,
        version=trt.__version__,
        precision=precision,
        precision_mode=mode,
        profile=asdict(profile),
        build_seconds=round(seconds, 3),
        engine_bytes=int(serialized.nbytes),
        layers=layers,
        layers_source=source,
        rewrites=rewrites,
        timing_cache=cache_info,
        runnable_here=runnable,
        execution_note=why,
    )
