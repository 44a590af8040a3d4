"""Run a serialized TensorRT engine on CUDA tensors (where the installed TensorRT can).

Not exercised on the machines this project was built on: TensorRT-RTX engines do not
run on the H100 (sm 9.0) and the full ``tensorrt`` was not obtainable; see README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .package import import_tensorrt


class EngineRunner:
    def __init__(self, engine_path: Path, package: str | None = None) -> None:
        trt = import_tensorrt(package)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        # an engine file may embed plugin libraries; a folder from elsewhere must not run them
        runtime.engine_host_code_allowed = False
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.inputs = [n for n, i in zip(names, is_input, strict=True) if i]
        self.outputs = [n for n, i in zip(names, is_input, strict=True) if not i]

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        feeds = [x.cuda() for x in inputs]
        for name, x in zip(self.inputs, feeds, strict=True):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return [o.cpu() for o in outs]
