"""Every backend gets the thread count asked for: ONNX Runtime's options read back from its
session (its idle threads told not to spin), torch's set for the run and restored after."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ultramem.compiler.bench.run import torch_threads
from ultramem.compiler.formats import ONNX_FILE
from ultramem.compiler.onnx.runner import OnnxRunner
from ultramem.compiler.runners import Programs, RunContext, bench_backends


def _tiny_onnx(folder: Path) -> Path:
    """y = x + x: enough graph for a session, nothing to do with UltraMem."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / ONNX_FILE
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("threads", [1, 3])
def test_onnx_runtime_session_gets_the_threads(tmp_path: Path, threads: int) -> None:
    runner = OnnxRunner(_tiny_onnx(tmp_path), probe_selections=False, threads=threads)
    options = runner.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert torch.equal(runner((x,))[0][0], 2 * x)


def test_without_threads_onnx_runtime_keeps_its_defaults(tmp_path: Path) -> None:
    options = OnnxRunner(_tiny_onnx(tmp_path)).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (0, 0)


def test_the_bench_backend_records_what_its_session_runs_with(tmp_path: Path) -> None:
    _tiny_onnx(tmp_path)
    context = RunContext(Programs(), tmp_path, ["onnx"], threads=2)
    (backend,) = bench_backends(context, ["onnxruntime-cpu"])
    assert backend.run is not None
    assert backend.settings == {
        "intra_op_num_threads": 2,
        "inter_op_num_threads": 1,
        "allow_spinning": "0",
    }


def test_torch_threads_are_set_inside_and_restored_after() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other) as applied:
        assert applied == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with torch_threads(None) as applied:
        assert applied == before
