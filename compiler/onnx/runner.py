"""Run an ONNX file in ONNX Runtime, exposing its selection sites as extra outputs.

A site is a top-level TopK (values, indices, and the length of the axis it ran over, via
a Shape node on its input) or an ``ultramem::Retrieve`` node (scores, slots): the
unfused and the fused forms of a lookup, in graph order, as parity expects them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from ...kernels import RETRIEVE
from ..parity.selections import RetrieveRecord, SiteRecord, TopkRecord
from .domain import base_op

_RANKED_FROM = ("row_scores", "col_scores", "cores", "row_weight", "col_weight")


@dataclass
class _Site:
    kind: str  # "topk" or "retrieve"
    outputs: tuple[str, ...]  # topk: values, indices; retrieve: scores, slots, and inputs
    axis_shape: str = ""  # topk: output holding the shape of its input
    axis: int = -1


def _probe_sites(model: onnx.ModelProto) -> list[_Site]:
    """Add every site's tensors to the graph outputs (in memory); return the sites."""
    sites = []
    existing = {o.name for o in model.graph.output}

    def expose(name: str) -> None:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)

    for node in list(model.graph.node):
        if node.op_type == "TopK" and not node.domain and not _lowered_from_other_op(node):
            shape = f"{node.output[1]}__probe_shape"
            model.graph.node.append(helper.make_node("Shape", [node.input[0]], [shape]))
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            # what it ranked too: a half-precision near-tie reads the candidates' scores
            outputs = (node.output[0], node.output[1], node.input[0])
            sites.append(_Site("topk", outputs, shape, axis))
        elif base_op(node) == RETRIEVE.onnx_name:
            # what it ranked from too: the near-tie verdict recomputes the grid scores
            inputs = [node.input[RETRIEVE.input_names.index(n)] for n in _RANKED_FROM]
            sites.append(_Site("retrieve", (node.output[0], node.output[1], *inputs)))
        else:
            continue
        for name in (*sites[-1].outputs, sites[-1].axis_shape):
            if name:
                expose(name)
    return sites


# what torch.onnx records on each node: the namespace ends with the aten op it lowered
_SOURCE_KEY = "namespace"


def _lowered_from_other_op(node: onnx.NodeProto) -> bool:
    """A TopK that torch.onnx wrote for another op (``sort``, ``argsort``, ``kthvalue``:
    ONNX has no sort) ranks nothing a lookup selects; the torch graph has no top-k for it,
    so as a site it would misalign every lookup after it. A node without the record
    (a file from elsewhere) counts as a top-k."""
    source = next((p.value for p in node.metadata_props if p.key == _SOURCE_KEY), "")
    op = source.rsplit(": ", 1)[-1].strip() if source else ""
    return bool(op) and op.startswith("aten.") and not op.startswith("aten.topk")


# ONNX Runtime reads a location spelled so as a memory address in its own process, not a file
ORT_MEMORY_TAG = "_ORT_MEM_ADDR_"


def _sparse(tensor: onnx.SparseTensorProto) -> Iterator[onnx.TensorProto]:
    yield tensor.values
    yield tensor.indices


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """The tensors a node's attributes hold, those in its subgraphs (If, Loop, Scan) too."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from _sparse(attr.sparse_tensor)
        for sparse in attr.sparse_tensors:
            yield from _sparse(sparse)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse(sparse)
    for node in graph.node:
        yield from _node_tensors(node)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds, wherever a runtime may look for one: the graph, its
    subgraphs at any depth, model-local functions and training graphs."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for training in model.training_info:
        yield from _graph_tensors(training.initialization)
        yield from _graph_tensors(training.algorithm)


def external_data(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor whose bytes lie in another file. A
    tensor with external-data entries counts even when not marked external: which of
    the two a runtime trusts is its own business."""
    return [
        (tensor.name, next((e.value for e in tensor.external_data if e.key == "location"), ""))
        for tensor in model_tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data)
    ]


