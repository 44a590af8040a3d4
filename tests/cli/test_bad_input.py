"""Every bad input: one line on stderr, exit code 2, nothing half-written, nothing unpickled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from ultramem.cli.main import cli


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("[ultramem]")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


class _Payload:
    """Unpickling this runs ``touch <marker>``: the code a weights file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_unknown_builtin(tmp_path: Path) -> None:
    _assert_one_line_error(
        _run("export", "builtin:nope", "--out", str(tmp_path / "o")), "nope", "known:"
    )
    assert not (tmp_path / "o").exists()


def test_unknown_model_form(tmp_path: Path) -> None:
    _assert_one_line_error(
        _run("export", "no_such_thing", "--out", str(tmp_path / "o")), "unknown MODEL"
    )


def test_factory_that_cannot_import(tmp_path: Path) -> None:
    _assert_one_line_error(
        _run("export", "no_such_pkg.mod:make", "--out", str(tmp_path / "o")), "cannot import"
    )


def test_factory_returning_no_module(tmp_path: Path, user_models: str) -> None:
    _assert_one_line_error(
        _run("export", f"{user_models}:not_a_module", "--out", str(tmp_path / "o")), "nn.Module"
    )


def test_missing_weights(tmp_path: Path, user_models: str) -> None:
    result = _run(
        "export",
        f"{user_models}:two_layers",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line_error(result, "no such weights file")


def test_truncated_safetensors_and_torch_files(tmp_path: Path, user_models: str) -> None:
    state = {"a": torch.randn(64, 64)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        result = _run(
            "export",
            f"{user_models}:two_layers",
            "--weights",
            str(path),
            "--out",
            str(tmp_path / "o"),
        )
        _assert_one_line_error(result, "truncated?")
        assert not (tmp_path / "o").exists()


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, user_models: str) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"w": _Payload(marker)}, tmp_path / "evil.pt")
    result = _run(
        "export",
        f"{user_models}:two_layers",
        "--weights",
        str(tmp_path / "evil.pt"),
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line_error(result, "refused to unpickle", "--allow-unsafe-pickle")
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_out_that_cannot_be_created(tmp_path: Path, user_models: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _assert_one_line_error(
        _run("export", f"{user_models}:two_layers", "--out", str(blocker / "sub")), "cannot create"
    )
    _assert_one_line_error(
        _run("export", f"{user_models}:two_layers", "--out", str(blocker)), "not a folder"
    )


def test_foreign_non_empty_out_is_left_alone(tmp_path: Path, user_models: str) -> None:
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _assert_one_line_error(
        _run("export", f"{user_models}:two_layers", "--out", str(out)), "not empty"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_failure_mid_export_leaves_nothing_behind(
    tmp_path: Path, user_models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ultramem.compiler.pipeline as pipeline

    def boom(*_: object) -> None:
        raise RuntimeError("parity crashed")

    monkeypatch.setattr(pipeline, "run_checks", boom)
    out = tmp_path / "o"
    result = _run("export", f"{user_models}:two_layers", "--out", str(out))
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert not out.exists()  # we created it, so we removed it, staging and all


def test_check_without_artifacts(tmp_path: Path) -> None:
    _assert_one_line_error(_run("check", "--artifacts", str(tmp_path)), "no manifest.json")
