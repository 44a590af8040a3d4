"""Load a ``.pt2`` from an untrusted source without running any of its code.

``torch.export.load`` trusts the archive: it unpickles sample inputs, pickled weights and
constants (``weights_only=False`` as a fallback), ``sympify``s (``eval``s) the symbolic
shape strings, resolves node targets by ``getattr`` from ``torch`` (so ``torch.os.system``
or ``torch.ops.load_library`` are reachable), and compiles the ``guards_code`` strings and
the graph's generated Python (which embeds node names and stack traces) with ``exec``.

Before torch sees the file, this package reads the archive as data and accepts it only when
every one of those holds what ``torch.export.save`` writes:

- every operator the graph calls (node targets, and operators passed as arguments) is pure
  tensor maths: an ATen, ``prims`` or ``ultramem`` operator that takes no free-form string
  (a path, a message), no Python object, and is not called for a side effect (files,
  console, process state); a higher-order operator torch.export writes for control flow
  or functionalization; or a short list of pure Python functions (``operator.getitem``,
  arithmetic, ``torch.sym_*``, ``math``). This is checked before anything runs, since
  ``aten::from_file`` alone creates, grows or reads any file it names;
- symbolic expressions use only sympy's constructors for integers, symbols and arithmetic,
  and ask no more of sympy than torch.export's own do (``sympify`` evaluates every number
  an expression spells): int64 literals, no power of a power nor one by more than a small
  literal or a size, a bounded length, depth and count of terms; their hints and the range
  constraints' bounds are int64s;
- names are identifiers, and no string holds a control character (stack traces are
  dropped: they are comments in generated code, and only for humans);
- every pickle (sample inputs, weights, constants) loads under ``weights_only=True``;
  custom-object and opaque-object constants are refused;
- ``guards_code`` (input-shape checks as Python source) is dropped: the capture re-derives
  its own guards;
- what the archive inflates to is bounded by its declared sizes before anything is inflated
  (``torch.export.save`` stores members uncompressed, so a large ratio is a zip bomb), and
  again while each member is copied, so a header that lies cannot inflate past it.

The sanitised archive is then loaded with ``torch.load`` forced to ``weights_only=True`` and
Python's ``pickle.loads`` disabled, so a check missed here still cannot run a payload.
Anything else is refused with the reason (``UnsafeArchive``; ``OversizedArchive`` for a
bomb, ``CorruptArchive`` for a file that is no archive).
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from .archive import check_sizes, pickle_refusal, sanitised_copy
from .common import CorruptArchive, OversizedArchive, UnsafeArchive

__all__ = [
    "CorruptArchive",
    "OversizedArchive",
    "UnsafeArchive",
    "load_untrusted_pt2",
    "pickle_refusal",
]


def load_untrusted_pt2(path: Path) -> ExportedProgram:
    """``torch.export.load`` of ``path`` after the checks above; ``UnsafeArchive``,
    ``OversizedArchive`` or ``CorruptArchive`` when it is not what torch.export.save writes."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptArchive(f"not a torch.export archive (zip): {exc}") from None
    with archive, tempfile.TemporaryDirectory(prefix="ultramem-pt2-") as tmp:
        clean = Path(tmp) / "program.pt2"
        check_sizes(archive.infolist(), path.stat().st_size, shutil.disk_usage(tmp).free)
        try:
            sanitised_copy(archive, clean)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            # a member whose bytes do not match its header (CRC, length, method)
            raise CorruptArchive(f"a member cannot be read: {exc}") from None
        with _no_unsafe_unpickling():
            return torch.export.load(str(clean))


@contextmanager
def _no_unsafe_unpickling() -> Iterator[None]:
    """``torch.load`` with ``weights_only=True`` whatever the caller asks, and no plain
    ``pickle.loads`` or torchbind unpickling, for the length of one load."""
    from torch.export.pt2_archive import _package

    real_load, real_pickle, real_obj = torch.load, _package.pickle, torch._C._pickle_load_obj

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*_: Any, **__: Any) -> Any:
        raise UnsafeArchive("the archive asks to unpickle a Python object")

    class _NoPickle:
        loads = staticmethod(refuse)
        load = staticmethod(refuse)
        UnpicklingError = pickle.UnpicklingError

    torch.load = weights_only_load  # type: ignore[assignment]
    _package.pickle = _NoPickle  # type: ignore[assignment]
    torch._C._pickle_load_obj = refuse  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.load = real_load
        _package.pickle = real_pickle
        torch._C._pickle_load_obj = real_obj  # type: ignore[attr-defined]
