"""The wheel a user installs holds the whole package.

The package list was once kept by hand in ``pyproject.toml``, and a new sub-package
(``compiler/generation``) was missing from every wheel while the editable install, which
maps the repository root, hid it. ``setup.py`` now finds the packages; this test builds
the wheel as ``pip install`` would and holds it to the tree: every folder with an
``__init__.py``, every module, every data file the package reads. CI also installs that
wheel into a fresh venv outside the checkout and exports from it (``.ci/run``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "scripts", "docs", "build", "dist"}
# what a checkout may hold that is no part of the source
LOCAL_ONLY = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "artifacts",
)
DATA = ("models/builtin/*.json", "models/builtin/*.safetensors", "kernels/native/*.cpp")


def _shipped_sources() -> set[str]:
    """Every file of the package as the wheel names it (``ultramem/<path>``)."""
    files = {"ultramem/__init__.py"}
    for init in ROOT.rglob("__init__.py"):
        folder = init.parent.relative_to(ROOT)
        if not folder.parts or folder.parts[0] in NOT_SHIPPED or folder.parts[0].startswith("."):
            continue
        files |= {f"ultramem/{p.relative_to(ROOT)}" for p in init.parent.glob("*.py")}
    for pattern in DATA:
        files |= {f"ultramem/{p.relative_to(ROOT)}" for p in ROOT.glob(pattern)}
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools builds in the source's build/, where files of an older tree
    # (a module since removed) would end up in the wheel; a clean clone has none
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL_ONLY))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("ultramem-*.whl")
    return path


def test_wheel_holds_every_package_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _shipped_sources()
    assert "ultramem/compiler/generation/__init__.py" in expected  # the one once left out
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"


def test_wheel_ships_nothing_else(wheel: Path) -> None:
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("ultramem-")}
    assert all(n.startswith("ultramem/") for n in names), names
    stray = sorted(n for n in names if n.split("/")[1] in NOT_SHIPPED | {"setup.py"})
    assert not stray, stray


def test_wheel_has_the_console_script(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "ultramem = ultramem.cli.main:main" in text
