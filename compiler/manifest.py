"""The manifest an export writes last, and what a reader checks against it: every listed
artifact a file in the folder with its recorded sha256, every listed format known and
hashed. Strict JSON for whatever ultramem writes."""

from __future__ import annotations

import hashlib
import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ..files import UnreadableFile, path_name_problem, read_json
from .inputs.errors import ArtifactError
from .inputs.options import FORMAT_MARKERS, FORMAT_NEEDS

MANIFEST = "manifest.json"
MANIFEST_KIND = "ultramem-artifacts"
# 2: source records --weights and the weights' fingerprint; stages not run have no verdict
MANIFEST_SCHEMA = 2
MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists files: thousands fit in a few MB


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
    if path.is_symlink():  # what it lists is only as trusted as the file itself
        raise ArtifactError(
            f"{path} is a link, not a file in the folder (a link out of the folder could "
            "name any file); export again"
        )
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no {MANIFEST}; run `ultramem export --out {directory}`"
        )
    try:  # no link, FIFO or giant swapped in since: such a read fails, it does not wait
        manifest = read_json(path, MANIFEST_MAX_BYTES)
    except UnreadableFile as exc:
        raise ArtifactError(f"{exc}; export again") from None
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
    """Every artifact the manifest lists is a file in the folder, reached through no link
    (a linked subfolder leads wherever it points, as a linked file
    does), and has its recorded sha256."""
    for art in manifest.get("artifacts", []):
        name = art.get("path") if isinstance(art, dict) else None
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{directory / MANIFEST} lists an artifact outside the folder")
        problem = path_name_problem(directory / name)
        if problem is not None:  # a NUL, a name too long: the system would refuse it later
            raise ArtifactError(f"{directory / MANIFEST} lists artifact {name!r}: {problem}")
        path = directory
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise ArtifactError(
                    f"{path} is a link, not a file in the folder (a link out of the folder "
                    "could name any file); export again"
                )
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; export again")
        if sha256_file(path) != art.get("sha256"):
            raise ArtifactError(f"{path} changed since export (sha256 differs); export again")


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


def manifest_formats(manifest: dict[str, Any], folder: Path) -> list[str]:
    """The formats a manifest lists, each one this ultramem knows, its file and the files
    that one reads listed (after ``verify_artifacts``: those are parsed), or
    ``ArtifactError``."""
    formats = manifest.get("formats")
    known = isinstance(formats, list) and all(
        isinstance(f, str) and f in FORMAT_NEEDS for f in formats
    )
    if not known or not formats or len(set(formats)) != len(formats):
        raise ArtifactError(f"{folder / MANIFEST} lists formats {formats!r}; export again")
    # each format's file must be a hashed entry: a format whose entry was removed would
    # be checked (and run) without its hash
    hashed = {a.get("path") for a in manifest.get("artifacts", []) if isinstance(a, dict)}
    expected = {f: [FORMAT_MARKERS[f]] for f in formats}
    unlisted = [path for f in formats for path in expected[f] if path not in hashed]
    if unlisted:
        raise ArtifactError(
            f"{folder / MANIFEST} lists formats without {', '.join(unlisted)} among its "
            "artifacts; export again"
        )
    # and so must each file those make their runtime read (an ONNX model's external
    # data, a bundle's cubins): one planted beside them would run unhashed
    from .formats import check_reads  # it imports this module (and the runtimes)

    check_reads(folder, expected, hashed)
    return formats
