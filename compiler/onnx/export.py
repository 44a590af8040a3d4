"""Export a captured program to ONNX, with the batch and token axes named.

``torch.onnx.export`` (the dynamo exporter) names dynamic axes after its internal
symbols (``s27``); deployers want ``batch`` and ``tokens``, so the symbols of the
captured input axes are renamed throughout the graph, and outputs get stable names
(``output`` or ``output_<i>``), or the names the program gave its tensors (a generation
program's ``past_key_values.0.key`` and ``present.0.key``, as Optimum names them).

Fused lookups become ``ultramem::Retrieve`` / ``ultramem::Aggregate`` nodes carrying
model-local functions (``domain``, ``bodies``); form ``portable`` inlines those functions, for
tools that read no functions.

Weights over ``EXTERNAL_DATA_BYTES`` go to one external-data file beside the model
(``model.onnx.data``; protobuf caps a file at 2 GB). The exporter writes the weights
straight from the program's tensors, and the renaming works on the graph loaded
*without* its weights, so no step holds a second serialized copy of them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch.export import ExportedProgram

from ..capture import CaptureResult
from ..inputs.errors import OpsetError
from ..inputs.options import DEFAULT_OPSET
from ..inputs.options import ONNX_FORMS as FORMS
from .domain import attach_functions, base_op, inline_functions, translation_table
from .runner import external_data

log = logging.getLogger(__name__)


EXTERNAL_DATA_BYTES = 1 << 30


def weight_bytes(program: ExportedProgram) -> int:
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _without_unsound_rewrites() -> Iterator[None]:
    """torch.onnx's optimizer without onnxscript's reshape-MatMul-reshape rules.

    They drop the reshapes around a MatMul whenever MatMul's broadcasting gives the same
    output shape, a check of shapes alone: ``reshape([1,2,2,16,12] -> [2,32,12])`` then a
    batched product with ``[2,12,24]`` became one MatMul whose broadcast pairs the weight's
    batch with the wrong dim (ONNX Runtime's output off by 1.3 where torch's was exact).
    The rules only remove two reshapes, so leaving them out costs nothing measurable."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _broadcast_to_matmul
    except ImportError:  # another onnxscript layout: nothing to take out
        yield
        return
    defaults = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    unsound = set(getattr(_broadcast_to_matmul, "rules", ()))
    if defaults is None or not unsound:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in defaults if r not in unsound)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = defaults


def export_onnx(
    capture: CaptureResult,
    path: Path,
    *,
    program: ExportedProgram | None = None,
    opset: int = DEFAULT_OPSET,
    form: str = "custom",
) -> list[Path]:
    """Write ``path`` (and its external data when large); return the files written.

    ``program`` defaults to the captured one; pass the rewritten program to export it
    with the capture's axis names.
    """
    if form not in FORMS:
        raise ValueError(f"ONNX form must be one of {', '.join(FORMS)}, got {form!r}")
    program = program if program is not None else capture.program
    external = weight_bytes(program) > EXTERNAL_DATA_BYTES
    # its version converter logs a traceback when it cannot reach the opset; whether it
    # did is checked below and said in one line
    converter_log = logging.getLogger("onnxscript.version_converter")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR + 1)
    try:
        with _without_unsound_rewrites():
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=opset,
                verbose=False,
                custom_translation_table=translation_table(),
            )
    finally:
        converter_log.setLevel(level)
    onnx_program.save(str(path), external_data=external)
    del onnx_program
    model = onnx.load(str(path), load_external_data=False)
    written = {i.version for i in model.opset_import if i.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise OpsetError(
            f"--opset {opset}: torch.onnx could not write this model at opset {opset} (its "
            f"version converter failed; it wrote {sorted(written)}): use --opset "
            f"{max(written)} or later"
        )
    _name_axes(model, capture)
    if capture.input_names:
        _name_inputs(model, capture.input_names)
    _name_outputs(model, capture.output_names)
    attach_functions(model)
    if form == "portable":
        model = inline_functions(model)
    onnx.save_model(model, str(path))
    return [path, *external_data_files(model, path.parent)]


def external_data_files(model: onnx.ModelProto, directory: Path) -> list[Path]:
    """The external-data files ``model`` names: those ``check`` will require listed
    (``runner.external_data``, wherever a tensor lies)."""
    return [directory / loc for loc in sorted({loc for _, loc in external_data(model)})]


def _name_axes(model: onnx.ModelProto, capture: CaptureResult) -> None:
    rename: dict[str, str] = {}
    inputs = list(model.graph.input)
    for axis in capture.axes:
        if not axis.dynamic or axis.input_index >= len(inputs):
            continue
        dims = inputs[axis.input_index].type.tensor_type.shape.dim
        if axis.dim < len(dims) and dims[axis.dim].dim_param:
            rename[dims[axis.dim].dim_param] = axis.name
    if not rename:
        return
    value_infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for info in value_infos:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _name_inputs(model: onnx.ModelProto, names: list[str]) -> None:
    inputs = list(model.graph.input)
    if len(inputs) != len(names):
        raise ValueError(f"the ONNX graph has {len(inputs)} inputs, the program names {len(names)}")
    rename = {i.name: new for i, new in zip(inputs, names, strict=True) if i.name != new}
    for node in _all_nodes(model.graph):
        node.input[:] = [rename.get(i, i) for i in node.input]
    for info in [*model.graph.output, *model.graph.value_info]:
        info.name = rename.get(info.name, info.name)
    for i in inputs:
        i.name = rename.get(i.name, i.name)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (an If's branches read outer names)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                nodes += _all_nodes(sub)
    return nodes


def _name_outputs(model: onnx.ModelProto, given: list[str] | None = None) -> None:
    outputs = list(model.graph.output)
    names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    if given is not None:
        if len(given) != len(outputs):
            raise ValueError(
                f"the ONNX graph has {len(outputs)} outputs, the program names {len(given)}"
            )
        names = list(given)
    # an output that is a weight or an input (a model returning a constant buffer) is not
    # produced by a node: it gets one, an Identity, rather than a renamed initializer
    unproduced = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for out, new in zip(outputs, names, strict=True):
        old = out.name
        if old == new:
            continue
        if old in unproduced:
            model.graph.node.append(helper.make_node("Identity", [old], [new], name=new))
        else:
            for node in _all_nodes(model.graph):
                node.output[:] = [new if o == old else o for o in node.output]
                node.input[:] = [new if i == old else i for i in node.input]
        out.name = new


def count_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per op (``ultramem`` variants counted under their op)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        op = base_op(node) or node.op_type
        key = op if not node.domain else f"{node.domain}::{op}"
        counts[key] = counts.get(key, 0) + 1
    return counts
