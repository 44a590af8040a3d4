"""What the launcher reads before a cubin reaches the CUDA driver: a plain file beside
``bundle.json`` (no folder part, no link) whose bytes have the sha256 it records.

A cubin is native code and a bundle is data from elsewhere: the name and the bytes are
checked before any driver call, which is why all of this runs without CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ultramem.plugins.launcher import BundleLauncher, read_cubin
from ultramem.plugins.metadata import SCHEMA, BundleManifest, KernelMetadata, load_bundle

IMAGE = b"\x7fELF a cubin, as far as this test is concerned"


def _kernel(cubin: str = "k-sm90.cubin", image: bytes = IMAGE) -> KernelMetadata:
    return KernelMetadata(
        name="k", op="retrieve", function="f", entry="f", sm=90, arch="sm_90", cubin=cubin,
        ptx="k-sm90.ptx", cubin_sha256=hashlib.sha256(image).hexdigest(), num_warps=4,
        threads_per_block=128, num_ctas=1, shared_bytes=0, constexprs={}, args=(), dims={},
        grid={"x": "1", "y": "1", "z": "1"},
    )  # fmt: skip


def _bundle(tmp_path: Path) -> Path:
    root = tmp_path / "kernels"
    root.mkdir()
    (root / "k-sm90.cubin").write_bytes(IMAGE)
    return root


def test_a_listed_cubin_with_its_hash_is_read(tmp_path: Path) -> None:
    assert read_cubin(_bundle(tmp_path), _kernel()) == IMAGE


def test_a_cubin_whose_bytes_changed_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "k-sm90.cubin").write_bytes(IMAGE + b"\x00")
    with pytest.raises(ValueError, match=r"has sha256 \w+, not the \w+ bundle\.json records"):
        read_cubin(root, _kernel())


@pytest.mark.parametrize(
    "name", ["../k-sm90.cubin", "sub/k-sm90.cubin", "/tmp/k-sm90.cubin", "", ".", ".."]
)
def test_a_cubin_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    root = _bundle(tmp_path)
    (tmp_path / "k-sm90.cubin").write_bytes(IMAGE)  # the right bytes, outside the bundle
    (root / "sub").mkdir()
    (root / "sub" / "k-sm90.cubin").write_bytes(IMAGE)
    with pytest.raises(ValueError, match="is not a file name in"):
        read_cubin(root, _kernel(cubin=name))


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_cubin_that_is_a_link_is_refused(tmp_path: Path, target: str) -> None:
    """Even with the right bytes at the other end."""
    root = _bundle(tmp_path)
    real = (tmp_path if target == "outside" else root) / "real.cubin"
    real.write_bytes(IMAGE)
    (root / "linked.cubin").symlink_to(real)
    with pytest.raises(ValueError, match="is a link"):
        read_cubin(root, _kernel(cubin="linked.cubin"))


class RecordingDriver:
    """Records every driver call; loading a module is what must never happen here."""

    CUresult = SimpleNamespace(CUDA_SUCCESS=0)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> tuple[int, int]:
            self.calls.append(name)
            return 0, 1

        return call


def test_the_launcher_checks_the_cubin_before_any_driver_call(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "k-sm90.cubin").write_bytes(b"another program")
    driver = RecordingDriver()
    manifest = BundleManifest(root, "3.x", (90,), (_kernel(),))
    launcher = BundleLauncher(manifest, driver=driver)
    with pytest.raises(ValueError, match="sha256"):
        launcher.function(manifest.kernels[0], 0)
    assert driver.calls == ["cuInit"]  # the launcher's own start, nothing after it
    (root / "k-sm90.cubin").write_bytes(IMAGE)
    launcher.function(manifest.kernels[0], 0)
    assert "cuModuleLoadData" in driver.calls


@pytest.mark.parametrize("field", ["cubin", "ptx"])
def test_a_bundle_naming_a_file_outside_its_folder_does_not_load(
    tmp_path: Path, field: str
) -> None:
    root = _bundle(tmp_path)
    kernel = replace(_kernel(), **{field: f"../{field}"})
    bundle = {"schema": SCHEMA, "triton_version": "3.x", "sms": [90]}
    (root / "bundle.json").write_text(json.dumps({**bundle, "kernels": [kernel.to_json()]}))
    with pytest.raises(ValueError, match=re.escape(f"names file '../{field}'")):
        load_bundle(root)
    os.remove(root / "bundle.json")
    BundleManifest(root, "3.x", (90,), (_kernel(),)).write()
    assert load_bundle(root).kernels[0].cubin == "k-sm90.cubin"
