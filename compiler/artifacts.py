"""Atomic artifact folders and the manifest that describes them.

Every artifact is written into a staging folder inside ``--out`` and moved into place
only when the whole export succeeded, manifest last; after an error nothing half-written
remains. ``--out`` must be new, empty, or an earlier export of ours (it has our manifest).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from .inputs.errors import ArtifactError
from .inputs.options import FORMAT_MARKERS, FORMAT_NEEDS

MANIFEST = "manifest.json"
MANIFEST_KIND = "ultramem-artifacts"
# 2: source records --weights and the weights' fingerprint; stages not run have no verdict
MANIFEST_SCHEMA = 2


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); export again") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise ArtifactError(f"{path} is not an ultramem manifest; export again")
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise ArtifactError(
            f"{path} has manifest schema {manifest.get('schema')!r}, this ultramem reads "
            f"{MANIFEST_SCHEMA}; export again"
        )
    if not isinstance(manifest.get("source"), dict) or not isinstance(
        manifest.get("artifacts"), list
    ):
        raise ArtifactError(f"{path} lacks its source or artifacts; export again")
    return manifest


def verify_artifacts(directory: Path, manifest: dict[str, Any]) -> None:
    """Every artifact the manifest lists exists and has its recorded sha256."""
    for art in manifest.get("artifacts", []):
        name = art.get("path") if isinstance(art, dict) else None
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{directory / MANIFEST} lists an artifact outside the folder")
        path = directory / name
        if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
            raise ArtifactError(f"{path} is a link out of the folder; export again")
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; export again")
        if sha256_file(path) != art.get("sha256"):
            raise ArtifactError(f"{path} changed since export (sha256 differs); export again")


STAGING_PREFIX = ".ultramem-staging-"
LOCK_FILE = ".ultramem.lock"


def _ours(name: str) -> bool:
    """Entries of an output folder that are the writer's own bookkeeping."""
    return name.startswith(STAGING_PREFIX) or name == LOCK_FILE


def check_out_folder(out: Path) -> bool:
    """Whether ``out`` exists; ``ArtifactError`` unless it is a folder an export may write:
    new, empty, or an earlier export of ours. Writes nothing, imports nothing heavy: the
    CLI calls it before the model loads, the writer again when it takes the folder."""
    try:
        exists = out.exists()
    except OSError as exc:  # a name too long, a loop of links
        raise ArtifactError(f"--out {out}: {exc.strerror}") from None
    if not exists:
        return False
    if not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a folder")
    try:
        entries = [p for p in out.iterdir() if not _ours(p.name)]
    except OSError as exc:
        raise ArtifactError(f"cannot read --out {out}: {exc.strerror}") from None
    if not entries:
        return True
    path = out / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"--out {out} is not empty and holds no ultramem manifest; choose a new or empty folder"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise ArtifactError(
            f"--out {out} holds a {MANIFEST} that ultramem did not write; it is left "
            "alone: choose a new or empty folder"
        )
    if not isinstance(manifest.get("schema"), int) or manifest["schema"] > MANIFEST_SCHEMA:
        raise ArtifactError(
            f"--out {out} was written by a newer ultramem (manifest schema "
            f"{manifest.get('schema')!r}); choose another folder"
        )
    return True


class ArtifactWriter:
    """Stage files under ``out`` and publish them together, or not at all.

    ``out`` must be new, empty, or a folder an earlier export wrote (its manifest is ours);
    anything else is refused before a byte is written. One writer at a time holds the
    folder's lock; staging left by a killed export is removed. Publishing replaces the
    whole folder: whatever the previous export left that this one does not write (other
    formats' files) is deleted, so the manifest always describes everything there.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._created = False
        self._lock: int | None = None
        self._lock_created = False
        if not check_out_folder(out):
            try:
                out.mkdir(parents=True)
            except OSError as exc:
                raise ArtifactError(f"cannot create --out {out}: {exc.strerror}") from None
            self._created = True
        if not os.access(out, os.W_OK | os.X_OK):
            self._remove_created()
            raise ArtifactError(f"--out {out} is not writable; choose another folder")
        self._take_lock()
        for stale in out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed export's (we hold the lock)
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        except OSError as exc:
            self.abort()
            raise ArtifactError(f"cannot write into --out {out}: {exc.strerror}") from None
        self.artifacts: list[dict[str, Any]] = []

    def _take_lock(self) -> None:
        path = self.out / LOCK_FILE
        self._lock_created = not path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._remove_created()
            raise ArtifactError(f"cannot write into --out {self.out}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ArtifactError(
                f"another ultramem export is writing into --out {self.out}; wait for it or "
                "choose another folder"
            ) from None
        self._lock = fd

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
        self.path(MANIFEST).write_text(json_text(manifest))
        # an older manifest must not describe a half-replaced folder: drop it first
        (self.out / MANIFEST).unlink(missing_ok=True)
        names = [a["path"] for a in self.artifacts] + list(extra_files)
        keep = {Path(name).parts[0] for name in names} | {MANIFEST}
        for entry in self.out.iterdir():
            if not _ours(entry.name) and entry.name not in keep:
                _remove(entry)  # the previous export's, not written this time
        # a folder this export writes into (kernels/, prefill/) holds only what it writes:
        # a format written there before and not now must not outlive the manifest
        for top in keep - {MANIFEST}:
            if any(len(Path(n).parts) > 1 for n in names if Path(n).parts[0] == top):
                _remove(self.out / top)
        for name in names:
            target = self.out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(name), target)
        os.replace(self.path(MANIFEST), self.out / MANIFEST)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._release()
        return manifest

    def abort(self) -> None:
        shutil.rmtree(getattr(self, "staging", self.out / "-"), ignore_errors=True)
        self._release()
        self._remove_created()

    def _release(self) -> None:
        """Drop the lock, and its file if this writer made it: the folder is left as the
        export (or, after an abort, the user) had it."""
        if self._lock is not None:
            if self._lock_created:
                (self.out / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    def _remove_created(self) -> None:
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """Strict JSON (``allow_nan=False``) of ``value``, non-finite floats as null."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def manifest_formats(
    manifest: dict[str, Any], folder: Path, programs: tuple[str, ...] = ("",)
) -> list[str]:
    """The formats a manifest lists, each one this ultramem knows, or ``ArtifactError``.
    ``programs``: the subfolders each format was written into (a generation export's
    ``prefill/`` and ``decode/``)."""
    formats = manifest.get("formats")
    known = isinstance(formats, list) and all(
        isinstance(f, str) and f in FORMAT_NEEDS for f in formats
    )
    if not known or not formats or len(set(formats)) != len(formats):
        raise ArtifactError(f"{folder / MANIFEST} lists formats {formats!r}; export again")
    # each format's file must be a hashed entry: a format whose entry was removed would
    # be checked (and run) without its hash
    hashed = {a.get("path") for a in manifest.get("artifacts", []) if isinstance(a, dict)}
    expected = {f: [f"{p}{FORMAT_MARKERS[f]}" for p in programs] for f in formats}
    unlisted = [path for f in formats for path in expected[f] if path not in hashed]
    if unlisted:
        raise ArtifactError(
            f"{folder / MANIFEST} lists formats without {', '.join(unlisted)} among its "
            "artifacts; export again"
        )
    return formats
