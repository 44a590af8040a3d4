"""TensorRT export in native mode: engines build on a CPU machine with ``tensorrt_rtx``.

What runs here: parsing, the ONNX-side limit checks and lowering (numerics checked with
ONNX Runtime), precision conversion and real engine builds. What does not: running an
engine, which needs a GPU that the package supports (the ``gpu`` + ``trt`` test).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ultramem.compiler.capture import CaptureResult, capture
from ultramem.compiler.onnx.export import export_onnx
from ultramem.compiler.rewrite import rewrite
from ultramem.compiler.tensorrt import build
from ultramem.compiler.tensorrt.build import build_engine, timing_cache_supported
from ultramem.compiler.tensorrt.package import (
    TensorRTError,
    can_run_engine,
    import_tensorrt,
    package_name,
)
from ultramem.compiler.tensorrt.prepare import (
    Precision,
    TensorRTLimitError,
    check_limits,
    convert_precision,
    lower_scatter_add,
)
from ultramem.compiler.tensorrt.profile import ShapeProfile, parse_range
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM

HAS_TRT = any(importlib.util.find_spec(name) for name in ("tensorrt", "tensorrt_rtx"))
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="no TensorRT package: pip install tensorrt-rtx")
# The bundled-style model has max_seq_len 64: an engine must not admit more tokens.
PROFILE = ShapeProfile(batch=(1, 2, 4), tokens=(1, 16, 64))
LMs = dict[int, tuple[UltraMemLM, Path]]  # memory layers -> (model, its ONNX)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _topk_model(k: int, computed: bool = False) -> onnx.ModelProto:
    """TopK over [2, 5000]; ``computed`` makes K an Add of two constants (not a literal)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5000])
    out = helper.make_tensor_value_info("values", TensorProto.FLOAT, None)
    if computed:
        inits = [numpy_helper.from_array(np.array([k // 2]), n) for n in ("half_a", "half_b")]
        nodes = [helper.make_node("Add", ["half_a", "half_b"], ["k"], name="k_sum")]
    else:
        inits, nodes = [numpy_helper.from_array(np.array([k]), "k")], []
    nodes.append(helper.make_node("TopK", ["x", "k"], ["values", "idx"], name="big_topk"))
    return _model(nodes, [x], [out], inits)


def _captured_lm(layers: int) -> tuple[UltraMemLM, CaptureResult, tuple[torch.Tensor]]:
    """The bundled-style LM with ``layers`` memory layers, captured; and its example."""
    cfg = LMConfig(
        memory=UltraMemConfig(heads=2, cores=2, expansion=4),
        memory_layers=dict.fromkeys(range(layers), 1),
        max_seq_len=64,
    )
    model = UltraMemLM(cfg).eval()
    example = (torch.randint(0, 64, (2, 16)),)
    return model, capture(model, example, max_tokens=64), example


@pytest.fixture(scope="module")
def lm_onnx(tmp_path_factory: pytest.TempPathFactory) -> LMs:
    """ONNX of the bundled-style LM with 1 and 2 memory layers (unfused)."""
    torch.manual_seed(0)
    out: dict[int, tuple[UltraMemLM, Path]] = {}
    for layers in (1, 2):
        model, cap, _ = _captured_lm(layers)
        path = tmp_path_factory.mktemp(f"lm{layers}") / "model.onnx"
        export_onnx(cap, path)
        out[layers] = (model, path)
    return out


@pytest.fixture(scope="module")
def lm_fused_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Custom-domain ONNX (ultramem::Retrieve/Aggregate with function bodies) of the same
    LMs after fusion: what ``ultramem export`` writes."""
    torch.manual_seed(0)
    out: dict[int, Path] = {}
    for layers in (1, 2):
        model, cap, example = _captured_lm(layers)
        fused = rewrite(model, cap, example)
        assert len(fused.fused_layers) == layers
        path = tmp_path_factory.mktemp(f"fused{layers}") / "model.onnx"
        export_onnx(cap, path, program=fused.program)
        out[layers] = path
    return out


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- profiles and packages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,64,256", (1, 64, 256)), ("32", (32, 32, 32)), (" 1, 1 ,8", (1, 1, 8))],
)
def test_parse_range(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["1,2", "0,1,2", "4,2,8", "a,b,c", "1,2,3,4", ""])
def test_parse_range_refuses_bad_strings(text: str) -> None:
    with pytest.raises(ValueError, match="min,opt,max"):
        parse_range(text)


def test_shape_profile_defaults_parse_and_validation() -> None:
    assert ShapeProfile() == ShapeProfile(batch=(1, 1, 8), tokens=(1, 64, 256))
    assert ShapeProfile.parse(tokens="1,16,64") == ShapeProfile(tokens=(1, 16, 64))
    assert ShapeProfile.parse("2,4,8").batch == (2, 4, 8)
    assert PROFILE.axis_range("tokens", 5) == (1, 16, 64)
    assert PROFILE.axis_range("s27", 0) == (1, 2, 4)  # unnamed: by position, as capture does
    with pytest.raises(ValueError):
        ShapeProfile(batch=(4, 1, 8))
    with pytest.raises(TensorRTError, match="neither batch nor tokens"):
        PROFILE.axis_range("heads", 2)


def test_import_tensorrt_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(TensorRTError, match="pip install tensorrt-rtx"):
        import_tensorrt("tensorrt_rtx")
    with pytest.raises(
        TensorRTError, match=r"`pip install tensorrt` or `pip install tensorrt-rtx`"
    ):
        import_tensorrt(None)
    with pytest.raises(ValueError, match="package must be one of"):
        import_tensorrt("tensorrt_llm")


def test_can_run_engine_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert can_run_engine("tensorrt_rtx") == (
        False,
        "no CUDA device (torch.cuda.is_available() is False)",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    ok, why = can_run_engine("tensorrt_rtx")
    assert not ok and "9.0" in why and "8.0 8.6 8.9 12.0 12.1" in why
    assert can_run_engine("tensorrt")[0]  # full TensorRT has no such list
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 9))
    assert can_run_engine("tensorrt_rtx")[0]


# ---- limits and lowering on the ONNX graph (no TensorRT needed) --------------------------


def test_topk_k_limit_is_one_line_naming_node_and_limit() -> None:
    with pytest.raises(TensorRTLimitError) as err:
        check_limits(_topk_model(4000))
    message = str(err.value)
    assert "\n" not in message
    assert "big_topk (TopK)" in message and "K = 4000" in message and "K <= 3840" in message
    check_limits(_topk_model(3840))  # the limit itself is allowed


def test_einsum_limits() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.INT64, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [3, 4])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    node = helper.make_node("Einsum", ["a", "b"], ["y"], name="mm", equation="IJ,JK->IK")
    with pytest.raises(TensorRTLimitError) as err:
        check_limits(_model([node], [a, b], [out]))
    assert "outside a-z" in str(err.value) and "fp32/fp16/bf16 inputs only" in str(err.value)


def _scatter_model(reduction: str, index_shape: list[int]) -> onnx.ModelProto:
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [3, 4, 5])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, index_shape)
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, index_shape)
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 4, 5])
    node = helper.make_node(
        "ScatterElements", ["data", "idx", "upd"], ["out"], name="pool", axis=1, reduction=reduction
    )
    return _model([node], [data, idx, upd], [out])


def test_scatter_add_lowering_matches_onnxruntime_with_duplicates_and_negative_indices() -> None:
    model = _scatter_model("add", [3, 9, 5])
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    assert lower_scatter_add(lowered) == [
        "pool: ScatterElements(add) -> Equal/Where/ReduceSum on axis 1"
    ]
    assert "ScatterElements" not in {n.op_type for n in lowered.graph.node}
    onnx.checker.check_model(lowered, full_check=True)
    rng = np.random.default_rng(0)
    feeds = {
        "data": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "idx": rng.integers(-4, 4, (3, 9, 5)),  # 9 updates into 4 slots, negatives wrap
        "upd": rng.standard_normal((3, 9, 5)).astype(np.float32),
    }
    expected = feeds["data"].copy()
    np.add.at(expected, (np.arange(3)[:, None, None], feeds["idx"] % 4, np.arange(5)), feeds["upd"])
    for m in (model, lowered):
        (got,) = ort.InferenceSession(m.SerializeToString()).run(None, feeds)
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("reduction", "index_shape", "why"),
    [("max", [3, 9, 5], "'max'"), ("add", [3, 9, 2], "off axis 1")],
)
def test_scatter_that_cannot_be_lowered_is_refused(
    reduction: str, index_shape: list[int], why: str
) -> None:
    model = _scatter_model(reduction, index_shape)
    with pytest.raises(TensorRTLimitError, match=why) as err:
        check_limits(model)
    assert "pool (ScatterElements)" in str(err.value)


def test_lm_lowering_keeps_onnxruntime_output(lm_onnx: LMs) -> None:
    _, path = lm_onnx[2]
    model = onnx.load(str(path))
    check_limits(model)
    before = sum(n.op_type == "ScatterElements" for n in model.graph.node)
    lowered = onnx.load(str(path))
    assert len(lower_scatter_add(lowered)) == before == 2
    tokens = {"tokens": np.random.default_rng(0).integers(0, 64, (3, 20))}
    (ref,) = ort.InferenceSession(model.SerializeToString()).run(None, tokens)
    (got,) = ort.InferenceSession(lowered.SerializeToString()).run(None, tokens)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_convert_precision_keeps_io_fp32(precision: Precision) -> None:
    """A constant mask of -3.4e38 stays finite in fp16; ConstantOfShape's default fp32 too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    inits = [
        numpy_helper.from_array(np.full((2, 3), -3.4e38, np.float32), "mask"),
        numpy_helper.from_array(np.array([2, 3]), "shape"),
    ]
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Max", ["x", "mask"], ["m"]),
        helper.make_node("Add", ["m", "zeros"], ["y"]),
    ]
    model = _model(nodes, [x], [y], inits)
    convert_precision(model, precision)
    onnx.checker.check_model(model, full_check=True)
    assert [i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]] == [
        TensorProto.FLOAT,
        TensorProto.FLOAT,
    ]
    if precision == "fp16":  # ONNX Runtime has fp16 Max/Add on CPU, not bf16
        feeds = {"x": np.array([[1.0, -2.0, 3.5], [0.1, 60000.0, -1e9]], np.float32)}
        (got,) = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
        # -1e9 becomes -inf in fp16 at run time; the saturated mask (-65504) wins the Max
        expected = [[1.0, -2.0, 3.5], [np.float16(0.1), 60000.0, -65504.0]]
        np.testing.assert_array_equal(got, np.array(expected, np.float32))


# ---- engine builds ----------------------------------------------------------------------


@needs_trt
@pytest.mark.parametrize("layers", [1, 2])
def test_engine_builds_with_lookup_layers(lm_onnx: LMs, tmp_path: Path, layers: int) -> None:
    _, path = lm_onnx[layers]
    engine = tmp_path / "model.engine"
    info = build_engine(path, engine, profile=PROFILE)
    assert engine.is_file() and engine.stat().st_size == info.engine_bytes > 0
    assert _leftovers(tmp_path) == []
    counts = info.layer_counts()
    names = [layer["name"] for layer in info.layers]
    if info.layers_source.startswith("network definition"):  # no GPU: the parsed network
        assert counts["TOPK"] == 3 * layers  # row, column and grid top-k per memory layer
        assert counts["EINSUM"] == 5 * layers
        assert sum(n.startswith("node_gather") for n in names) >= 5 * layers  # GatherElements
        pooled = [n for n in names if "scatter_add" in n and n.endswith("/lower/summed")]
        assert len(pooled) == layers
        assert counts["GATHER"] > 0 and counts["REDUCE"] > 0
    assert len(info.rewrites) == layers
    assert info.profile == {"batch": (1, 2, 4), "tokens": (1, 16, 64)}
    assert info.executed is False and info.execution_note
    assert info.precision_mode == "fp32 (TF32 off)"


@needs_trt
@pytest.mark.parametrize("layers", [1, 2])
def test_fused_engine_runs_the_function_bodies_in_native_layers(
    lm_fused_onnx: dict[int, Path], tmp_path: Path, layers: int
) -> None:
    """The custom-domain file builds: its functions are inlined into TensorRT's own layers."""
    info = build_engine(lm_fused_onnx[layers], tmp_path / "model.engine", profile=PROFILE)
    assert info.engine_bytes > 0 and _leftovers(tmp_path) == []
    assert info.rewrites == ["model-local functions inlined (ultramem ops as standard-op bodies)"]
    if info.layers_source.startswith("network definition"):
        by_op: dict[str, Counter[str]] = {"Retrieve": Counter(), "Aggregate": Counter()}
        for layer in info.layers:
            op = layer["name"].split("/")[0]
            if op in by_op:
                by_op[op][layer["type"]] += 1
        retrieve, aggregate = by_op["Retrieve"], by_op["Aggregate"]
        assert retrieve["TOPK"] == 3 * layers  # row, column and grid top-k
        assert retrieve["MATRIX_MULTIPLY"] == 2 * layers  # the Tucker-core grid
        assert aggregate["GATHER"] >= layers and aggregate["MATRIX_MULTIPLY"] == layers
        assert not any(layer["type"] == "SCATTER" for layer in info.layers)


@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_builds(lm_onnx: LMs, tmp_path: Path, precision: Precision) -> None:
    _, path = lm_onnx[1]
    info = build_engine(path, tmp_path / "e.engine", profile=PROFILE, precision=precision)
    assert precision in info.precision_mode and info.engine_bytes > 0
    if not hasattr(import_tensorrt(None).BuilderFlag, "FP16"):  # strongly typed package
        assert any(f"converted to {precision}" in r for r in info.rewrites)


@needs_trt
def test_topk_limit_raised_before_build(tmp_path: Path) -> None:
    path = tmp_path / "topk.onnx"
    onnx.save(_topk_model(4000), path)
    with pytest.raises(TensorRTLimitError, match="K <= 3840"):
        build_engine(path, tmp_path / "topk.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topk.onnx"]


@needs_trt
def test_builder_errors_are_gathered_and_old_engine_kept(tmp_path: Path) -> None:
    """A K computed in the graph escapes the ONNX check; the builder's error is reported."""
    path, engine = tmp_path / "topk.onnx", tmp_path / "topk.engine"
    engine.write_bytes(b"previous engine")
    onnx.save(_topk_model(4000, computed=True), path)
    with pytest.raises(TensorRTError, match=r"engine build failed: .*3840"):
        build_engine(path, engine)
    assert engine.read_bytes() == b"previous engine" and _leftovers(tmp_path) == []


@needs_trt
@pytest.mark.parametrize("kind", ["truncated", "unknown op"])
def test_corrupt_onnx_reports_parser_messages(lm_onnx: LMs, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.onnx"
    if kind == "truncated":
        path.write_bytes(lm_onnx[1][1].read_bytes()[:5000])
        expected = "Failed to parse the ONNX model"
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        onnx.save(
            _model([helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")], [x], [y]), path
        )
        expected = "node mystery (NoSuchOp)"
    with pytest.raises(TensorRTError, match="parser") as err:
        build_engine(path, tmp_path / "bad.engine")
    assert expected in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


@needs_trt
def test_engine_write_is_atomic_when_rename_fails(
    lm_onnx: LMs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"previous engine")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        build_engine(lm_onnx[1][1], engine, profile=PROFILE)
    assert engine.read_bytes() == b"previous engine" and _leftovers(tmp_path) == []


@needs_trt
def test_timing_cache_written_and_reused(
    lm_onnx: LMs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``tensorrt_rtx`` the cache is a documented no-op; the file round trip (write after
    the first build, load before the second) is still exercised through its API."""
    trt = import_tensorrt(None)
    cache = tmp_path / "timing.cache"
    if not timing_cache_supported(trt):
        info = build_engine(
            lm_onnx[1][1], tmp_path / "a.engine", profile=PROFILE, timing_cache=cache
        )
        assert "no-ops" in info.timing_cache["note"] and not cache.exists()
        monkeypatch.setattr(build, "timing_cache_supported", lambda trt: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # RTX: "timing cache ... no-ops"
        first = build_engine(
            lm_onnx[1][1], tmp_path / "a.engine", profile=PROFILE, timing_cache=cache
        )
        assert first.timing_cache == {"path": str(cache), "loaded": False, "saved": True}
        assert cache.stat().st_size > 0
        second = build_engine(
            lm_onnx[1][1], tmp_path / "b.engine", profile=PROFILE, timing_cache=cache
        )
    assert second.timing_cache["loaded"] and second.timing_cache["saved"]
    assert _leftovers(tmp_path) == []


@pytest.mark.gpu
@pytest.mark.trt
def test_engine_runs_and_matches_eager(lm_onnx: LMs, tmp_path: Path) -> None:
    trt = import_tensorrt(None)
    runnable, why = can_run_engine(package_name(trt))
    if not runnable:
        pytest.skip(why)
    model, path = lm_onnx[2]
    info = build_engine(path, tmp_path / "model.engine", profile=PROFILE)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        Path(info.engine_path).read_bytes()
    )
    context = engine.create_execution_context()
    tokens = torch.randint(0, 64, (2, 16), device="cuda")
    context.set_input_shape("tokens", tuple(tokens.shape))
    out = torch.empty(tuple(context.get_tensor_shape("output")), device="cuda")
    context.set_tensor_address("tokens", tokens.data_ptr())
    context.set_tensor_address("output", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    with torch.no_grad():
        expected = model(tokens.cpu())
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


@needs_trt
def test_plugin_lookup_without_ultramem_nodes_is_refused(lm_onnx: LMs, tmp_path: Path) -> None:
    _, unfused = lm_onnx[1]
    with pytest.raises(TensorRTError, match="no ultramem:: node to run as a plugin"):
        build_engine(unfused, tmp_path / "e.engine", profile=PROFILE, lookup="plugin")
    assert list(tmp_path.iterdir()) == []
