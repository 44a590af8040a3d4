"""The errors a user's input can cause, each a one-line answer with exit code 2.

They live here, apart from the modules that raise them, so that the CLI can catch them
without importing torch, ONNX or Triton (``--help`` and bad input answer at once).
"""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A MODEL or weights argument that cannot be used; the message says what to do."""


class ArtifactError(ValueError):
    """An output folder or artifact that cannot be used; the message says what to do."""


class CaptureError(ValueError):
    """A model that ``torch.export`` cannot capture in any mode; the message says why."""


class OptionError(ValueError):
    """An export option that cannot be honoured; the message names the flag."""


class GenerationError(ValueError):
    """A model or option the generation task cannot honour; one line saying why."""


class OpsetError(ValueError):
    """An opset torch.onnx cannot write the model in; the message names one it can."""


class TensorRTError(RuntimeError):
    """Parsing or building failed; the message carries every error TensorRT reported."""


class TensorRTLimitError(ValueError):
    """The ONNX graph breaks a known TensorRT limit; the message names the node and limit."""


# what a user's input can be wrong in: each carries a one-line message saying what to do
INPUT_ERRORS: tuple[type[Exception], ...] = (
    ModelLoadError,
    ArtifactError,
    CaptureError,
    OptionError,
    GenerationError,
    OpsetError,
    TensorRTError,
    TensorRTLimitError,
)
