"""What every check of an untrusted ``.pt2`` shares: the three refusals it raises, and how
its allow-lists are spelled."""

from __future__ import annotations


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


class UnsafeArchive(ValueError):
    """A ``.pt2`` that holds something ``torch.export.save`` does not write: code, or a
    Python object only a full unpickler would make."""


class CorruptArchive(ValueError):
    """A file that is no readable ``.pt2`` at all (not a zip, truncated, missing parts)."""


class OversizedArchive(ValueError):
    """A ``.pt2`` that would inflate far past its own size (a zip bomb), or past the room
    there is to copy it."""
