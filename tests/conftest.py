"""Shared fixtures: every test starts from the same global RNG state."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import ultramem.models

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which
# triton.jit picks when a kernel is defined: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Workers of pytest-xdist share the cores: each takes its share of torch's threads, so
# that two workers on two cores do not run four.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    # Inductor caches compiled code by the graph's hash in one folder: two workers
    # compiling the same program at once (the bundled model's AOTInductor package) write
    # the same files, and one packages the other's half-written JSON. One cache each.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{worker}"),
    )


@pytest.fixture(autouse=True)
def seed_torch() -> None:
    """Seed per test, not at import, so a test's random inputs do not depend on test order."""
    torch.manual_seed(0)


def _full_tensorrt() -> bool:
    """The full ``tensorrt`` package imports (``tensorrt_rtx``, or a stub wheel that cannot
    load libnvinfer, is not it)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt
    except Exception:  # a stub or a missing library: any import failure means no TensorRT
        return False
    return hasattr(tensorrt, "Builder")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, ``gpu``-marked tests where there is no CUDA device and
    ``trt``-marked ones where the full ``tensorrt`` package is missing (a GPU machine
    without TensorRT runs its gpu tests, and a trt test there must skip, not fail)."""
    skips = {}
    if any(item.get_closest_marker("trt") for item in items) and not _full_tensorrt():
        skips["trt"] = pytest.mark.skip(reason="needs the full `tensorrt` package")
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)
                break


# ---- one small kernel bundle per test session (tests/plugins, tests/compiler/parity) -----

BUNDLE_SMS = (80, 90, 120)


def bundle_calls() -> list[tuple[Any, dict[str, Any]]]:
    """Fused-op calls whose kernels the session bundle holds, bound by contract name.

    A small fp32 lookup that takes the other branch of every constexpr (relu, scatter, no
    maps, a value dim that is not a power of two: the last column block is partial), and the
    bundled model's layer (``models/builtin/facts.json``: a [1, n²] int32 row and group map,
    G = E, as the fusion pass binds it) in fp32 and bf16: 6 kernels.
    """
    from ultramem.kernels import AGGREGATE, RETRIEVE

    facts = Path(ultramem.models.__file__).parent / "builtin" / "facts.json"
    mem = json.loads(facts.read_text())["config"]["memory"]
    calls = [
        (RETRIEVE, RETRIEVE.bind(*_retrieve_tensors(1, 16, 2, 1, torch.float32), 4, 4, "relu")),
        (AGGREGATE, AGGREGATE.bind(
            torch.randn(32, 24), torch.randn(3, 1, 4, 1), torch.zeros(3, 1, 4, dtype=torch.int64),
            groups=2, pooling="scatter",
        )),
    ]  # fmt: skip
    h, n, m, k, e = mem["heads"], mem["n_keys"], mem["topm"], mem["topk"], mem["expansion"]
    cores, dim, rows = mem["cores"], mem["value_dim"], mem["n_keys"] ** 2 // mem["expansion"]
    for dtype in (torch.float32, torch.bfloat16):
        tensors = _retrieve_tensors(h, n, mem["tucker_rank"], cores, dtype)
        calls.append((RETRIEVE, RETRIEVE.bind(*tensors, m, k, mem["score_activation"])))
        index_map = torch.zeros(1, n * n, dtype=torch.int32)
        calls.append((AGGREGATE, AGGREGATE.bind(
            torch.randn(rows, dim, dtype=dtype), torch.randn(3, h, k, cores, dtype=dtype),
            torch.zeros(3, h, k, dtype=torch.int64), index_map, index_map, e, "add",
        )))  # fmt: skip
    return calls


def _retrieve_tensors(
    heads: int, n: int, rank: int, cores: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(3, heads, n, rank, dtype=dtype),
        torch.randn(3, heads, n, rank, dtype=dtype),
        torch.randn(heads, rank, dtype=dtype),
        torch.randn(heads, rank, dtype=dtype),
        torch.randn(cores, heads, rank, rank, dtype=dtype),
    )


@pytest.fixture(scope="session")
def bundle_specs() -> list[Any]:
    from ultramem.plugins.specs import spec_for_call

    return [spec_for_call(op, bound) for op, bound in bundle_calls()]


@pytest.fixture(scope="session")
def bundle(bundle_specs: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ultramem.plugins.bundle import build_bundle

    return build_bundle(bundle_specs, BUNDLE_SMS, tmp_path_factory.mktemp("bundle"))