def plain_location(location: str) -> bool:
    """A location that names a file below the model's folder and nothing else."""
    path = PurePosixPath(location)
    return (
        bool(location)
        and not path.is_absolute()
        and ".." not in path.parts
        and ORT_MEMORY_TAG not in location
        and "\x00" not in location
    )


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Every external-data file a model names lies inside ``folder``: a file from
    elsewhere could point ONNX Runtime at any path on the machine. (An artifacts folder's
    manifest must also list each one, ``compiler/formats.py``; this holds a file run on
    its own.)"""
    root = folder.resolve()
    for name, location in external_data(model):
        if not plain_location(location) or root not in (root / location).resolve().parents:
            raise ValueError(f"tensor {name!r} names external data {location!r} outside {folder}")


class RecordedHashes:
    """The sha256 an artifacts folder's manifest records for its files, to hold what a
    runtime reads to what ``check`` verified before. Files of a folder with no manifest
    (an export's own staging) have no record and are not held to one."""

    def __init__(self, folder: Path | None, hashes: dict[str, str]) -> None:
        self.folder, self.hashes = folder, hashes

    @classmethod
    def around(cls, path: Path) -> RecordedHashes:
        from ..artifacts import ArtifactError, read_manifest

        for folder in (path.parent, path.parent.parent):  # a forward export, a program's
            if (folder / "manifest.json").exists():
                try:
                    manifest = read_manifest(folder)
                except ArtifactError:
                    return cls(None, {})  # not ours: nothing recorded
                listed = {
                    a["path"]: a["sha256"]
                    for a in manifest["artifacts"]
                    if isinstance(a, dict) and isinstance(a.get("path"), str)
                }
                return cls(folder, listed)
        return cls(None, {})

    def check(self, path: Path, data: bytes | None = None) -> None:
        from ..artifacts import ArtifactError, sha256_file

        if self.folder is None:
            return
        try:
            name = path.relative_to(self.folder).as_posix()
        except ValueError:
            return
        expected = self.hashes.get(name)
        if expected is None:
            return
        got = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        if got != expected:
            raise ArtifactError(
                f"{path} changed since the folder was checked (sha256 differs); export again"
            )


class OnnxRunner:
    """An ONNX Runtime session whose outputs include every selection site.

    The probe outputs are added to an in-memory copy; the file on disk is untouched.
    """

    def __init__(
        self,
        path: Path,
        providers: list[str] | None = None,
        probe_selections: bool = True,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        # weights stay in the file (or its external data): only the graph is loaded, from
        # the very bytes whose hash is checked (a file swapped after the folder's check
        # must not run in its place)
        recorded = RecordedHashes.around(path)
        data = path.read_bytes()
        recorded.check(path, data)
        model = onnx.load_from_string(data)
        check_external_data(model, path.parent)
        self.output_count = len(model.graph.output)
        self.sites = _probe_sites(model) if probe_selections else []
        self.input_names = [i.name for i in model.graph.input]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            # a benchmark's settings, the same for every backend: N threads for the
            # operators (the default, 0, is one per core), no second pool running nodes side
            # by side, and idle threads that sleep: spinning ones took a core from the
            # backend timed next (eager at 1 token, 3.4 -> 7.6 ms on 2 cores)
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the probed graph goes to ONNX Runtime from memory (the folder is only read);
        # external data resolves against the model's own folder
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(path.parent)
        )
        self.session = ort.InferenceSession(
            model.SerializeToString(),
            sess_options=options,
            providers=providers or ["CPUExecutionProvider"],
        )
        for _, location in external_data(model):  # ONNX Runtime has read them by now
            recorded.check(path.parent / location)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: tuple[Any, ...]) -> tuple[list[torch.Tensor], list[SiteRecord]]:
        feeds = {
            name: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            for name, x in zip(self.input_names, inputs, strict=True)
        }
        results = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        outputs = [torch.from_numpy(results[n]) for n in self.output_names[: self.output_count]]
        records: list[SiteRecord] = []
        for site in self.sites:
            tensors = [torch.from_numpy(results[name]) for name in site.outputs]
            if site.kind == "retrieve":
                records.append(RetrieveRecord(*tensors))
            else:
                shape = results[site.axis_shape]
                axis = site.axis % len(shape)
                size = int(shape[axis])
                records.append(TopkRecord(tensors[0], tensors[1], size, axis, tensors[2]))
        return outputs, records
