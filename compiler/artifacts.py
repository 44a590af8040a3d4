"""Atomic artifact folders and the manifest that describes them.

Every artifact is written into a staging folder inside ``--out`` and moved into place
only when the whole export succeeded, manifest last; after an error nothing half-written
remains. ``--out`` must be new, empty, or an earlier export of ours (it has our manifest).
What the manifest holds and how a reader checks it is ``manifest.py``; its names are
exported from here as well, so a caller imports artifacts and manifest from one place.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from .. import interrupts
from ..files import (
    UnreadableFile,
    output_folder_problem,
    plain_name,
    read_json,
    system_error,
)
from .inputs.errors import ArtifactError
from .manifest import (
    MANIFEST,
    MANIFEST_KIND,
    MANIFEST_MAX_BYTES,
    MANIFEST_SCHEMA,
    json_safe,
    json_text,
    manifest_formats,
    read_manifest,
    sha256_file,
    verify_artifacts,
    versions,
)

__all__ = [
    "MANIFEST",
    "PUBLISHING",
    "PUBLISHING_NAMES",
    "ArtifactError",
    "ArtifactWriter",
    "FolderLock",
    "check_out_folder",
    "finish_interrupted_publish",
    "json_safe",
    "json_text",
    "manifest_formats",
    "read_manifest",
    "sha256_file",
    "verify_artifacts",
    "versions",
]

STAGING_PREFIX = ".ultramem-staging-"
# a complete export on its way into place: from the moment staging is renamed to this
# name, the new export is the one that counts, and whoever finds it finishes moving it
PUBLISHING = ".ultramem-publishing"
# the names the export moves into place, written before the rename: a publish cut short
# has moved some of them already, and the rest must not be taken for an older export's
PUBLISHING_NAMES = ".ultramem-names.json"
LOCK_FILE = ".ultramem.lock"  # earlier versions locked a file; now the folder itself


def _ours(name: str) -> bool:
    """Entries of an output folder that are the writer's own bookkeeping."""
    return name.startswith(STAGING_PREFIX) or name in (PUBLISHING, LOCK_FILE)


def check_out_folder(out: Path) -> bool:
    """Whether ``out`` exists; ``ArtifactError`` unless it is a folder an export may write:
    new, empty, or an earlier export of ours (published, or cut short while publishing).
    Writes nothing, imports nothing heavy: the CLI calls it before the model loads, the
    writer again when it takes the folder."""
    try:
        exists = out.exists()
    except OSError as exc:  # a name too long, a loop of links
        raise ArtifactError(f"--out {out}: {exc.strerror}") from None
    if not exists:
        problem = output_folder_problem(out)
        if problem is not None:
            raise ArtifactError(f"--out {out} {problem}")
        return False
    if not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ArtifactError(f"--out {out} is not writable; choose another folder")
    try:
        entries = [p for p in out.iterdir() if not _ours(p.name)]
    except OSError as exc:
        raise ArtifactError(f"cannot read --out {out}: {exc.strerror}") from None
    if not entries or _pending_publish(out) is not None:
        return True
    path = out / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"--out {out} is not empty and holds no ultramem manifest; choose a new or empty folder"
        )
    try:
        manifest = read_json(path, MANIFEST_MAX_BYTES)
    except UnreadableFile:
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


def _pending_publish(out: Path) -> list[str] | None:
    """The names a publish cut short still has to move into ``out``, or None when there
    is none. Only plain names are taken: the list is a file in a folder others may write."""
    folder = out / PUBLISHING
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        names = read_json(folder / PUBLISHING_NAMES, 1 << 20)
    except UnreadableFile:
        return None  # cut short before the rename: never published, staging to remove
    plain = isinstance(names, list) and all(
        plain_name(n) and not _ours(n) and n != PUBLISHING_NAMES for n in names
    )
    return names if plain and MANIFEST in names else None


