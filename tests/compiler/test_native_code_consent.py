"""Native code from a folder (the AOTInductor package, the kernel bundle's cubins) is
loaded only with the caller's consent (``--allow-native-code``; an export's own parity
gives it): the decision is the stage's (``check``) or the backend's (``bench``), made
before the folder's file is read. Decided without a GPU: that is where it is made."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ultramem.compiler.aoti import AOTI_FILE
from ultramem.compiler.inputs.options import KERNELS_DIR
from ultramem.compiler.parity.stages import Stage
from ultramem.compiler.runners import (
    NATIVE_CODE_FLAG,
    Programs,
    RunContext,
    bench_backends,
    parity_stages,
)
from ultramem.compiler.runners import plugin_kernels as plugin_kernels_runner

NATIVE = {"plugin-kernels": "kernels holds GPU kernels", "aotinductor": "is a shared library"}


def _folder(tmp_path: Path) -> Path:
    # garbage: a stage that read either file would fail to load it, not say why it did not
    (tmp_path / KERNELS_DIR).mkdir()
    (tmp_path / KERNELS_DIR / "bundle.json").write_text("not a bundle")
    (tmp_path / AOTI_FILE).write_bytes(b"not a package")
    return tmp_path


def _stages(folder: Path, native_code: bool) -> dict[str, Stage]:
    program = SimpleNamespace()  # never run: the decision comes first
    context = RunContext(Programs(program=program), folder, ["kernels", "aoti"], None, native_code)  # type: ignore[arg-type]
    return {s.name: s for s in parity_stages(context)}


def test_without_consent_no_native_code_is_read(tmp_path: Path) -> None:
    stages = _stages(_folder(tmp_path), native_code=False)
    for name, what in NATIVE.items():
        assert stages[name].run is None, name
        assert what in stages[name].reason and NATIVE_CODE_FLAG in stages[name].reason


def test_with_consent_the_folder_is_loaded(tmp_path: Path) -> None:
    stages = _stages(_folder(tmp_path), native_code=True)
    for name, fmt in (("plugin-kernels", "kernels"), ("aotinductor", "aoti")):
        run = stages[name].run
        assert run is not None, stages[name].reason  # it tried, and the garbage failed it
        with pytest.raises(RuntimeError, match=f"cannot load the {fmt} artifact"):
            run((), [])


@pytest.mark.parametrize(
    ("native_code", "says"),
    [(False, NATIVE_CODE_FLAG), (True, "not wired yet")],
    ids=["no-consent", "consent"],
)
def test_bench_asks_consent_for_the_bundled_kernels_on_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_code: bool, says: str
) -> None:
    monkeypatch.setattr(plugin_kernels_runner, "on_gpu", lambda: True)  # as on a GPU machine
    context = RunContext(Programs(), _folder(tmp_path), ["kernels"], native_code=native_code)
    backends = bench_backends(context, ["plugin-kernels"])
    assert backends[0].run is None and says in backends[0].reason
