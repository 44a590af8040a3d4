"""Files: the project's one atomic writer, bounded reads of untrusted files, the checks
of a path before any work, and the words for what the operating system refused."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place.

    A crash or a signal mid-write leaves the old file (or none) and at most a ``.tmp``
    beside it, never a truncated ``path``.
    """
    path = Path(path)
    # a short temporary name: the target's own may already be as long as a name may be
    fd, tmp = tempfile.mkstemp(prefix=".ultramem-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class UnreadableFile(ValueError):
    """A file that is not what it must be to be read as data: one line saying why."""


def read_small_file(path: Path, limit: int, follow_links: bool = False) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes, read through no
    link unless ``follow_links`` (a path the user named, or a link already vetted). A
    FIFO, a device or a folder is refused, not waited on or read forever; a file too large
    for what it claims to be is refused before it fills memory."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "is a link" if exc.errno == errno.ELOOP else exc.strerror
        raise UnreadableFile(f"{path} {why}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{path} is not a regular file")
        if info.st_size > limit:
            raise UnreadableFile(f"{path} is {info.st_size} bytes, more than {limit} it may be")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise UnreadableFile(f"{path} is more than {limit} bytes")
    return data


def read_json(path: Path, limit: int, follow_links: bool = False) -> Any:
    """``read_small_file`` parsed as JSON; ``UnreadableFile`` saying why it is none
    (nested past the parser's depth included: a RecursionError is no bug of ours)."""
    data = read_small_file(path, limit, follow_links)
    try:
        return json.loads(data)
    except RecursionError:
        raise UnreadableFile(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UnreadableFile(f"{path} is not valid JSON ({exc})") from None


def plain_name(name: object) -> bool:
    """A file name in its folder and nothing else: no folder part, no ``..``, not absolute,
    no NUL. What a file from elsewhere may name beside itself."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\x00" not in name
    )


NAME_MAX = 255  # bytes in one path component: ext4, xfs, btrfs, tmpfs
PATH_MAX = 4095  # bytes in a whole path, as the kernel takes it


def path_name_problem(path: Path | str) -> str | None:
    """Why the operating system or the runtimes could not take ``path`` as a name, or
    None: a NUL byte, bytes that are not UTF-8 (ONNX Runtime and torch take paths as
    UTF-8 text and fail on them only deep inside), a part or the whole too long. Checked
    before long work, so such a name is one line of bad input, not a failure at the end."""
    text = str(path)
    if "\0" in text:
        return "holds a NUL character"
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8, which ONNX Runtime and torch need of a path"
    if len(os.fsencode(os.path.abspath(text))) > PATH_MAX:
        return f"File name too long (over the {PATH_MAX} bytes a path may have)"
    if any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        return f"File name too long (a part over the {NAME_MAX} bytes a name may have)"
    return None


def output_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot receive output (made if new), or None: said before the work
    whose results would go there, not after it."""
    if folder.is_symlink() and not folder.exists():
        return "is a link to nothing"
    if folder.exists():
        if not folder.is_dir():
            return "exists and is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return "is not writable"
        try:  # access() trusts permission bits: a real file says what the folder takes
            fd, probe = tempfile.mkstemp(prefix=".ultramem-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return f"cannot be written: {exc.strerror}"
        return None
    parent = folder.absolute().parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            return f"cannot create it: {parent} is a link to nothing"
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create it: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {parent} is not writable"
    return None


def output_file_problem(path: Path) -> str | None:
    """Why a report file cannot be written at ``path`` (its folder must exist), or None."""
    if path.is_dir():
        return "is a folder; give a file name"
    parent = path.absolute().parent
    if not parent.is_dir():
        return f"cannot be written: {parent} is not a folder" + (
            "" if parent.exists() else " (it does not exist)"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be written: {parent} is not writable"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # written by replacing whatever is there: never a device, a FIFO or a link
        return "exists and is not a regular file (a link, a device, a FIFO); name a new file"
    return None


# what the system says when the machine, not ultramem, is short of something; torch's C++
# writers and compilers run as subprocesses report it only as text
_SYSTEM_TEXTS = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Read-only file system",
    "Permission denied",
    "File name too long",
)


def system_error(exc: BaseException) -> str | None:
    """One line for an error the operating system raised (a full disk, a read-only folder,
    a name too long, memory exhausted), wherever it surfaced and however a library wrapped
    it; None for anything else. Such an error is the machine's state or the user's path:
    bad input (exit 2), not a bug."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, MemoryError):
            return "out of memory"
        if isinstance(link, OSError) and link.errno is not None:
            where = link.filename if link.filename is not None else ""
            reason = link.strerror or os.strerror(link.errno)
            return f"{where}: {reason}" if where != "" else reason
        text = str(link)
        found = next((t for t in _SYSTEM_TEXTS if t in text), None)
        if found is not None:
            line = text.strip().splitlines()[0][:200] if text.strip() else ""
            return f"{found} ({type(link).__name__}: {line})"
        link = link.__cause__ or link.__context__
    return None
