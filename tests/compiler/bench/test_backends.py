"""Which files of an artifacts folder ``bench`` runs: only listed ones, native code on request."""

from __future__ import annotations

from pathlib import Path

from ultramem.compiler.aoti import AOTI_FILE
from ultramem.compiler.formats import ENGINE_FILE, ONNX_FILE
from ultramem.compiler.runners import Programs, RunContext, bench_backends


def _folder(tmp_path: Path) -> Path:
    # garbage in every file: a backend that opened one would raise, not report a reason
    for name in (ONNX_FILE, AOTI_FILE, ENGINE_FILE):
        (tmp_path / name).write_bytes(b"not what the name says")
    return tmp_path


def _reasons(folder: Path, formats: list[str], native_code: bool) -> dict[str, str]:
    wanted = ["onnxruntime-cpu", "aotinductor", "tensorrt"]
    context = RunContext(Programs(), folder, formats, native_code=native_code)
    backends = bench_backends(context, wanted)
    return {b.name: b.reason for b in backends if b.run is None}


def test_files_the_manifest_does_not_list_are_never_opened(tmp_path: Path) -> None:
    reasons = _reasons(_folder(tmp_path), [], native_code=True)
    assert reasons == {
        "onnxruntime-cpu": f"no {ONNX_FILE} (pass --artifacts DIR from `ultramem export`)",
        "aotinductor": f"no {AOTI_FILE} (export --format aoti)",
        "tensorrt": f"no {ENGINE_FILE} (export --format tensorrt)",
    }


def test_a_listed_aoti_package_is_loaded_only_with_the_opt_in(tmp_path: Path) -> None:
    reasons = _reasons(_folder(tmp_path), ["aoti"], native_code=False)
    assert "--allow-native-code" in reasons["aotinductor"]
    assert "shared library" in reasons["aotinductor"]


def test_an_artifact_that_does_not_load_leaves_its_backend_out(tmp_path: Path) -> None:
    reasons = _reasons(_folder(tmp_path), ["onnx", "aoti"], native_code=True)
    assert reasons["aotinductor"].startswith("cannot load its artifact")
    assert reasons["onnxruntime-cpu"].startswith("cannot load its artifact")
