"""The CLI's contract under hostile and careless input, through its real entry point.

``run(argv)`` is what the console script calls: exit 0 done, 1 parity failed, 2 bad input
(one line on stderr), 3 internal error, 130/143 interrupted. Nothing an artifacts folder
or a model file names is ever imported or unpickled; an ``--out`` is left complete or as
it was. Each test states the input and the answer it must get.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ultramem.cli.main import run

REPO_PYTHON = sys.executable


class Outcome:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def error_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if not ln.startswith("[ultramem]")]
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err + self.out
        return lines[0]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Outcome:
    code = run(list(args))
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def bad(capsys: pytest.CaptureFixture[str], *args: str, says: tuple[str, ...] = ()) -> str:
    outcome = cli(capsys, *args)
    assert outcome.code == 2, (outcome.code, outcome.err, outcome.out)
    line = outcome.error_line()
    for fragment in says:
        assert fragment in line, line
    return line


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


# ---- what an artifacts folder or a model file names never runs ------------------------------


def test_check_imports_no_factory_a_manifest_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "export", f"{user_models}:layer", "--out", str(out)).code == 0
    marker = tmp_path / "imported"
    (tmp_path / "evil_factory.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef make(): pass\n"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"]["model"] = "evil_factory:make"
    (out / "manifest.json").write_text(json.dumps(manifest))
    bad(capsys, "check", "--artifacts", str(out), says=("name it yourself", "evil_factory:make"))
    assert not marker.exists()


def test_an_export_from_a_pickled_pt2_is_refused_and_never_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from ultramem.tests.compiler.test_safe_pt2 import Small, _pickled_sample, _rewrite

    program = torch.export.export(Small().eval(), (torch.randn(3, 5, 4),))
    torch.export.save(program, str(tmp_path / "ok.pt2"))
    marker = tmp_path / "ran"
    evil = _rewrite(tmp_path / "ok.pt2", tmp_path / "evil.pt2", _pickled_sample(marker))
    bad(capsys, "export", str(evil), "--out", str(tmp_path / "o"), says=("--allow-unsafe-pickle",))
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_pt2_export_is_recheckable_with_its_recorded_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    from ultramem.tests.cli import conftest

    namespace: dict[str, object] = {}
    exec(conftest.FACTORY_MODULE, namespace)  # the same layer the factory builds
    model, example = namespace["layer"]()  # type: ignore[operator]
    program = torch.export.export(model, example)
    path = tmp_path / "layer.pt2"
    torch.export.save(program, str(path))
    out = tmp_path / "out"
    assert cli(capsys, "export", str(path), "--out", str(out)).code == 0
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["model"] == str(path.resolve())
    assert cli(capsys, "check", source["model"], "--artifacts", str(out)).code == 0


# ---- weights ---------------------------------------------------------------------------------


def _layer_state(user_models: str) -> dict[str, torch.Tensor]:
    import importlib

    model, _ = importlib.import_module(user_models).layer()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_weights_are_recorded_so_check_passes_with_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    state = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in _layer_state(user_models).items()
    }
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    out = tmp_path / "out"
    args = (f"{user_models}:layer", "--weights", str(weights))
    assert cli(capsys, "export", *args, "--out", str(out)).code == 0
    assert json.loads((out / "manifest.json").read_text())["source"]["weights"] == str(
        weights.resolve()
    )
    assert cli(capsys, "check", *args, "--artifacts", str(out)).code == 0
    # without the weights it is another model: said in one line
    bad(capsys, "check", f"{user_models}:layer", "--artifacts", str(out), says=("not the model",))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda s: {k: v.to(torch.int32) for k, v in s.items()}, "int32 for float32"),
        (lambda s: {k: v[..., :1] if v.dim() else v for k, v in s.items()}, "other shapes"),
        (lambda s: dict(list(s.items())[1:]), "missing 1"),
        (lambda s: {**s, "extra.weight": torch.zeros(2)}, "unexpected 1 (extra.weight)"),
    ],
    ids=["int-for-float", "shapes", "missing", "extra"],
)
def test_weights_that_do_not_fit_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str, change, says: str
) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(
        {k: v.contiguous() for k, v in change(_layer_state(user_models)).items()}, str(weights)
    )
    out = tmp_path / "o"
    bad(
        capsys,
        "export",
        f"{user_models}:layer",
        "--weights",
        str(weights),
        "--out",
        str(out),
        says=(says,),
    )
    assert not out.exists()


def test_fp16_weights_widen_losslessly_with_a_note(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in _layer_state(user_models).items()
    }
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    outcome = cli(capsys, "inspect", f"{user_models}:layer", "--weights", str(weights))
    assert outcome.code == 0 and "widened losslessly (float16 -> float32)" in outcome.err


def test_random_bytes_as_weights_are_called_corrupt_not_unsafe(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(os.urandom(4096))
    line = bad(capsys, "inspect", f"{user_models}:layer", "--weights", str(weights))
    assert "--allow-unsafe-pickle" not in line and "corrupt" in line
    assert "weights_only" not in line  # torch's advice to unpickle freely is not passed on


def test_a_pickled_payload_in_weights_names_the_opt_in(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    marker = tmp_path / "ran"
    weights = tmp_path / "w.pt"
    torch.save({"x": Payload(marker)}, weights)
    bad(
        capsys,
        "inspect",
        f"{user_models}:layer",
        "--weights",
        str(weights),
        says=("--allow-unsafe-pickle",),
    )
    assert not marker.exists()


# ---- the output folder -----------------------------------------------------------------------


def test_an_out_holding_another_tools_manifest_is_left_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "their release", "files": []}))
    before = snapshot(out)
    bad(capsys, "export", f"{user_models}:layer", "--out", str(out), says=("did not write",))
    assert snapshot(out) == before


def test_a_reexport_owns_its_folder_and_removes_stale_staging(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    out = tmp_path / "out"
    model = f"{user_models}:layer"
    assert (
        cli(
            capsys, "export", model, "--format", "onnx,kernels", "--sm", "80", "--out", str(out)
        ).code
        == 0
    )
    assert (out / "kernels" / "bundle.json").is_file()
    (out / ".ultramem-staging-killed").mkdir()  # what a SIGKILLed export leaves
    assert cli(capsys, "export", model, "--out", str(out)).code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"manifest.json", "parity.json", "model.onnx"}, names
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == ["model.onnx"]


def test_two_exports_into_one_folder_the_second_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running export holds the folder
        bad(
            capsys,
            "export",
            f"{user_models}:layer",
            "--out",
            str(out),
            says=("another ultramem export",),
        )
    finally:
        os.close(held)
    assert list(out.iterdir()) == []


def test_check_leaves_the_folder_as_it_was(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "export", "--out", str(out)).code == 0
    before = snapshot(out)
    assert cli(capsys, "check", "--artifacts", str(out)).code == 0
    assert snapshot(out) == before


def _as_a_shell_would() -> None:
    """The signals of a command started in a terminal: the default dispositions, none
    blocked. A child inherits ignored and blocked signals from its parent, and a pytest
    worker that has run other tests (in CI, after the suite's in-process compiles) may
    ignore SIGINT; an export started from it then rightly ignores Ctrl-C too."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start_export(tmp_path: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = "import sys; from ultramem.cli.main import run; sys.exit(run(sys.argv[1:]))"
    args = [REPO_PYTHON, "-c", code, "export", "--out", str(out)]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_as_a_shell_would
    )
    deadline = time.monotonic() + 120
    while not any(out.glob(".ultramem-staging-*")):  # mid-export: staging exists
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_export_leaves_no_trace(tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "new"
    proc = _start_export(tmp_path, out)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()[-2000:]
    assert b"Traceback" not in err
    assert not out.exists(), list(out.iterdir())


# ---- parity records ---------------------------------------------------------------------------


def test_stages_that_did_not_run_have_no_verdict_and_json_is_strict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    out = tmp_path / "out"
    outcome = cli(capsys, "export", f"{user_models}:nan_weights", "--out", str(out))
    assert outcome.code == 1
    assert "original model's own output holds" in outcome.err

    def no_constants(name: str) -> None:
        raise AssertionError(f"bare {name} in JSON")

    for name in ("manifest.json", "parity.json"):
        json.loads((out / name).read_text(), parse_constant=no_constants)
    stages = json.loads((out / "parity.json").read_text())["stages"]
    skipped = [s for s in stages if not s["executed"]]
    assert skipped and all(s["passed"] is None for s in skipped)


def test_a_pass_says_which_stages_did_not_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    outcome = cli(capsys, "export", f"{user_models}:layer", "--out", str(tmp_path / "o"))
    assert outcome.code == 0
    assert "parity PASSED (1 of 4 stages not executed: onnxruntime-cuda)" in outcome.out


# ---- one-line errors before any long work -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--sm", "7"), "--sm 7"),
        (("--sm", "999"), "--sm 999"),
        (("--sm", ""), "--sm is empty"),
        (("--sm", "8x"), "comma-separated integers"),
        (("--opset", "7"), "--opset 7"),
        (("--opset", "99"), "--opset 99"),
        (("--precision", "fp16"), "--precision applies"),
        (("--format", "tensorrt", "--profile-tokens", "5,1,3"), "1 <= min <= opt <= max"),
        (("--format", "tensorrt", "--profile-tokens", "0,1,2"), "1 <= min"),
        (("--format", "tensorrt", "--profile-tokens", "1,2"), "min,opt,max"),
        (("--format", "onnx,,aoti"), "each format once"),
        (("--format", "onnx,onnx"), "each format once"),
        (("--format", "pdf"), "unknown format"),
    ],
)
def test_export_options_are_checked_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    out = tmp_path / "o"
    bad(capsys, "export", "no_such_pkg.mod:never_imported", *args, "--out", str(out), says=(says,))
    assert not out.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here"
)
def test_a_missing_tensorrt_package_is_named_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = ("--format", "tensorrt", "--trt-package", "tensorrt", "--out", str(out))
    bad(capsys, "export", "no_such_pkg.mod:never_imported", *args, says=("pip install tensorrt",))
    assert not out.exists()


