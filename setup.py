"""The package list, found rather than kept by hand (metadata is in pyproject.toml).

The repository root is the ``ultramem`` package (``package-dir``), so setuptools' own
discovery would install ``cli``, ``passes`` ... as top-level packages; here every folder
with an ``__init__.py`` becomes ``ultramem.<folder>``, and every folder that only holds
package data (``models/builtin``) is listed beside it. A new sub-package cannot be left
out of the wheel (``tests/test_wheel.py`` builds one and holds it to the tree).
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

NOT_SHIPPED = ["tests", "tests.*", "scripts", "scripts.*", "docs", "docs.*", "build", "build.*"]
PACKAGE_DATA = {
    # the trained builtin models: data files in a folder without Python
    "ultramem.models.builtin": ["*.json", "*.safetensors"],
    # the native CPU kernels' source: compiled on first use against the installed torch
    "ultramem.kernels.native": ["*.cpp"],
}

packages = ["ultramem", *(f"ultramem.{name}" for name in find_packages(".", exclude=NOT_SHIPPED))]
packages += [name for name in PACKAGE_DATA if name not in packages]


class BuildPy(build_py):
    """The root's modules are the package's, except this file."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("ultramem", "setup")]


setup(
    packages=packages,
    package_dir={"ultramem": "."},
    package_data=PACKAGE_DATA,
    cmdclass={"build_py": BuildPy},
)
