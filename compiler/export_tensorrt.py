"""TensorRT engines from ONNX with the lookup in TensorRT's own layers ("native" mode).

Works with ``tensorrt`` (10.x/11.x) and ``tensorrt_rtx``; where they differ:

* Precision. ``tensorrt`` 10.x has weak typing: ``fp16``/``bf16`` set ``BuilderFlag.FP16``
  /``BF16`` and TensorRT *may* pick such kernels per layer (I/O stays fp32). ``tensorrt`` 11.x
  and ``tensorrt_rtx`` are strongly typed and have no such flags (RTX 1.7's ``BuilderFlag``
  lacks FP16, BF16, INT8, FP8, OBEY_PRECISION_CONSTRAINTS): there ``fp16``/``bf16`` rewrite
  the ONNX before parsing (float weights, Casts and constants to the low type, Casts at the
  graph's float inputs and outputs so I/O stays fp32), what NVIDIA's ModelOpt AutoCast does
  for 11.x. ``fp32`` clears ``BuilderFlag.TF32`` (on by default in both): TF32 matmuls can
  flip near-tied top-k selections.
* Timing cache. ``tensorrt`` loads it when present and saves it after the build. In
  ``tensorrt_rtx`` (>= 1.2) timing-cache calls are deprecated no-ops, and loading one needs
  CUDA; it is skipped and the info says so.
* Layer list. ``Runtime.deserialize_cuda_engine`` needs a CUDA device (on a CPU machine
  ``tensorrt_rtx`` returns None, "CUDA driver version is insufficient"), so the engine
  inspector's list is used where an engine deserializes, else the parsed network's layers.

Native mode means no plugin. The parser of ``tensorrt_rtx`` rejects ScatterElements with a
reduction, and full ``tensorrt`` would use its ScatterElements plugin, so a
``reduction="add"`` node (the value pooling) is lowered to Equal/Where/ReduceSum over a
one-hot axis (memory: indices' size × the data's scatter-axis length). Known limits are
checked on the ONNX graph before building (``check_limits``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

PACKAGES = ("tensorrt", "tensorrt_rtx")
PIP_NAMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}
# ITopKLayer: K <= 3840; tensorrt_rtx 1.7 builds K=3840 and refuses 3841 at build time.
TOPK_MAX_K = 3840
# TensorRT-RTX 1.7 engines run on these (PLATFORMS.md; the runtime's own message on sm_90).
RTX_COMPUTE_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
EINSUM_LABELS = set("abcdefghijklmnopqrstuvwxyz,->. ")
EINSUM_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
PROTOBUF_LIMIT = 2**31 - 1
Precision = Literal["fp32", "fp16", "bf16"]
_LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


class TensorRTError(RuntimeError):
    """Parsing or building failed; the message carries every error TensorRT reported."""


class TensorRTLimitError(ValueError):
    """The ONNX graph breaks a known TensorRT limit; the message names the node and limit."""


def import_tensorrt(package: str | None = None) -> ModuleType:
    """``tensorrt`` or ``tensorrt_rtx``; ``None`` prefers ``tensorrt``, then ``tensorrt_rtx``."""
    if package is not None and package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES} or None, got {package!r}")
    for name in (package,) if package else PACKAGES:
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        if name == "tensorrt" and int(trt.__version__.split(".")[0]) < 10:
            raise TensorRTError(
                f"tensorrt {trt.__version__} is too old; pip install 'tensorrt>=10'"
            )
        return trt
    wanted = [package] if package else list(PACKAGES)
    pips = " or ".join(f"`pip install {PIP_NAMES[n]}`" for n in wanted)
    raise TensorRTError(f"no TensorRT package: {' / '.join(wanted)} not importable; {pips}")


def _package_name(trt: ModuleType) -> str:
    return "tensorrt_rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


def parse_range(text: str) -> tuple[int, int, int]:
    """``"1,64,256"`` -> (min, opt, max); one number means a static size."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected 'min,opt,max' integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"expected 'min,opt,max' with 1 <= min <= opt <= max, got {text!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of the dynamic axes; engines accept only shapes inside these ranges."""

    batch: tuple[int, int, int] = (1, 1, 8)
    tokens: tuple[int, int, int] = (1, 64, 256)

    def __post_init__(self) -> None:
        for name in ("batch", "tokens"):
            parse_range(",".join(str(v) for v in getattr(self, name)))

    @classmethod
    def parse(cls, batch: str | None = None, tokens: str | None = None) -> ShapeProfile:
        default = cls()
        return cls(
            batch=parse_range(batch) if batch else default.batch,
            tokens=parse_range(tokens) if tokens else default.tokens,
        )

    def axis_range(self, name: str, position: int) -> tuple[int, int, int]:
        """By the ONNX dim name (``batch``/``tokens``), else position 0/1 as capture names them."""
        key = name if name in ("batch", "tokens") else {0: "batch", 1: "tokens"}.get(position)
        if key is None:
            raise TensorRTError(
                f"dynamic axis {position} ({name or 'unnamed'}) is neither batch nor tokens; "
                "export with static shapes for the other axes"
            )
        return getattr(self, key)


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
    execution_note: str = ""

    def layer_counts(self) -> Counter[str]:
        return Counter(layer["type"] for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def can_run_engine(package: str) -> tuple[bool, str]:
    """Whether an engine of ``package`` can execute here, and why not."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if package == "tensorrt_rtx" and capability not in RTX_COMPUTE_CAPABILITIES:
        supported = " ".join(f"{a}.{b}" for a, b in RTX_COMPUTE_CAPABILITIES)
        return False, (
            f"TensorRT-RTX engines do not run on compute capability {capability[0]}."
            f"{capability[1]} (supported: {supported})"
        )
    return True, f"CUDA device with compute capability {capability[0]}.{capability[1]}"


# ---- ONNX graph: limits and native lowering -------------------------------------------------


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Small constant tensors (initializers and Constant nodes) by name: TopK's K."""
    values = {t.name: t for t in model.graph.initializer}
    found: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        for attr in node.attribute if node.op_type == "Constant" else ():
            if attr.name == "value":
                values[node.output[0]] = attr.t
            elif attr.name in ("value_int", "value_ints"):
                found[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
    for name, t in values.items():
        if t.data_location != TensorProto.EXTERNAL and np.prod(t.dims) <= 16:
            found[name] = numpy_helper.to_array(t)
    return found


def _types_and_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """Element type and dims (ints or symbolic names) of every tensor shape inference knows."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    known = {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        tensor = info.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        known[info.name] = (tensor.elem_type, dims if tensor.HasField("shape") else [])
    return known


def check_limits(model: onnx.ModelProto) -> None:
    """Raise ``TensorRTLimitError`` for every known limit the graph breaks, in one line."""
    constants = _constants(model)
    types = _types_and_shapes(model)
    problems: list[str] = []
    for node in model.graph.node:
        where = f"{node.name or node.output[0]} ({node.op_type})"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "TopK":
            k = attrs.get("k") if len(node.input) < 2 else constants.get(node.input[1])
            if k is not None and int(np.asarray(k).max()) > TOPK_MAX_K:
                problems.append(
                    f"{where}: K = {int(np.asarray(k).max())} > {TOPK_MAX_K}, TensorRT's TopK limit"
                )
        elif node.op_type == "Einsum":
            equation = attrs["equation"].decode()
            if set(equation) - EINSUM_LABELS:
                problems.append(
                    f"{where}: equation {equation!r} uses labels other than a-z, "
                    "which TensorRT's Einsum refuses"
                )
            for name in node.input:
                if types.get(name, (TensorProto.FLOAT,))[0] not in EINSUM_TYPES:
                    problems.append(
                        f"{where}: input {name} is not fp32/fp16/bf16, "
                        "TensorRT's Einsum takes floating point only"
                    )
        elif node.op_type == "ScatterElements" and attrs.get("reduction", b"none") != b"none":
            reduction = attrs["reduction"].decode()
            why = (
                _scatter_mismatch(node, types) if reduction == "add" else f"reduction {reduction!r}"
            )
            if why:
                problems.append(
                    f"{where}: {why}; native TensorRT has no ScatterElements "
                    "reduction (only 'add' with matching shapes is lowered)"
                )
    if problems:
        raise TensorRTLimitError("; ".join(problems))


def _scatter_mismatch(node: onnx.NodeProto, types: dict[str, Any]) -> str | None:
    """Why a ScatterElements(add) cannot be lowered: data/indices differ off the scatter axis."""
    data, indices, updates = (types.get(name, (0, []))[1] for name in node.input)
    if not data or not indices or len(data) != len(indices) or indices != updates:
        return "shapes of data, indices and updates unknown or unequal in rank"
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(data)
    if any(d != i for n, (d, i) in enumerate(zip(data, indices, strict=True)) if n != axis):
        return f"indices {indices} differ from data {data} off axis {axis}"
    return None


def lower_scatter_add(model: onnx.ModelProto) -> list[str]:
    """ScatterElements(data, idx, upd, axis=a, reduction=add) ->
    data + ReduceSum_j(Where(idx[.., j, ..] == e, upd[.., j, ..], 0)) with e on axis a."""
    notes: list[str] = []
    nodes: list[onnx.NodeProto] = []
    types: dict[str, Any] = {}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "ScatterElements" or attrs.get("reduction") != b"add":
            nodes.append(node)
            continue
        types = types or _types_and_shapes(model)
        if why := _scatter_mismatch(node, types):
            raise TensorRTLimitError(f"{node.name} (ScatterElements): {why}")
        rank = len(types[node.input[0]][1])
        axis = attrs.get("axis", 0) % rank
        nodes.extend(_one_hot_sum(model, node, axis, rank))
        notes.append(f"{node.name}: ScatterElements(add) -> Equal/Where/ReduceSum over axis {axis}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return notes


def _one_hot_sum(
    model: onnx.ModelProto, node: onnx.NodeProto, axis: int, rank: int
) -> list[onnx.NodeProto]:
    p = f"{node.name or node.output[0]}/lower"
    data, idx, upd = node.input
    shape = [1] * (rank + 1)
    shape[axis] = -1
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.int64), f"{p}/zero"),
            numpy_helper.from_array(np.array(1, np.int64), f"{p}/one"),
            numpy_helper.from_array(np.array(shape, np.int64), f"{p}/grid"),
            numpy_helper.from_array(np.array([axis], np.int64), f"{p}/axis"),
            numpy_helper.from_array(np.array([axis + 1], np.int64), f"{p}/sum_axis"),
        ]
    )
    n = helper.make_node
    return [
        n("Shape", [data], [f"{p}/n1"], start=axis, end=axis + 1),
        n("Squeeze", [f"{p}/n1"], [f"{p}/n"]),
        n("Range", [f"{p}/zero", f"{p}/n", f"{p}/one"], [f"{p}/range"]),
        n("Reshape", [f"{p}/range", f"{p}/grid"], [f"{p}/slots"]),
        n("Cast", [idx], [f"{p}/idx64"], to=TensorProto.INT64),
        n("Less", [f"{p}/idx64", f"{p}/zero"], [f"{p}/negative"]),  # ONNX allows idx < 0
        n("Add", [f"{p}/idx64", f"{p}/n"], [f"{p}/wrapped"]),
        n("Where", [f"{p}/negative", f"{p}/wrapped", f"{p}/idx64"], [f"{p}/idx"]),
        n("Unsqueeze", [f"{p}/idx", f"{p}/axis"], [f"{p}/idx_u"]),
        n("Equal", [f"{p}/idx_u", f"{p}/slots"], [f"{p}/hit"]),
        n("Unsqueeze", [upd, f"{p}/axis"], [f"{p}/upd_u"]),
        n("CastLike", [f"{p}/zero", upd], [f"{p}/zero_t"]),
        n("Where", [f"{p}/hit", f"{p}/upd_u", f"{p}/zero_t"], [f"{p}/picked"]),
        n("ReduceSum", [f"{p}/picked", f"{p}/sum_axis"], [f"{p}/summed"], keepdims=0),
        n("Add", [data, f"{p}/summed"], [node.output[0]], name=f"{p}/add"),
    ]


def convert_precision(model: onnx.ModelProto, precision: Precision) -> list[str]:
    """Float32 weights, Casts, constants and value infos to fp16/bf16; graph I/O stays fp32."""
    low = _LOW[precision]
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(_lower_tensor(tensor, low))
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        if node.op_type == "ConstantOfShape" and not node.attribute:  # default: fp32 zeros
            node.attribute.append(
                helper.make_attribute(
                    "value", _lower_tensor(numpy_helper.from_array(np.zeros(1, np.float32)), low)
                )
            )
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = low
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_lower_tensor(attr.t, low))
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(attr), np.float32)
                attr.CopyFrom(
                    helper.make_attribute(
                        "value", _lower_tensor(numpy_helper.from_array(value), low)
                    )
                )
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = low
    head: list[onnx.NodeProto] = []
    for info in graph.input:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            _rename_uses(graph, info.name, f"{info.name}/low")
            head.append(helper.make_node("Cast", [info.name], [f"{info.name}/low"], to=low))
    tail: list[onnx.NodeProto] = []
    for info in graph.output:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            _rename_uses(graph, info.name, f"{info.name}/low", outputs=True)
            tail.append(helper.make_node("Cast", [f"{info.name}/low"], [info.name], to=1))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return [f"ONNX converted to {precision} (graph I/O kept fp32)"]


def _lower_tensor(tensor: onnx.TensorProto, low: int) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    dtype = np.float16 if low == TensorProto.FLOAT16 else ml_dtypes.bfloat16
    return numpy_helper.from_array(array.astype(dtype), tensor.name)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str, outputs: bool = False) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        if outputs:
            node.output[:] = [new if o == old else o for o in node.output]


# ---- build ----------------------------------------------------------------------------------


def _collecting_logger(trt: ModuleType) -> Any:
    class Collect(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg.strip())
                log.debug("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.debug("TensorRT warning: %s", msg)

    return Collect()


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse(trt: ModuleType, parser: Any, model: onnx.ModelProto, source: Path) -> None:
    if model.ByteSize() < PROTOBUF_LIMIT:
        ok = parser.parse(model.SerializeToString(), str(source))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            ok = parser.parse_from_file(str(path))
    if ok:
        return
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = getattr(err, "node_name", lambda: "")() or f"#{err.node()}"
        lines.append(f"node {node} ({getattr(err, 'node_operator', lambda: '?')()}): {err.desc()}")
    raise TensorRTError(f"{source}: ONNX parser failed: " + " | ".join(lines or ["no detail"]))


def _timing_cache(trt: ModuleType, config: Any, path: Path | None) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path) if path else None, "loaded": False}
    if path is None:
        return info
    if _package_name(trt) == "tensorrt_rtx":
        info["note"] = "skipped: timing-cache calls are deprecated no-ops in TensorRT-RTX >= 1.2"
        return info
    data = path.read_bytes() if path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(data), False)
    info["loaded"] = bool(data)
    return info


def _layers(trt: ModuleType, network: Any, serialized: Any) -> tuple[list[dict[str, str]], str]:
    ok, why = can_run_engine(_package_name(trt))
    if ok or "compute capability" in why:
        engine = trt.Runtime(_collecting_logger(trt)).deserialize_cuda_engine(serialized)
        if engine is not None:
            text = engine.create_engine_inspector().get_engine_information(
                trt.LayerInformationFormat.JSON
            )
            layers = [
                {"name": la, "type": "?"}
                if isinstance(la, str)
                else {"name": la.get("Name", "?"), "type": str(la.get("LayerType", "?"))}
                for la in json.loads(text).get("Layers", [])
            ]
            return layers, "engine inspector"
        why = "the engine did not deserialize on this GPU"
    layers = [
        {"name": network.get_layer(i).name, "type": network.get_layer(i).type.name}
        for i in range(network.num_layers)
    ]
    return layers, f"network definition before the build ({why})"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    profile: ShapeProfile | None = None,
    precision: Precision = "fp32",
    timing_cache: Path | None = None,
    package: str | None = None,
) -> EngineInfo:
    """Parse ``onnx_path``, build a serialized engine and write it atomically to ``engine_path``."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    profile = profile or ShapeProfile()
    trt = import_tensorrt(package)
    name = _package_name(trt)
    model = onnx.load(str(onnx_path), load_external_data=False)
    check_limits(model)
    rewrites = lower_scatter_add(model)
    weak = hasattr(trt.BuilderFlag, "FP16")  # tensorrt 10.x; gone in 11.x and RTX
    if precision == "fp32":
        mode = "fp32 (TF32 off)"
    elif weak:
        mode = f"BuilderFlag.{precision.upper()} on a weakly typed network (TensorRT may choose)"
    else:
        onnx.load_external_data_for_model(model, str(onnx_path.parent))
        rewrites += convert_precision(model, precision)
        mode = f"ONNX converted to {precision}, strongly typed network"

    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if weak or strong is None else 1 << int(strong))
    parser = trt.OnnxParser(network, logger)
    _parse(trt, parser, model, onnx_path)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.clear_flag(trt.BuilderFlag.TF32)
    if precision != "fp32" and weak:
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    opt_profile = builder.create_optimization_profile()
    onnx_dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = onnx_dims[tensor.name]
        shapes = [
            [d] * 3 if d >= 0 else profile.axis_range(dims[n].dim_param, n)
            for n, d in enumerate(tensor.shape)
        ]
        opt_profile.set_shape(tensor.name, *(tuple(s[j] for s in shapes) for j in range(3)))
    config.add_optimization_profile(opt_profile)
    cache_info = _timing_cache(trt, config, timing_cache)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: engine build failed: " + " | ".join(logger.errors))
    _write_atomic(engine_path, serialized)
    if timing_cache is not None and "note" not in cache_info:
        _write_atomic(timing_cache, config.get_timing_cache().serialize())
        cache_info["saved"] = True
    layers, source = _layers(trt, network, serialized)
    runnable, why = can_run_engine(name)
    log.info("built %s in %.2f s (%d bytes) with %s", engine_path, seconds, serialized.nbytes, name)
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
        executed=False,
        execution_note=f"built only; {'an engine can run here' if runnable else why}",
    )
