"""Can this TensorRT package build engines in lookup mode ``plugin``? Asked without crashing.

- ``tensorrt`` >= 10.7: yes when ``tensorrt.plugin`` (quickly-deployable plugins) imports.
- anything else (``tensorrt_rtx``): the answer of ``probe_trt_plugins``, run in a
  subprocess with a timeout because TensorRT-RTX 1.7 aborts the process that builds a
  Python-plugin engine. The verdict is cached per package version, in memory and in
  ``$ULTRAMEM_CACHE_DIR`` (default ``~/.cache/ultramem``); a probe that fails or times out
  answers no, with its reason, and is not cached.

``plugin_mode_support`` never raises: a caller gets ``(False, why)`` and can fall back to
lookup mode ``native``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 300.0
MIN_TENSORRT = (10, 7)
_verdicts: dict[tuple[str, str], tuple[bool, str]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("ULTRAMEM_CACHE_DIR", Path.home() / ".cache" / "ultramem"))


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def plugin_mode_support(package_name: str) -> tuple[bool, str]:
    """``(supported, message)`` for building plugin-mode engines with ``package_name``."""
    try:
        module = importlib.import_module(package_name)
        version = str(module.__version__)
    except Exception as e:  # an unusable install is an answer, not a crash
        return False, f"{package_name} is not usable here ({e!r}): pip install {package_name}"
    key = (package_name, version)
    if key in _verdicts:
        return _verdicts[key]
    if package_name == "tensorrt":
        answer, settled = _tensorrt_support(version), True
    else:
        answer, settled = _probed_support(package_name, version)
    if settled:  # a probe that failed is asked again next time
        _verdicts[key] = answer
    return answer


def _tensorrt_support(version: str) -> tuple[bool, str]:
    if _version_tuple(version) < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return False, f"tensorrt {version} predates quickly-deployable plugins: need >= {need}"
    try:
        importlib.import_module("tensorrt.plugin")
    except Exception as e:
        return False, f"tensorrt {version}: tensorrt.plugin does not import ({e!r})"
    return True, f"tensorrt {version}: tensorrt.plugin available"


def _probed_support(package: str, version: str) -> tuple[tuple[bool, str], bool]:
    """(answer, whether it is a verdict rather than a failure to get one)."""
    path = cache_dir() / f"trt-plugin-probe-{package}-{version}.json"
    try:
        verdict = json.loads(path.read_text())
        return (bool(verdict["plugin_mode"]), str(verdict["reason"])), True
    except (OSError, ValueError, KeyError):
        pass  # no cached verdict: probe
    cmd = [sys.executable, "-m", "ultramem.plugins.probe_trt_plugins", "--package", package]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
        verdict = json.loads(done.stdout)
        answer = bool(verdict["plugin_mode"]), str(verdict["reason"])
    except subprocess.TimeoutExpired:
        why = f"timed out after {PROBE_TIMEOUT_S:.0f} s"
        return (
            False,
            f"probing {package} {version} {why}; treating plugin mode as unsupported",
        ), False
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"failed ({e!r}; command: {' '.join(cmd)})"
        return (
            False,
            f"probing {package} {version} {why}; treating plugin mode as unsupported",
        ), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(verdict, indent=1))
        tmp.replace(path)
    except OSError as e:  # an unwritable cache only costs a probe next time
        logger.warning("could not cache the plugin probe verdict in %s: %s", path, e)
    return answer, True
