"""What one Triton launch fixes besides its tensors and sizes, shared by the launchers and the
ahead-of-time kernel bundle (``ultramem.plugins.bundle``), so a bundled kernel is the one the
JIT builds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    """What one launch fixes besides its tensors and sizes: the kernel's constexprs, its
    warps, and the programs per token (the grid is ``(tokens, programs_y, 1)``).

    The launchers and the ahead-of-time bundle (``ultramem.plugins.bundle``) both take it
    from the ``*_launch_config`` functions, so a bundled kernel is the one the JIT builds.
    """

    constexprs: Mapping[str, int | str | bool]
    num_warps: int
    programs_y: int

    def grid(self, tokens: int) -> tuple[int, int, int]:
        return (tokens, self.programs_y, 1)