@pytest.mark.parametrize("name", ["../../etc/passwd", "../builtin/facts", "facts/../facts", ""])
def test_a_builtin_is_only_a_name_from_the_listing(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    bad(capsys, "inspect", f"builtin:{name}", says=("unknown builtin model", "known: facts"))


def test_an_out_path_the_system_refuses_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad(capsys, "export", "--out", str(tmp_path / ("x" * 300)), says=("File name too long",))


def test_a_profile_beyond_what_the_capture_admits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = ("export", "--format", "tensorrt", "--profile-tokens", "1,64,1024", "--out", str(out))
    bad(capsys, *args, says=("admits tokens",))
    assert not out.exists()


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        ("raises", "raised RuntimeError: the checkpoint server is down"),
        ("exits", "raised SystemExit: usage: train.py"),
        ("not_callable", "not a callable"),
        ("forward_fails", "forward fails on its example inputs"),
        ("bare_module", "without example inputs"),
        ("not_a_module", "must return an nn.Module"),
    ],
)
def test_factories_that_fail(
    capsys: pytest.CaptureFixture[str], user_models: str, factory: str, says: str
) -> None:
    bad(capsys, "inspect", f"{user_models}:{factory}", says=(says,))


def test_a_bare_module_with_example_inputs_is_accepted(
    capsys: pytest.CaptureFixture[str], user_models: str
) -> None:
    assert cli(capsys, "inspect", f"{user_models}:bare_with_example").code == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--tokens", "100000"), "no --tokens size"),
        (("--budget", "-1"), "--budget -1"),
        (("--budget", "nan"), "--budget nan"),
        (("--backends", "eager,warp"), "unknown warp"),
        (("--threads", "99999"), "--threads 99999: at most"),  # it segfaulted torch's pool
    ],
)
def test_bench_refuses_before_timing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    bad(capsys, "bench", *args, "--out", str(tmp_path / "b"), says=(says,))
    assert not (tmp_path / "b").exists()