class FolderLock:
    """An exclusive ``flock`` on the folder itself: no lock file to follow through a link
    or to outlive a killed process (the kernel drops the lock with the process)."""

    def __init__(self, folder: Path, busy: str) -> None:
        try:
            self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ArtifactError(f"cannot open {folder}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise ArtifactError(busy) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def finish_interrupted_publish(folder: Path) -> None:
    """Complete an export that was killed while moving into ``folder`` (SIGKILL, power):
    the one a reader must see, and a writer must start from. A folder with none is left
    untouched; one that is being published now is refused (``ArtifactError``)."""
    if _pending_publish(folder) is None:
        return
    lock = FolderLock(
        folder, f"an ultramem export is publishing into {folder}; try again when it is done"
    )
    try:
        _roll_forward(folder)
    finally:
        lock.release()


def _roll_forward(out: Path) -> None:
    """Move a complete export from ``out/PUBLISHING`` into place. Each step is a rename or
    a removal that can be repeated: a run cut short anywhere is finished by the next."""
    names = _pending_publish(out)
    if names is None:
        return
    publishing = out / PUBLISHING
    # an older manifest must never describe a half-replaced folder
    if (publishing / MANIFEST).exists():
        (out / MANIFEST).unlink(missing_ok=True)
    for entry in out.iterdir():
        if not _ours(entry.name) and entry.name not in names:
            _remove(entry)  # the previous export's, not written this time
    for name in names:
        if name == MANIFEST or not (publishing / name).exists():
            continue  # moved already, before the cut
        _remove(out / name)
        os.replace(publishing / name, out / name)
    if (publishing / MANIFEST).exists():
        os.replace(publishing / MANIFEST, out / MANIFEST)
    shutil.rmtree(publishing)


def _prune(staging: Path, listed: set[str]) -> None:
    """Remove what an exporter left in ``staging`` besides the files the manifest lists
    (scratch, caches): a published folder holds only what its manifest hashes."""
    for path in sorted(staging.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        name = path.relative_to(staging).as_posix()
        if name in listed:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()) or not any(n.startswith(f"{name}/") for n in listed):
                _remove(path)
        else:
            path.unlink()


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait while a publish renames (milliseconds), then reach the
    handlers the program had. Deferred in Python, not blocked with a signal mask: torch's
    threads would take a process signal the main thread blocks, and Python runs the
    handler in the main thread all the same. SIGKILL cannot wait; the renames are made so
    that the next export or check finishes them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; there, no handler of ours runs
        return
    caught: list[int] = []

    def defer(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, defer) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


class ArtifactWriter:
    """Stage files under ``out`` and publish them together, or not at all.

    ``out`` must be new, empty, or a folder an earlier export wrote (its manifest is ours);
    anything else is refused before a byte is written. One writer at a time holds the
    folder's lock; staging left by a killed export is removed, and a publish it cut short
    is finished. Publishing replaces the whole folder: whatever the previous export left
    that this one does not write (other formats' files) is deleted, so the manifest always
    describes everything there. Until the staged export is complete the previous one is
    untouched; from then on the new one is the one a reader gets, even after SIGKILL.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._created = False
        self._committed = False
        self._lock: FolderLock | None = None
        self._staging_id = (-2, -2)  # no staging folder of ours yet
        if not check_out_folder(out):
            try:
                out.mkdir(parents=True)
            except OSError as exc:
                raise ArtifactError(f"cannot create --out {out}: {exc.strerror}") from None
            self._created = True
        self._take_lock()
        try:
            _roll_forward(out)  # a publish a killed export cut short
            for stale in out.iterdir():
                if stale.name.startswith(STAGING_PREFIX) or stale.name == PUBLISHING:
                    _remove(stale)  # a killed export's (we hold the lock)
                elif stale.name == LOCK_FILE and not stale.is_symlink() and stale.is_file():
                    stale.unlink()  # an earlier version's, left by a killed export
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            self._staging_id = _identity(self.staging)
        except OSError as exc:
            self.abort()
            raise ArtifactError(f"cannot write into --out {out}: {exc.strerror}") from None
        self.artifacts: list[dict[str, Any]] = []

    def _take_lock(self) -> None:
        try:
            self._lock = FolderLock(
                self.out,
                f"another ultramem export is writing into --out {self.out}; wait for it or "
                "choose another folder",
            )
        except ArtifactError:
            self._remove_created()
            raise

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
        self._check_staging()
        manifest = {
            "kind": MANIFEST_KIND,
            "schema": MANIFEST_SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": versions(),
            **manifest,
            "artifacts": self.artifacts,
        }
        self.path(MANIFEST).write_text(json_text(manifest))
        listed = {a["path"] for a in self.artifacts} | set(extra_files) | {MANIFEST}
        _prune(self.staging, listed)
        names = sorted({Path(name).parts[0] for name in listed})
        self.path(PUBLISHING_NAMES).write_text(json.dumps(names))
        self._check_staging()
        interrupts.raise_if_received()  # a signal a library swallowed: never publish
        with _signals_held():
            os.replace(self.staging, self.out / PUBLISHING)  # the new export counts now
            if _identity(self.out / PUBLISHING) != self._staging_id:  # swapped at the last
                _remove(self.out / PUBLISHING)  # a link or a folder not ours: not published
                raise ArtifactError(f"--out {self.out} {self._staging_problem()}")
            self._committed = True
            _roll_forward(self.out)
        self._release()
        return manifest

    def _staging_problem(self) -> str | None:
        """Why the staging folder is no longer the one this writer made, or None. The
        exporters write into it by path: a process that can rename entries of ``--out``
        could move it away and plant a link in its place, and what they write then goes
        where the link points. That cannot be undone here; it is found, and nothing of it
        is published."""
        try:
            now = _identity(self.staging)
        except OSError:
            return "was removed or moved while the export ran; nothing was published"
        if now != self._staging_id:
            return (
                f"had its staging folder {self.staging.name} replaced while the export ran "
                "(a link or another folder in its place: what was written after went there); "
                "nothing was published. Export into a folder no other process can write"
            )
        return None

    def _check_staging(self) -> None:
        problem = self._staging_problem()
        if problem is not None:
            raise ArtifactError(f"--out {self.out} {problem}")

    def abort(self) -> None:
        if self._committed:
            with _signals_held():  # a complete export: finish moving it, never drop it
                _roll_forward(self.out)
        elif hasattr(self, "staging") and self._staging_problem() is None:
            shutil.rmtree(self.staging, ignore_errors=True)  # ours, and only ours
        self._release()
        self._remove_created()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _remove_created(self) -> None:
        try:
            if self._created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
        except OSError:
            pass  # removed under us, or no longer ours to tidy

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            return
        problem = (
            None if self._committed or not hasattr(self, "staging") else (self._staging_problem())
        )
        self.abort()
        if not isinstance(exc, Exception) or isinstance(exc, ArtifactError):
            return  # a signal, or already our one-line answer
        if problem is not None:
            # whatever failed to write there, the cause is the folder gone: say that
            raise ArtifactError(f"--out {self.out} {problem}") from None
        system = system_error(exc)
        if system is not None:  # a full disk, a file-size limit: said with the folder
            raise ArtifactError(
                f"--out {self.out}: the export could not be finished: {system}"
            ) from None


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of ``path`` itself, not of what a link there points to."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return (-1, -1)
    return info.st_dev, info.st_ino


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
