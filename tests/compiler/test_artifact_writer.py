"""ArtifactWriter: a re-export owns its folder, subfolders included.

An export may write into subfolders (text-generation exports before the one decoder
program wrote ``prefill/`` and ``decode/``); a format written there by the previous export
and not by this one must go with it (the manifest no longer
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


def _cut_short(out: Path) -> None:
    """``out`` as SIGKILL leaves it mid-publish: the old export's files, one of the new
    export's already moved into place (``a.txt``), the rest and the manifest still in
    the publishing folder with the list of names."""
    from ultramem.compiler.artifacts import PUBLISHING, PUBLISHING_NAMES

    _export(out, {"a.txt": "old a", "old.txt": "old only"})
    publishing = out / PUBLISHING
    (publishing / "sub").mkdir(parents=True)
    (publishing / "sub" / "b.txt").write_text("new b")
    (publishing / "manifest.json").write_text('{"kind": "ultramem-artifacts", "new": true}')
    (publishing / PUBLISHING_NAMES).write_text('["a.txt", "manifest.json", "sub"]')
    (out / "a.txt").write_text("new a")


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()}


def test_a_publish_cut_short_is_finished_by_the_next_writer_and_by_a_reader(
    tmp_path: Path,
) -> None:
    from ultramem.compiler.artifacts import finish_interrupted_publish

    new = {
        "a.txt": "new a",
        "sub/b.txt": "new b",
        "manifest.json": '{"kind": "ultramem-artifacts", "new": true}',
    }
    reader, writer = tmp_path / "reader", tmp_path / "writer"
    _cut_short(reader)
    finish_interrupted_publish(reader)
    assert _files(reader) == new
    finish_interrupted_publish(reader)  # a finished folder is left as it is
    assert _files(reader) == new
    _cut_short(writer)
    ArtifactWriter(writer).abort()  # taking the folder finishes the publish first
    assert _files(writer) == new
