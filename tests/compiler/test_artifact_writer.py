"""ArtifactWriter: a re-export owns its folder, subfolders included.

A text-generation export writes into ``prefill/`` and ``decode/``; a format written
there by the previous export and not by this one must go with it (the manifest no longer
lists it, so nothing would ever hash-check it).
"""

from __future__ import annotations

from pathlib import Path

from ultramem.compiler.artifacts import ArtifactWriter


def _export(out: Path, files: dict[str, str]) -> None:
    with ArtifactWriter(out) as writer:
        for name, text in files.items():
            path = writer.path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            writer.add(name, "test")
        writer.publish({"formats": ["test"]})


def test_a_reexport_removes_what_it_no_longer_writes_inside_its_subfolders(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    _export(out, {"prefill/model.onnx": "a", "prefill/model.aoti.pt2": "b", "top.txt": "c"})
    assert (out / "prefill" / "model.aoti.pt2").is_file()
    _export(out, {"prefill/model.onnx": "a2"})
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "manifest.json",
        "prefill/model.onnx",
    ]
    assert (out / "prefill" / "model.onnx").read_text() == "a2"
