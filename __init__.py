"""UltraMem compiler: capture, fuse, export and check UltraMem models."""

from __future__ import annotations

__version__ = "0.1.0"
