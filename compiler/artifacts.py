"""Atomic artifact folders and the manifest that describes them.

Every artifact is written into a staging folder inside ``--out`` and moved into place
only when the whole export succeeded, manifest last; after an error nothing half-written
remains. ``--out`` must be new, empty, or an earlier export of ours (it has our manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_KIND = "ultramem-artifacts"
MANIFEST_SCHEMA = 1


class ArtifactError(ValueError):
    """An output folder or artifact that cannot be used; the message says what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "ultramem",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "triton",
        "tensorrt_rtx",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no {MANIFEST}; run `ultramem export --out {directory}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); export again") from None
    if manifest.get("kind") != MANIFEST_KIND:
        raise ArtifactError(f"{path} is not an ultramem manifest; export again")
    return manifest


def verify_artifacts(directory: Path, manifest: dict[str, Any]) -> None:
    """Every artifact the manifest lists exists and has its recorded sha256."""
    for art in manifest.get("artifacts", []):
        path = directory / art["path"]
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; export again")
        if sha256_file(path) != art["sha256"]:
            raise ArtifactError(f"{path} changed since export (sha256 differs); export again")


class ArtifactWriter:
    """Stage files under ``out`` and publish them together, or not at all."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._created = False
        if out.exists():
            if not out.is_dir():
                raise ArtifactError(f"--out {out} exists and is not a folder")
            entries = [p for p in out.iterdir() if not p.name.startswith(".ultramem-staging")]
            if entries and not (out / MANIFEST).is_file():
                raise ArtifactError(
                    f"--out {out} is not empty and holds no ultramem manifest; "
                    "choose a new or empty folder"
                )
        else:
            try:
                out.mkdir(parents=True)
            except OSError as exc:
                raise ArtifactError(f"cannot create --out {out}: {exc.strerror}") from None
            self._created = True
        if not os.access(out, os.W_OK | os.X_OK):
            raise ArtifactError(f"--out {out} is not writable; choose another folder")
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=".ultramem-staging-", dir=out))
        except OSError as exc:
            raise ArtifactError(f"cannot write into --out {out}: {exc.strerror}") from None
        self.artifacts: list[dict[str, Any]] = []

    def path(self, name: str) -> Path:
        return self.staging / name

    def add(self, name: str, fmt: str) -> dict[str, Any]:
        """Record a staged file as an artifact (format, size, sha256)."""
        path = self.path(name)
        entry = {
            "path": name,
            "format": fmt,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        self.artifacts = [a for a in self.artifacts if a["path"] != name] + [entry]
        return entry

    def publish(
        self, manifest: dict[str, Any], extra_files: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Move every staged file into place, manifest last; return the manifest written."""
        manifest = {
            "kind": MANIFEST_KIND,
            "schema": MANIFEST_SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": versions(),
            **manifest,
            "artifacts": self.artifacts,
        }
        self.path(MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # an older manifest must not describe a half-replaced folder: drop it first
        (self.out / MANIFEST).unlink(missing_ok=True)
        for name in [a["path"] for a in self.artifacts] + list(extra_files):
            (self.out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(name), self.out / name)
        os.replace(self.path(MANIFEST), self.out / MANIFEST)
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
