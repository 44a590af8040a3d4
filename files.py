"""Files: the project's one atomic writer, and the check of a path name before any work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place.

    A crash or a signal mid-write leaves the old file (or none) and at most a ``.tmp``
    beside it, never a truncated ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    return None
