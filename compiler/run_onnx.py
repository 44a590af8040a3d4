"""Run an ONNX file in ONNX Runtime, exposing its TopK outputs as selection sites."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ultramem.compiler.selections import TopkRecord


class OnnxRunner:
    """An ONNX Runtime session whose outputs include every TopK's values and indices.

    The probe outputs are added to an in-memory copy; the file on disk is untouched.
    """

    def __init__(
        self, path: Path, providers: list[str] | None = None, probe_selections: bool = True
    ) -> None:
        import onnxruntime as ort

        # weights stay in the file (or its external data): only the graph is loaded
        model = onnx.load(str(path), load_external_data=False)
        self.output_count = len(model.graph.output)
        self.topk_outputs: list[tuple[str, str]] = []
        existing = {o.name for o in model.graph.output}
        for node in model.graph.node if probe_selections else []:
            if node.op_type == "TopK" and not node.domain:
                values, indices = node.output[0], node.output[1]
                self.topk_outputs.append((values, indices))
                for name in (values, indices):
                    if name not in existing:
                        model.graph.output.append(onnx.ValueInfoProto(name=name))
                        existing.add(name)
        self.input_names = [i.name for i in model.graph.input]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The probed copy sits beside the original so relative external-data paths resolve.
        with tempfile.NamedTemporaryFile(suffix=".onnx", dir=path.parent) as probed:
            onnx.save_model(model, probed.name)
            self.session = ort.InferenceSession(
                probed.name, sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(
        self, inputs: tuple[Any, ...], topk_input_sizes: list[int] | None = None
    ) -> tuple[list[torch.Tensor], list[TopkRecord]]:
        feeds = {
            name: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            for name, x in zip(self.input_names, inputs, strict=True)
        }
        results = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        outputs = [torch.from_numpy(results[n]) for n in self.output_names[: self.output_count]]
        records = []
        for i, (values, indices) in enumerate(self.topk_outputs):
            size = topk_input_sizes[i] if topk_input_sizes and i < len(topk_input_sizes) else -1
            records.append(
                TopkRecord(
                    torch.from_numpy(results[values]), torch.from_numpy(results[indices]), size
                )
            )
        return outputs, records