def test_bench_compare_and_out_must_be_what_they_say(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "a bench"}')
    bad(
        capsys,
        "bench",
        "--compare",
        str(tmp_path / "none.json"),
        "--out",
        str(tmp_path / "b"),
        says=("no such file",),
    )
    bad(
        capsys,
        "bench",
        "--compare",
        str(junk),
        "--out",
        str(tmp_path / "b"),
        says=("not a bench.json",),
    )
    bad(capsys, "bench", "--out", str(junk), says=("not a folder",))


def test_bench_leaves_out_token_counts_the_model_cannot_take(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the bundled model admits 64 tokens; the default list asks for 256 too
    args = ("bench", "--backends", "eager", "--budget", "0.01", "--out", str(tmp_path / "b"))
    outcome = cli(capsys, *args)
    assert outcome.code == 0, outcome.err
    assert "--tokens 256 left out" in outcome.err
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["tokens"] == [1, 16, 64]


def test_an_internal_error_is_one_line_with_exit_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ultramem.compiler.pipeline as pipeline  # the command imports it when it runs

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("simulated bug\nwith a second line")

    monkeypatch.setattr(pipeline, "export_model", broken)
    outcome = cli(capsys, "export", "--out", str(tmp_path / "o"))
    assert outcome.code == 3
    assert "internal error: RuntimeError: simulated bug (a bug" in outcome.error_line()


def test_inspect_json_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    code = "import sys; from ultramem.cli.main import run; sys.exit(run(sys.argv[1:]))"
    shell = f"{REPO_PYTHON} -c '{code}' inspect --json | head -c 10 > /dev/null"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell], capture_output=True, timeout=300
    )
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr
    assert result.returncode == 0, result.stderr.decode()[-2000:]
