"""The archive as a zip: its members' declared sizes bounded before anything inflates (a
zip bomb), each member copied uncompressed and no further than it declares, and every
pickle it holds loaded ``weights_only`` before torch would unpickle it."""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .common import CorruptArchive, OversizedArchive, UnsafeArchive
from .program import CONTROL, sanitised_program

MAX_MEMBERS = 100_000
# torch.export.save stores every member uncompressed (ratio 1); deflated float weights stay
# near 1 too. Only runs of one byte (a zero buffer) compress past this, and such a member
# can be stored as it is
MAX_MEMBER_RATIO = 200
MAX_TOTAL_RATIO = 20
# below this an archive or a member is never refused for its ratio: small JSON compresses well
RATIO_FREE_BYTES = 1 << 20
TOTAL_RATIO_FREE_BYTES = 64 << 20
# the JSON parsed into Python objects (about ten times its size in memory)
MAX_JSON_BYTES = 64 << 20
COPY_CHUNK = 1 << 20


def check_sizes(infos: list[zipfile.ZipInfo], archive_bytes: int, free_bytes: int) -> None:
    """Refuse, from the declared sizes alone, an archive that inflates too far."""
    if len(infos) > MAX_MEMBERS:
        raise UnsafeArchive(f"{len(infos)} members; a torch.export archive has far fewer")
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and lzma inflate a whole chunk at once; torch.export.save never writes them
            raise CorruptArchive(
                f"member {info.filename!r} uses compression method {info.compress_type}, "
                "which torch.export.save does not write"
            )
        if info.flag_bits & 0x1:
            raise CorruptArchive(f"member {info.filename!r} is encrypted")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FREE_BYTES and ratio > MAX_MEMBER_RATIO:
            raise OversizedArchive(
                f"the archive inflates to {_total(infos)} bytes from {archive_bytes}: member "
                f"{info.filename!r} alone is {info.file_size} bytes from {info.compress_size}"
            )
    if sum(i.compress_size for i in infos) > archive_bytes:
        raise CorruptArchive("its members claim more compressed bytes than the file holds")
    total = _total(infos)
    if total > TOTAL_RATIO_FREE_BYTES and total > MAX_TOTAL_RATIO * archive_bytes:
        raise OversizedArchive(
            f"the archive inflates to {total} bytes from {archive_bytes}; torch.export.save "
            "stores its members uncompressed"
        )
    if total > free_bytes:
        raise OversizedArchive(
            f"the archive inflates to {total} bytes from {archive_bytes}, more than the "
            f"{free_bytes} bytes free for its checked copy"
        )


def _total(infos: list[zipfile.ZipInfo]) -> int:
    return sum(i.file_size for i in infos)


def sanitised_copy(archive: zipfile.ZipFile, out: Path) -> None:
    infos = archive.infolist()
    _check_member_names(infos)
    by_name = {i.filename: i for i in infos}
    models = [n for n in by_name if re.search(r"(^|/)models/[^/]+\.json$", n)]
    if not models:
        raise CorruptArchive("no models/*.json: not written by torch.export.save")
    for model in models:
        sample = re.sub(r"models/([^/]+)\.json$", r"data/sample_inputs/\1.pt", model)
        if sample not in by_name:
            # torch.export.load fails on it with a message that points at nothing
            raise CorruptArchive(f"{sample} is missing: not written by torch.export.save")
    # the graphs first: they decide whether anything here is meant to act on the machine
    programs = {m: sanitised_program(m, _read(archive, by_name[m], MAX_JSON_BYTES)) for m in models}
    for name in _pickled_members(archive, by_name):
        _check_weights_only(name, _read(archive, by_name[name], by_name[name].file_size))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as copy:
        for info in infos:
            if info.filename in programs:
                copy.writestr(_stored(info), programs[info.filename])
            else:
                _copy_member(archive, info, copy)


def _check_member_names(infos: list[zipfile.ZipInfo]) -> None:
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in Path(name).parts or CONTROL.search(name):
            raise UnsafeArchive(f"member name {name!r} escapes the archive")
        if name in seen:
            # readers disagree on which copy counts: the one checked may not be the one loaded
            raise UnsafeArchive(f"member {name!r} appears twice")
        seen.add(name)


def _stored(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename)  # no date or attributes of the original's
    copy.compress_type = zipfile.ZIP_STORED
    copy.file_size = info.file_size  # decides zip64 before the first byte is written
    return copy


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, never more than ``limit`` or its declared size inflated."""
    if info.file_size > limit:
        raise OversizedArchive(
            f"member {info.filename!r} inflates to {info.file_size} bytes, more than the "
            f"{limit} read into memory"
        )
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)
    _check_length(info, len(data))
    return data


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, copy: zipfile.ZipFile) -> None:
    written = 0
    with archive.open(info) as src, copy.open(_stored(info), "w") as dst:
        while chunk := src.read(COPY_CHUNK):
            written += len(chunk)
            _check_length(info, written)
            dst.write(chunk)
    _check_length(info, written, exact=True)


def _check_length(info: zipfile.ZipInfo, length: int, exact: bool = False) -> None:
    """Inflating stops at the declared size: a header that lies about it is refused."""
    if length > info.file_size:
        raise OversizedArchive(
            f"member {info.filename!r} inflates past the {info.file_size} bytes it declares"
        )
    if exact and length != info.file_size:
        raise CorruptArchive(f"member {info.filename!r} is shorter than it declares")


def _pickled_members(archive: zipfile.ZipFile, by_name: dict[str, zipfile.ZipInfo]) -> list[str]:
    """Every member torch would unpickle; refuses the object kinds it would unpickle freely."""
    out = [n for n in by_name if n.endswith(".pt")]  # sample inputs, legacy weights/constants
    for config_name in [n for n in by_name if n.endswith("_config.json")]:
        data = _read(archive, by_name[config_name], MAX_JSON_BYTES)
        try:
            config = json.loads(data).get("config", {})
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
            raise CorruptArchive(f"{config_name} is not a payload config: {exc}") from None
        folder = config_name.rsplit("/", 1)[0]
        for fqn, meta in config.items():
            path_name = str(meta.get("path_name", ""))
            if path_name.startswith(("custom_obj", "opaque_obj")):
                raise UnsafeArchive(
                    f"constant {fqn!r} is a pickled Python object ({path_name}), which "
                    "torch unpickles without restriction"
                )
            if meta.get("use_pickle"):
                out.append(f"{folder}/{path_name}")
    missing = [n for n in out if n not in by_name]
    if missing:
        raise CorruptArchive(f"payloads listed but absent: {missing[:3]}")
    return out


def _check_weights_only(name: str, data: bytes) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeArchive(f"{name} holds more than tensors ({pickle_refusal(exc)})") from None
    except Exception as exc:  # a corrupt payload: torch raises many types
        raise CorruptArchive(f"{name} cannot be read as tensors: {exc}") from None


def pickle_refusal(exc: pickle.UnpicklingError) -> str:
    """The part of torch's weights-only refusal that names what the pickle asked for."""
    text = str(exc)
    found = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+)", text)
    if found:
        return found.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:120] if lines else type(exc).__name__
