"""The names of the bundled models, read from their folder without loading any of them
(``models/builtin.py`` loads them; this module imports no torch, so the CLI can refuse an
unknown name at once)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin"
DEFAULT_BUILTIN = "facts"


def list_builtins(directory: Path = BUILTIN_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.json"))
