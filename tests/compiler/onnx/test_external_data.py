"""Which files an ONNX model makes its runtime read, wherever the model names them.

``external_data`` walks every place a tensor can sit: the graph's initializers and sparse
initializers, node attributes, the bodies of If/Loop/Scan at any depth, model-local
functions. ``check_reads`` holds each to the manifest's list, relative to the model's own
subfolder (``prefill/`` of an older generation export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ultramem.compiler.artifacts import ArtifactError
from ultramem.compiler.formats import check_reads
from ultramem.compiler.onnx.runner import check_external_data, external_data


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.zeros(2, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _body(tensor: onnx.TensorProto, name: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [2])
    node = helper.make_node("Constant", [], [f"{name}_out"], value=tensor)
    return helper.make_graph([node], name, [], [out])


def _model_naming_everywhere() -> onnx.ModelProto:
    """One external tensor in each place a runtime may look for one."""
    inner_if = helper.make_node(
        "If", ["c"], ["deep"],
        then_branch=_body(_external("deep_then", "deep.bin"), "t"),
        else_branch=_body(_external("deep_else", "deep.bin"), "e"),
    )  # fmt: skip
    loop_body = helper.make_graph(
        [inner_if], "loop", [], [helper.make_tensor_value_info("deep", 1, [2])]
    )
    sparse = helper.make_sparse_tensor(
        _external("sparse_values", "sparse.bin"), numpy_helper.from_array(np.zeros(1, np.int64)),
        [4],
    )  # fmt: skip
    function = helper.make_function(
        "local", "f", [], ["y"],
        [helper.make_node("Constant", [], ["y"], value=_external("in_function", "fn.bin"))],
        [helper.make_opsetid("", 18)],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["a"], value=_external("attribute", "attr.bin")),
            helper.make_node("Loop", ["", "c"], [], body=loop_body),
        ],
        "g", [], [],
        initializer=[_external("weight", "model.onnx.data")],
        sparse_initializer=[sparse],
    )  # fmt: skip
    return helper.make_model(graph, functions=[function])


def test_every_place_a_tensor_sits_is_walked() -> None:
    assert sorted(external_data(_model_naming_everywhere())) == [
        ("attribute", "attr.bin"),
        ("deep_else", "deep.bin"),
        ("deep_then", "deep.bin"),
        ("in_function", "fn.bin"),
        ("sparse_values", "sparse.bin"),
        ("weight", "model.onnx.data"),
    ]


@pytest.mark.parametrize(
    "location",
    ["../x.bin", "/etc/passwd", "", "*/_ORT_MEM_ADDR_/*", "a/../../x.bin"],
    ids=["parent", "absolute", "empty", "ort-memory-address", "climbs"],
)
def test_a_file_run_on_its_own_reads_nothing_outside_its_folder(
    tmp_path: Path, location: str
) -> None:
    graph = helper.make_graph([], "g", [], [], initializer=[_external("w", location)])
    with pytest.raises(ValueError, match="'w' names external data"):
        check_external_data(helper.make_model(graph), tmp_path)


def _write(folder: Path, name: str, location: str) -> None:
    graph = helper.make_graph([], "g", [], [], initializer=[_external("w", location)])
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(helper.make_model(graph).SerializeToString())


def test_external_data_resolves_against_the_models_own_subfolder(tmp_path: Path) -> None:
    _write(tmp_path, "prefill/model.onnx", "./model.onnx.data")
    markers = {"onnx": ["prefill/model.onnx"]}
    check_reads(tmp_path, markers, ["prefill/model.onnx", "prefill/model.onnx.data"])
    # the same name at the top of the folder is another file
    with pytest.raises(ArtifactError, match=r"tensor 'w' reads './model.onnx.data'"):
        check_reads(tmp_path, markers, ["prefill/model.onnx", "model.onnx.data"])


def test_a_listed_name_that_is_an_ort_memory_address_is_refused(tmp_path: Path) -> None:
    """ONNX Runtime reads this location as an address in its own memory, not as a file:
    listing (and planting) a file of that name does not make it one."""
    tag = "*/_ORT_MEM_ADDR_/*"
    _write(tmp_path, "model.onnx", tag)
    with pytest.raises(ArtifactError, match="_ORT_MEM_ADDR_"):
        check_reads(tmp_path, {"onnx": ["model.onnx"]}, ["model.onnx", tag])


def test_a_file_that_does_not_parse_names_nothing(tmp_path: Path) -> None:
    """Its runtime cannot load it either: that stage fails (exit 1), as before."""
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf \xff\xff")
    check_reads(tmp_path, {"onnx": ["model.onnx"]}, ["model.onnx"])
