"""The TensorRT AOT plugins: what can be checked without TensorRT, and an engine where it runs.

On the CPU machine: every bundled kernel takes TensorRT's AOT parameter order; the launch
expressions the plugin hands TensorRT, evaluated with integers, equal the launcher's grid
and scalars; they stay symbolic in the dynamic dims; and the ONNX prepared for the parser
sends the ``ultramem`` nodes down TensorRT-RTX's real plugin path (which then finds no
creator: RTX cannot build plugin engines). The engine build itself needs ``tensorrt`` >= 10.7
and a GPU (``trt`` + ``gpu``): it has not run on any machine here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from ultramem.compiler.tensorrt.plugin_onnx import plugin_onnx
from ultramem.kernels import DOMAIN, op_spec
from ultramem.plugins.launcher import resolve_dims, scalar_values
from ultramem.plugins.metadata import BundleManifest, KernelMetadata
from ultramem.plugins.trt_plugin import attribute_order, launch_expressions, layout_problem

DYNAMIC = {"T": 7, "R": 33}


def _shapes(meta: KernelMetadata) -> dict[str, list[int]]:
    """Concrete input shapes for ``meta``: its fixed dims, and odd sizes for the dynamic ones."""
    shapes: dict[str, list[int]] = {}
    for name, dim in meta.dims.items():
        if dim.tensor is None or dim.axis is None:
            continue
        shape = shapes.setdefault(dim.tensor, [1] * 4)
        shape[dim.axis] = dim.value if dim.value is not None else DYNAMIC[name]
    return shapes


def test_every_bundled_kernel_takes_tensorrts_aot_order(bundle: BundleManifest) -> None:
    ops = {meta.op for meta in bundle.kernels}
    assert ops == {"retrieve", "aggregate"}
    for meta in bundle.kernels:
        assert layout_problem(meta) is None, layout_problem(meta)


def test_a_kernel_in_another_order_is_named(bundle: BundleManifest) -> None:
    meta = next(m for m in bundle.kernels if m.op == "retrieve")
    outputs = [a for a in meta.args if a.kind == "pointer" and a.tensor in ("scores", "slots")]
    outputs_first = (*outputs, *(a for a in meta.args if a not in outputs))
    problem = layout_problem(dataclasses.replace(meta, args=outputs_first))
    assert problem is not None and meta.entry in problem and "AOT" in problem


def test_launch_expressions_with_integers_match_the_launcher(bundle: BundleManifest) -> None:
    for meta in bundle.kernels:
        shapes = _shapes(meta)
        dims = resolve_dims(meta, shapes)
        grid, scalars = launch_expressions(meta, lambda t, a, shapes=shapes: shapes[t][a])
        assert grid == meta.launch_grid(dims), meta.name
        assert scalars == list(scalar_values(meta, dims).values()), meta.name


@dataclasses.dataclass(frozen=True)
class Sym:
    """A stand-in for TensorRT's shape expressions: records the arithmetic done on it."""

    text: str

    def _op(self, sign: str, other: Any) -> Sym:
        return Sym(f"({self.text}{sign}{other.text if isinstance(other, Sym) else other})")

    def __add__(self, other: Any) -> Sym:
        return self._op("+", other)

    def __sub__(self, other: Any) -> Sym:
        return self._op("-", other)

    def __mul__(self, other: Any) -> Sym:
        return self._op("*", other)

    def __floordiv__(self, other: Any) -> Sym:
        return self._op("//", other)


def test_launch_expressions_stay_symbolic_in_the_dynamic_dims(bundle: BundleManifest) -> None:
    for meta in bundle.kernels:
        grid, scalars = launch_expressions(meta, lambda tensor, axis: Sym(f"{tensor}[{axis}]"))
        tokens = meta.dims["T"]
        assert grid[0] == Sym(f"{tokens.tensor}[{tokens.axis}]")  # one program row per token
        assert all(type(g) is int for g in grid[1:])  # heads / value blocks: fixed
        symbolic = [s for s in scalars if isinstance(s, Sym)]
        if meta.op == "retrieve":
            assert not symbolic  # strides of contiguous [T, H, n, r]: T never enters
        elif meta.constexprs["HAS_ROW_MAP"] or meta.constexprs["HAS_GROUP_MAP"]:
            assert symbolic == [Sym("values[0]")]  # the table's rows; S is the maps' width
        else:
            assert symbolic == [Sym("values[0]"), Sym("values[0]")]  # rows, and slot count


@pytest.fixture(scope="module")
def custom_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ultramem.cli.main import cli

    out = tmp_path_factory.mktemp("plugin") / "artifacts"
    result = CliRunner().invoke(cli, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "model.onnx"


def test_plugin_onnx_routes_the_nodes_to_plugins(custom_onnx: Path) -> None:
    model = onnx.load(str(custom_onnx))
    prepared, count = plugin_onnx(model)
    assert count == 2 and not prepared.functions and len(model.functions) == 2  # a copy
    for node in (n for n in prepared.graph.node if n.domain == DOMAIN):
        attrs = [a.name for a in node.attribute]
        op = op_spec(node.op_type)
        assert attrs == [*attribute_order(op), "plugin_namespace", "plugin_version", "aot"]
        assert node.overload == ""
        values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert values["plugin_namespace"] == b"ultramem" and values["aot"] == 1
        assert len(node.input) == len(op.inputs)
        if node.op_type == "Aggregate":  # the bundled model's shuffle: both maps
            assert values["has_row_map"] == values["has_group_map"] == 1


def test_aggregate_without_maps_gets_stand_ins() -> None:
    node = helper.make_node("Aggregate", ["v", "w", "s"], ["p"], domain=DOMAIN, name="agg")
    graph = helper.make_graph([node], "g", [], [])
    prepared, _ = plugin_onnx(helper.make_model(graph))
    (out,) = prepared.graph.node
    assert list(out.input) == ["v", "w", "s", "agg__no_row_map", "agg__no_group_map"]
    for stand_in in prepared.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(stand_in), [[0]])
    values = {a.name: helper.get_attribute_value(a) for a in out.attribute}
    assert values["has_row_map"] == values["has_group_map"] == 0
    assert (values["groups"], values["pooling"]) == (1, b"add")


@pytest.mark.skipif(not importlib.util.find_spec("tensorrt_rtx"), reason="needs tensorrt_rtx")
def test_tensorrt_rtx_parser_takes_the_plugin_path(custom_onnx: Path) -> None:
    """The real parser looks each node up as a plugin (not as a function to inline); RTX
    has no creator for it, which is why plugin mode is refused there."""
    import tensorrt_rtx as trt

    prepared, _ = plugin_onnx(onnx.load(str(custom_onnx)))
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(prepared.SerializeToString(), str(custom_onnx))
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    assert {e.node_operator() for e in errors} == {"Retrieve", "Aggregate"}
    assert all("Plugin not found" in e.desc() for e in errors)


def _full_tensorrt_with_plugins() -> bool:
    if not importlib.util.find_spec("tensorrt"):
        return False
    return importlib.util.find_spec("tensorrt.plugin") is not None


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not _full_tensorrt_with_plugins(), reason="needs tensorrt >= 10.7")
def test_plugin_engine_builds_for_the_bundled_model(tmp_path: Path) -> None:
    from ultramem.cli.main import cli

    out = tmp_path / "plugin"
    args = ["export", "--format", "onnx,tensorrt", "--trt-mode", "plugin", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["layer_counts"].get("PLUGIN_V3", 0) == 2
    assert any(a["path"].endswith(".ptx") for a in manifest["artifacts"])
