"""``plugin_mode_support``: the probe's verdict for tensorrt_rtx, cached per version, and
never an exception for the caller (probe timeouts, garbage, missing packages)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from ultramem.plugins import trt_support


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ULTRAMEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(trt_support, "_verdicts", {})
    return tmp_path


def _no_subprocess(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the verdict should have come from the cache")


def test_tensorrt_rtx_says_no_and_caches(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorrt_rtx")
    pytest.importorskip("onnx")
    supported, why = trt_support.plugin_mode_support("tensorrt_rtx")
    assert not supported
    assert "tensorrt_rtx" in why and "native" in why, why
    assert len(list(fresh_cache.glob("trt-plugin-probe-tensorrt_rtx-*.json"))) == 1

    monkeypatch.setattr(trt_support.subprocess, "run", _no_subprocess)
    assert trt_support.plugin_mode_support("tensorrt_rtx") == (supported, why)  # in memory
    monkeypatch.setattr(trt_support, "_verdicts", {})
    assert trt_support.plugin_mode_support("tensorrt_rtx") == (supported, why)  # on disk


@pytest.mark.parametrize("failure", ["timeout", "garbage"])
def test_a_failed_probe_answers_no_and_is_asked_again(
    failure: str, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fakert", types.SimpleNamespace(__version__="1.0"))

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        return subprocess.CompletedProcess(cmd, -6, stdout="not json", stderr="abort")

    monkeypatch.setattr(trt_support.subprocess, "run", run)
    supported, why = trt_support.plugin_mode_support("fakert")
    assert not supported
    assert ("timed out" if failure == "timeout" else "failed") in why, why
    assert trt_support._verdicts == {} and not list(fresh_cache.iterdir())


def test_missing_package() -> None:
    supported, why = trt_support.plugin_mode_support("no_such_tensorrt_package")
    assert not supported and "not usable" in why


@pytest.mark.parametrize(
    ("version", "has_plugin", "expected"),
    [("10.6.0", True, False), ("10.8.0", True, True), ("10.8.0", False, False)],
)
def test_full_tensorrt_by_version_and_plugin_module(
    version: str, has_plugin: bool, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    # None in sys.modules makes the import fail, as a missing tensorrt.plugin would
    plugin = types.SimpleNamespace() if has_plugin else None
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    monkeypatch.setattr(trt_support.subprocess, "run", _no_subprocess)
    supported, why = trt_support.plugin_mode_support("tensorrt")
    assert supported is expected, why
    if version == "10.6.0":
        assert ">= 10.7" in why
