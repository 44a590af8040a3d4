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

Native means no plugin. ``tensorrt_rtx``'s parser rejects ScatterElements with a reduction
and full ``tensorrt`` would hand it to its ScatterElements plugin, so ``reduction="add"`` (the
value pooling) is lowered to Equal/Where/ReduceSum over a one-hot axis; it holds indices'
size × the data's scatter-axis length elements (16 × 4 per value element here). Limits
TensorRT would hit are checked on the ONNX graph first (``check_limits``).
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
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ultramem.compiler.onnx_ops import inline_functions
from ultramem.plugins.trt_plugin import PLUGIN_NAMESPACE, plugin_onnx

log = logging.getLogger(__name__)

PACKAGES = ("tensorrt", "tensorrt_rtx")
PIP_NAMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}
TOPK_MAX_K = 3840  # ITopKLayer; tensorrt_rtx 1.7 builds K = 3840 and refuses 3841
# TensorRT-RTX 1.7 engines run on these only (its runtime's message on sm_90, PLATFORMS.md).
RTX_COMPUTE_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
EINSUM_CHARS = set("abcdefghijklmnopqrstuvwxyz,->. ")  # the parser refuses "IJ,JK->IK"
EINSUM_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
FP16_MAX = 65504.0
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


def parse_range(text: str) -> tuple[int, int, int]:
    """``"1,64,256"`` -> (min, opt, max); one number means a static size."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected 'min,opt,max' integers, got {text!r}") from None
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"expected 'min,opt,max' with 1 <= min <= opt <= max, got {text!r}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of the dynamic axes; an engine accepts only shapes inside them. Keep
    ``tokens`` within what the capture admits (the model's ``max_seq_len``)."""

    batch: tuple[int, int, int] = (1, 1, 8)
    tokens: tuple[int, int, int] = (1, 64, 256)

    def __post_init__(self) -> None:
        for axis in (self.batch, self.tokens):
            parse_range(",".join(map(str, axis)))

    @classmethod
    def parse(cls, batch: str | None = None, tokens: str | None = None) -> ShapeProfile:
        default = cls()
        return cls(
            batch=parse_range(batch) if batch else default.batch,
            tokens=parse_range(tokens) if tokens else default.tokens,
        )

    def axis_range(self, name: str, position: int) -> tuple[int, int, int]:
        """By the ONNX dim name, else by position (0 batch, 1 tokens) as capture assigns them."""
        key = name if name in ("batch", "tokens") else {0: "batch", 1: "tokens"}.get(position)
        if key is None:
            raise TensorRTError(
                f"dynamic axis {position} ({name or 'unnamed'}) is neither batch nor tokens; "
                "export with the other axes static"
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
    runnable_here: bool = False
    execution_note: str = ""

    def layer_counts(self) -> Counter[str]:
        return Counter(layer["type"] for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


# ---- the ONNX graph: limits and native lowering ------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """Element type and dims (ints or symbolic names) of every tensor shape inference knows."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    known = {t.name: (t.data_type, list(t.dims)) for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        tensor = info.type.tensor_type
        known[info.name] = (
            tensor.elem_type,
            [d.dim_param or d.dim_value for d in tensor.shape.dim],
        )
    return known


def _small_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute if node.op_type == "Constant" else ():
            if attr.name == "value":
                tensors[node.output[0]] = attr.t
    return {
        name: numpy_helper.to_array(t)
        for name, t in tensors.items()
        if t.data_location != TensorProto.EXTERNAL and np.prod(t.dims) <= 16
    }


def check_limits(model: onnx.ModelProto) -> None:
    """Raise ``TensorRTLimitError`` naming each node that breaks a known limit, on one line.

    Confirmed with ``tensorrt_rtx`` 1.7 and onnx-tensorrt's operator notes: TopK's K <= 3840
    (any axis works, so the axis is not checked; a K computed at run time is left to the
    builder); Einsum takes fp32/fp16/bf16 inputs and lower-case labels (diagonals, ellipsis
    and three inputs parse); ScatterElements has no reduction (``add`` is lowered when the
    shapes allow). GatherElements showed no limit beyond ONNX's (any axis, smaller indices).
    """
    constants, types = _small_constants(model), _tensor_types(model)
    problems: list[str] = []
    for node in model.graph.node:
        where, attrs = f"{node.name or node.output[0]} ({node.op_type})", _attrs(node)
        if node.op_type == "TopK":
            k = attrs.get("k") if len(node.input) < 2 else constants.get(node.input[1])
            if k is not None and int(np.max(k)) > TOPK_MAX_K:
                problems.append(
                    f"{where}: K = {int(np.max(k))} exceeds TensorRT's TopK limit K <= {TOPK_MAX_K}"
                )
        elif node.op_type == "Einsum":
            equation = attrs["equation"].decode()
            if set(equation) - EINSUM_CHARS:
                problems.append(
                    f"{where}: equation {equation!r} has labels outside a-z, "
                    "which TensorRT's Einsum refuses"
                )
            if any(types.get(i, (0,))[0] not in {0, *EINSUM_TYPES} for i in node.input):
                problems.append(f"{where}: TensorRT's Einsum takes fp32/fp16/bf16 inputs only")
        elif node.op_type == "ScatterElements" and attrs.get("reduction", b"none") != b"none":
            reduction = attrs["reduction"].decode()
            why = _scatter_mismatch(node, types) if reduction == "add" else f"{reduction!r}"
            if why:
                problems.append(
                    f"{where}: TensorRT has no ScatterElements reduction and "
                    f"{why} cannot be lowered (only 'add' with matching shapes)"
                )
    if problems:
        raise TensorRTLimitError("; ".join(problems))


def _scatter_mismatch(node: onnx.NodeProto, types: dict[str, Any]) -> str | None:
    """Why ScatterElements(add) cannot become a one-hot sum: shapes differ off its axis."""
    data, indices, updates = (types.get(name, (0, []))[1] for name in node.input)
    if not data or len(data) != len(indices) or indices != updates:
        return "'add' with unknown or unequal shapes of data, indices and updates"
    axis = _attrs(node).get("axis", 0) % len(data)
    off_axis = [(d, i) for n, (d, i) in enumerate(zip(data, indices, strict=True)) if n != axis]
    if any(d != i or d in (0, "") for d, i in off_axis):  # 0: a dim shape inference left open
        return f"'add' with indices {indices} not provably like data {data} off axis {axis}"
    return None


def lower_scatter_add(model: onnx.ModelProto) -> list[str]:
    """ScatterElements(data, idx, upd, axis=a, reduction=add) ->
    data + ReduceSum_j Where(idx[.., j, ..] == e, upd[.., j, ..], 0), e along axis a."""
    notes: list[str] = []
    nodes: list[onnx.NodeProto] = []
    types: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type != "ScatterElements" or _attrs(node).get("reduction") != b"add":
            nodes.append(node)
            continue
        types = types or _tensor_types(model)
        if why := _scatter_mismatch(node, types):
            raise TensorRTLimitError(f"{node.name} (ScatterElements): {why} cannot be lowered")
        rank = len(types[node.input[0]][1])
        axis = _attrs(node).get("axis", 0) % rank
        nodes.extend(_one_hot_sum(model, node, axis, rank))
        notes.append(f"{node.name}: ScatterElements(add) -> Equal/Where/ReduceSum on axis {axis}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return notes


def _one_hot_sum(
    model: onnx.ModelProto, node: onnx.NodeProto, axis: int, rank: int
) -> list[onnx.NodeProto]:
    p = f"{node.name or node.output[0]}/lower"
    data, idx, upd = node.input
    grid = [1] * (rank + 1)
    grid[axis] = -1
    for key, value in {"zero": 0, "one": 1, "grid": grid, "axis": [axis], "j": [axis + 1]}.items():
        model.graph.initializer.append(
            numpy_helper.from_array(np.array(value, np.int64), f"{p}/{key}")
        )

    def make(op: str, inputs: list[str], out: str, **kw: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=out, **kw)

    return [
        make("Shape", [data], f"{p}/n1", start=axis, end=axis + 1),
        make("Squeeze", [f"{p}/n1"], f"{p}/n"),
        make("Range", [f"{p}/zero", f"{p}/n", f"{p}/one"], f"{p}/range"),
        make("Reshape", [f"{p}/range", f"{p}/grid"], f"{p}/slots"),
        make("Cast", [idx], f"{p}/idx64", to=TensorProto.INT64),
        make("Less", [f"{p}/idx64", f"{p}/zero"], f"{p}/negative"),  # ONNX allows idx < 0
        make("Add", [f"{p}/idx64", f"{p}/n"], f"{p}/wrapped"),
        make("Where", [f"{p}/negative", f"{p}/wrapped", f"{p}/idx64"], f"{p}/idx"),
        make("Unsqueeze", [f"{p}/idx", f"{p}/axis"], f"{p}/idx_u"),
        make("Equal", [f"{p}/idx_u", f"{p}/slots"], f"{p}/hit"),
        make("Unsqueeze", [upd, f"{p}/axis"], f"{p}/upd_u"),
        make("CastLike", [f"{p}/zero", upd], f"{p}/zero_t"),
        make("Where", [f"{p}/hit", f"{p}/upd_u", f"{p}/zero_t"], f"{p}/picked"),
        make("ReduceSum", [f"{p}/picked", f"{p}/j"], f"{p}/summed", keepdims=0),
        helper.make_node("Add", [data, f"{p}/summed"], [node.output[0]], name=f"{p}/add"),
    ]


def convert_precision(model: onnx.ModelProto, precision: Precision) -> list[str]:
    """fp32 weights, Casts, constants and value infos to fp16/bf16; graph I/O stays fp32.

    fp16 saturates finite values at ±65504 (a -3.4e38 mask fill stays finite). Einsum in
    bf16 is outside ONNX's type list (the full checker refuses it), but TensorRT takes it.
    """
    low, graph = _LOW[precision], model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(_lower(numpy_helper.to_array(tensor), low, tensor.name))
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        if node.op_type == "ConstantOfShape" and not node.attribute:  # default: fp32 zeros
            node.attribute.append(helper.make_attribute("value", _lower(np.zeros(1), low)))
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = low
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_lower(numpy_helper.to_array(attr.t), low, attr.t.name))
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(attr))
                attr.CopyFrom(helper.make_attribute("value", _lower(value, low)))
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = low
    head, tail = [], []
    for info, is_output in [*((i, False) for i in graph.input), *((o, True) for o in graph.output)]:
        if info.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{info.name}/{precision}"
        for node in graph.node:
            node.input[:] = [inner if i == info.name else i for i in node.input]
            if is_output:
                node.output[:] = [inner if o == info.name else o for o in node.output]
        if is_output:
            tail.append(helper.make_node("Cast", [inner], [info.name], to=TensorProto.FLOAT))
        else:
            head.append(helper.make_node("Cast", [info.name], [inner], to=low))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return [f"ONNX converted to {precision} (graph I/O kept fp32)"]


def _lower(array: np.ndarray, low: int, name: str = "") -> onnx.TensorProto:
    array = array.astype(np.float32)
    if low == TensorProto.FLOAT16:
        finite = np.clip(array, -FP16_MAX, FP16_MAX)
        return numpy_helper.from_array(
            np.where(np.isfinite(array), finite, array).astype(np.float16), name
        )
    return numpy_helper.from_array(array.astype(ml_dtypes.bfloat16), name)


# ---- the build ------------------------------------------------------------------------------


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


def _write_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name beside ``path``, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _write_atomic(engine_path, serialized)
    if timing_cache is not None and "note" not in cache_info:
        _write_atomic(timing_cache, config.get_timing_cache().serialize())
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
