"""What the CLI writes, under hostile folders and a hostile machine (issue 27).

Writes go only to files ultramem creates (never through a link already there); a signal,
even SIGKILL, at the moment an export is published never costs the last good export; the
operating system's refusals (a full disk, a read-only folder, a name too long, a folder
removed mid-export) are bad input: exit 2, one line, nothing half-written. Each test
drives the real entry point (``run`` or the console module in a subprocess) with the
real condition: links, signals, a tmpfs, ``RLIMIT_FSIZE``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ultramem.cli.main import run
from ultramem.compiler.artifacts import PUBLISHING, finish_interrupted_publish
from ultramem.tests.cli.test_reliability import bad, cli, snapshot

PYTHON = sys.executable


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _hashes_hold(folder: Path) -> list[str]:
    """The manifest's artifacts, each present with its hash; the files it names."""
    from ultramem.compiler.artifacts import read_manifest, verify_artifacts

    manifest = read_manifest(folder)
    verify_artifacts(folder, manifest)
    return sorted(a["path"] for a in manifest["artifacts"])


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two exports of the bundled model, made once: the old (opset 18) and the new (the
    default opset) of every publishing test, told apart by their manifests."""
    root = tmp_path_factory.mktemp("exports")
    old, new = root / "old", root / "new"
    assert run(["export", "--opset", "18", "--out", str(old)]) == 0
    assert run(["export", "--out", str(new)]) == 0
    assert _opset(old) != _opset(new)
    return old, new


def _opset(folder: Path) -> int:
    return int(json.loads((folder / "manifest.json").read_text())["onnx"]["opset"])


# ---- signals at the publishing moment ---------------------------------------------------------

# Run in a child: an export whose publishing renames send the process a real signal at
# the chosen rename. ``os.replace`` is the call the writer publishes with.
_SIGNALLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    from ultramem.cli.main import run

    sig, at = int(sys.argv[1]), int(sys.argv[2])
    real_replace, count = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if ".ultramem-publishing" in str(dst) or ".ultramem-publishing" in str(src):
            if count[0] == at:
                os.kill(os.getpid(), sig)
            count[0] += 1
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    sys.exit(run(sys.argv[3:]))
    """
)


def _as_a_shell_would() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _signalled_export(out: Path, sig: int, at: int) -> subprocess.CompletedProcess[bytes]:
    """The new export (the default opset) into ``out``, sent ``sig`` at rename ``at``:
    0 the commit (staging to publishing), 1 model.onnx, 2 parity.json, 3 the manifest."""
    args = ["export", "--out", str(out)]
    return subprocess.run(
        [PYTHON, "-c", _SIGNALLED_EXPORT, str(int(sig)), str(at), *args],
        capture_output=True,
        timeout=300,
        preexec_fn=_as_a_shell_would,
    )


@pytest.mark.parametrize(
    ("sig", "at", "code", "expected"),
    [
        # the signal waits for the renames: the new export is whole, then the exit
        (signal.SIGTERM, 0, 143, "new"),
        # SIGINT is deferred by the same code as SIGTERM
        pytest.param(signal.SIGINT, 2, 130, "new", marks=pytest.mark.slow),
        # SIGKILL cannot wait: at the commit rename (before it runs) the old export is
        # whole; after it, the next reader finishes the new one
        (signal.SIGKILL, 0, -9, "old"),
        (signal.SIGKILL, 2, -9, "new"),
    ],
)
def test_a_signal_while_publishing_never_costs_the_last_good_export(
    tmp_path: Path,
    two_exports: tuple[Path, Path],
    sig: int,
    at: int,
    code: int,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = two_exports
    out = tmp_path / "out"
    shutil.copytree(old, out, symlinks=True)
    done = _signalled_export(out, sig, at)
    assert done.returncode == code, done.stderr.decode()[-3000:]
    assert b"Traceback" not in done.stderr
    if sig == signal.SIGKILL:  # the next reader finishes (or never sees) the publish
        outcome = cli(capsys, "check", "--artifacts", str(out))
        assert outcome.code == 0, outcome.err
    assert not (out / PUBLISHING).exists()
    want = old if expected == "old" else new
    assert _opset(out) == _opset(want)
    assert _hashes_hold(out) == _hashes_hold(want)  # one whole export, every hash holding
    # (a killed export's staging stays until the next export: never read, then removed)
    names = {p.name for p in out.iterdir() if not p.name.startswith(".ultramem-staging-")}
    assert names == {"model.onnx", "manifest.json", "parity.json"}


def test_a_killed_writer_leaves_no_lock_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from ultramem.compiler.artifacts import FolderLock; "
            "FolderLock(Path(sys.argv[1]), 'busy'); print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    bad(capsys, "export", "--out", str(out), says=("another ultramem export",))
    holder.kill()
    holder.wait()
    assert cli(capsys, "export", "--out", str(out)).code == 0
    assert not any(p.name.startswith(".ultramem") for p in out.iterdir())


def _export_in_a_child(out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """An export of the bundled model into ``out`` in a child process, caught mid-export:
    the child and its staging folder, as soon as there is one."""
    code = "import sys; from ultramem.cli.main import run; sys.exit(run(sys.argv[1:]))"
    proc = subprocess.Popen(
        [PYTHON, "-c", code, "export", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (found := list(out.glob(".ultramem-staging-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc, found[0]


def test_a_folder_removed_mid_export_is_a_clear_answer(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, _ = _export_in_a_child(out)
    time.sleep(0.5)
    while out.exists():
        shutil.rmtree(out, ignore_errors=True)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.decode().splitlines() if not ln.startswith("[ultramem]")]
    assert proc.returncode == 2, err.decode()[-3000:]
    assert len(lines) == 1 and "removed or moved while the export ran" in lines[0], lines
    assert not out.exists()


# ---- links planted in the output folders ---------------------------------------------------


def test_exports_never_write_through_links_planted_in_out(
    tmp_path: Path, two_exports: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, _ = two_exports
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    shutil.copytree(old, out)
    # links where an export writes: its old files, the old lock file, the staging prefix
    (out / "model.onnx").unlink()
    (out / "model.onnx").symlink_to(victim)
    (out / ".ultramem.lock").symlink_to(outside / "lock-made-outside")
    (out / "parity.json").unlink()
    (out / "parity.json").symlink_to(outside)
    assert cli(capsys, "export", "--out", str(out)).code == 0
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert not (out / "model.onnx").is_symlink() and not (out / "parity.json").is_symlink()
    assert _hashes_hold(out) == ["model.onnx"]


def test_bench_never_writes_through_links_planted_in_out(
    tmp_path: Path, two_exports: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old, _ = two_exports
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "bench"
    out.mkdir()
    for name in ("bench.json", "bench.md", "bench.png"):
        (outside / name).write_text("precious")
        (out / name).symlink_to(outside / name)
        (out / f".{name}.tmp").symlink_to(outside / f"{name}.tmp-made-outside")
    args = ["bench", "--artifacts", str(old), "--tokens", "1", "--backends", "eager"]
    outcome = cli(capsys, *args, "--budget", "0.02", "--threads", "1", "--out", str(out))
    assert outcome.code == 0, outcome.err
    assert sorted(p.name for p in outside.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert all((outside / n).read_text() == "precious" for n in ("bench.json", "bench.md"))
    assert json.loads((out / "bench.json").read_text())["backends"][0]["name"] == "eager"


# ---- the machine refuses: full disk, read-only, names it cannot take --------------------


def _cli_in_child(
    args: list[str], env: dict[str, str] | None = None, fsize: int | None = None
) -> tuple[int, list[str]]:
    def limits() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = "import sys; from ultramem.cli.main import run; sys.exit(run(sys.argv[1:]))"
    done = subprocess.run(
        [PYTHON, "-c", code, *args],
        capture_output=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        preexec_fn=limits,
    )
    err = done.stderr.decode()
    assert "Traceback" not in err, err[-3000:]
    return done.returncode, [ln for ln in err.splitlines() if not ln.startswith("[ultramem]")]


def test_a_full_disk_under_out_is_bad_input_and_keeps_the_old_export(
    tmp_path: Path, two_exports: tuple[Path, Path]
) -> None:
    old, _ = two_exports
    out = tmp_path / "out"
    shutil.copytree(old, out)
    before = _tree(out)
    # files may grow to 64 KiB: the ONNX model (about 1 MB) cannot be written
    code, lines = _cli_in_child(["export", "--out", str(out)], fsize=64 << 10)
    assert code == 2 and len(lines) == 1 and "File too large" in lines[0], lines
    assert str(out) in lines[0]  # which folder could not take it
    assert _tree(out) == before


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk. Skips where mounting is not allowed."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_temporary_folder_for_aotinductor_is_bad_input(tmp_path: Path, tmpfs: Path) -> None:
    (tmpfs / "filler").write_bytes(b"\0" * ((2 << 20) - (64 << 10)))
    out = tmp_path / "out"
    env = {"TMPDIR": str(tmpfs), "TORCHINDUCTOR_CACHE_DIR": str(tmpfs / "inductor")}
    code, lines = _cli_in_child(["export", "--format", "aoti", "--out", str(out)], env=env)
    assert code == 2 and len(lines) == 1, lines
    assert "No space left on device" in lines[0], lines
    assert not out.exists()


def test_a_read_only_out_is_refused_before_the_model_loads(tmp_path: Path, tmpfs: Path) -> None:
    (tmpfs / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for where in (tmpfs / "out", tmpfs / "new" / "out"):
        start = time.monotonic()
        code, lines = _cli_in_child(["export", "--out", str(where)])
        assert code == 2 and len(lines) == 1, lines
        assert "not writable" in lines[0] or "Read-only" in lines[0], lines
        assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--out", "{long}"],
        ["check", "--artifacts", "{long}"],
        ["check", "--artifacts", "{tmp}", "--report", "{long}"],
        ["bench", "--out", "{long}"],
        ["bench", "--out", "{tmp}/b", "--compare", "{long}"],
        ["export", "builtin_models_x:make", "--weights", "{long}", "--out", "{tmp}/o"],
        ["export", "{long}.pt2", "--out", "{tmp}/o"],
        ["export", "hf:{long}", "--out", "{tmp}/o"],
        ["export", "--out", "{tmp}/a\udcff\udcfe"],
        ["check", "--artifacts", "{tmp}/x\udcff"],
    ],
)
def test_names_the_system_cannot_take_are_one_line_before_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    long = str(tmp_path / ("x" * 300))
    argv = [a.format(long=long, tmp=tmp_path) for a in args]
    start = time.monotonic()
    line = bad(capsys, *argv)
    assert "File name too long" in line or "UTF-8" in line, line
    assert time.monotonic() - start < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_and_bench_out_that_cannot_be_written_are_refused_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two_exports: tuple[Path, Path]
) -> None:
    old, _ = two_exports
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad(
        capsys,
        "check",
        "--artifacts",
        str(old),
        "--report",
        str(tmp_path / "missing" / "r.json"),
        says=("does not exist",),
    )
    bad(capsys, "bench", "--tokens", "1", "--out", str(a_file / "b"), says=("is not a folder",))
    (tmp_path / "b" / "bench.md").mkdir(parents=True)
    bad(capsys, "bench", "--tokens", "1", "--out", str(tmp_path / "b"), says=("bench.md",))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "b", "b/bench.md", "file",
    ]  # fmt: skip


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_malformed_or_deep_compare_file_is_refused_before_the_bench(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two_exports: tuple[Path, Path]
) -> None:
    old, _ = two_exports
    out = tmp_path / "bench"
    compare = tmp_path / "old.json"
    bad_reports = [
        {"schema": "ultramem-bench/1", "backends": "eager"},
        {"schema": "ultramem-bench/1", "backends": [{"name": "eager", "results": [1]}]},
        {
            "schema": "ultramem-bench/1",
            "backends": [
                {"name": "eager", "results": [{"status": "ok", "p50_ms": "1", "tokens": 1}]}
            ],
        },
    ]
    for report in bad_reports:
        compare.write_text(json.dumps(report))
        start = time.monotonic()
        bad(
            capsys,
            "bench",
            "--artifacts",
            str(old),
            "--tokens",
            "1",
            "--out",
            str(out),
            "--compare",
            str(compare),
        )
        assert time.monotonic() - start < 5
    compare.write_text('{"schema": "ultramem-bench/1", "x": ' + _nested(100_000) + "}")
    bad(
        capsys,
        "bench",
        "--tokens",
        "1",
        "--out",
        str(out),
        "--compare",
        str(compare),
        says=("nested too deeply",),
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_a_deep_manifest_in_out_is_not_ours_and_left_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(_nested(100_000))
    before = snapshot(out)
    bad(capsys, "export", "--out", str(out), says=("did not write",))
    assert snapshot(out) == before


# ---- wrong answers and noise ------------------------------------------------------------------


def test_bool_weights_for_float_parameters_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user_models: str
) -> None:
    import torch
    from safetensors.torch import save_file

    from ultramem.tests.cli.conftest import FACTORY_MODULE

    namespace: dict[str, object] = {}
    exec(FACTORY_MODULE, namespace)
    model, _ = namespace["layer"]()  # type: ignore[operator]
    state = {k: (v > 0) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "bools.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    line = bad(
        capsys,
        "export",
        f"{user_models}:layer",
        "--weights",
        str(path),
        "--out",
        str(tmp_path / "o"),
        says=("would change their values", "bool for float"),
    )
    assert "widened" not in line
    assert not (tmp_path / "o").exists()
    assert torch.float32 == next(iter(model.state_dict().values())).dtype


NOISY_MODULE = """
import torch

class Positions(torch.nn.Module):
    # a 32-row table and an even-length rule: torch.export tries dynamic tokens and
    # drops them, logging the guard it could not keep
    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(32, 8))
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        t = x.shape[1]
        h = (x + self.pos[:t]).reshape(x.shape[0] * t, 8)
        if t % 2 == 0:
            h = h * 2
        return self.lin(h).reshape(x.shape[0], t, 8)

def make():
    return Positions().eval(), (torch.randn(2, 6, 8),)
"""


def test_a_successful_export_prints_no_library_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "noisy_positions.py").write_text(NOISY_MODULE)
    code = "import sys; from ultramem.cli.main import run; sys.exit(run(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TORCH_LOGS", None)
    args = [PYTHON, "-c", code, "export", "noisy_positions:make", "--out", str(tmp_path / "o")]
    done = subprocess.run(args, capture_output=True, env=env, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 0, err[-3000:]
    assert "captured as static" in err  # it did fall back: there was something to log
    assert "Traceback" not in err and "torch/_guards.py" not in err, err[:3000]
    assert all(ln.startswith("[ultramem]") for ln in err.splitlines()), err[:3000]


@pytest.mark.slow
def test_verbose_still_shows_torchs_own_logs(tmp_path: Path) -> None:
    (tmp_path / "noisy_positions.py").write_text(NOISY_MODULE)
    code = "import sys; from ultramem.cli.main import run; sys.exit(run(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TORCH_LOGS", None)
    args = [
        PYTHON,
        "-c",
        code,
        "-v",
        "export",
        "noisy_positions:make",
        "--out",
        str(tmp_path / "v"),
    ]
    verbose = subprocess.run(args, capture_output=True, env=env, timeout=300)
    assert verbose.returncode == 0
    assert "torch/_guards.py" in verbose.stderr.decode()


def test_finish_interrupted_publish_leaves_a_plain_folder_alone(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    before = snapshot(tmp_path)
    finish_interrupted_publish(tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["model\0.onnx", "x" * 300 + ".onnx", "a/" * 2100 + "b"])
def test_a_manifest_path_the_system_cannot_take_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two_exports: tuple[Path, Path], name: str
) -> None:
    old, _ = two_exports
    folder = tmp_path / "art"
    shutil.copytree(old, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for command in (["check"], ["bench", "--tokens", "1", "--out", str(tmp_path / "b")]):
        bad(capsys, *command, "--artifacts", str(folder), says=("lists artifact",))
    assert not (tmp_path / "b").exists()


# ---- a second hostile pass (an independent tester's findings) ---------------------------------


def test_a_staging_folder_swapped_for_a_link_mid_export_is_found_and_not_published(
    tmp_path: Path, two_exports: tuple[Path, Path]
) -> None:
    """Another process that can rename entries of --out moves the staging folder away and
    plants a link to a folder of its own: the exporters, writing by path, write there. It
    cannot be undone, but it must not be called a success nor published."""
    old, _ = two_exports
    out = tmp_path / "out"
    shutil.copytree(old, out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc, staging = _export_in_a_child(out)
    staging.rename(tmp_path / "moved")
    staging.symlink_to(elsewhere)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.decode().splitlines() if not ln.startswith("[ultramem]")]
    assert proc.returncode == 2, err.decode()[-3000:]
    assert len(lines) == 1 and "replaced while the export ran" in lines[0], lines
    assert _hashes_hold(out) == _hashes_hold(old)  # the last good export, untouched
    assert not (out / PUBLISHING).exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "link"])
def test_a_report_path_that_is_not_a_regular_file_is_refused_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two_exports: tuple[Path, Path], kind: str
) -> None:
    old, _ = two_exports
    report = tmp_path / "report"
    if kind == "fifo":
        os.mkfifo(report)
    elif kind == "device":
        os.mknod(report, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # a null
    else:
        (tmp_path / "target.json").write_text("precious")
        report.symlink_to(tmp_path / "target.json")
    before = report.lstat()
    start = time.monotonic()
    bad(capsys, "check", "--artifacts", str(old), "--report", str(report), says=("regular file",))
    assert time.monotonic() - start < 5
    after = report.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


def test_a_report_name_as_long_as_a_name_may_be_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two_exports: tuple[Path, Path]
) -> None:
    old, _ = two_exports
    report = tmp_path / ("r" * 250)
    assert cli(capsys, "check", "--artifacts", str(old), "--report", str(report)).code == 0
    assert json.loads(report.read_text())["passed"] is True


def test_fifos_and_giants_where_json_is_read_are_refused_not_waited_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two_exports: tuple[Path, Path]
) -> None:
    old, _ = two_exports
    giant = tmp_path / "giant"
    shutil.copytree(old, giant)
    (giant / "manifest.json").unlink()
    with (giant / "manifest.json").open("wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB that would be read whole
    pending = tmp_path / "pending"
    shutil.copytree(old, pending)
    (pending / PUBLISHING).mkdir()
    os.mkfifo(pending / PUBLISHING / ".ultramem-names.json")
    compare = tmp_path / "compare.json"
    os.mkfifo(compare)
    for args in (
        ["check", "--artifacts", str(giant)],
        ["export", "--out", str(giant)],
        ["check", "--artifacts", str(pending)],
        ["bench", "--tokens", "1", "--out", str(tmp_path / "b"), "--compare", str(compare)],
    ):
        start = time.monotonic()
        outcome = cli(capsys, *args)
        assert outcome.code in (0, 2), (args, outcome.err)
        assert time.monotonic() - start < 60, args
        if outcome.code == 2:
            outcome.error_line()


def test_an_error_a_signal_caused_while_unwinding_is_the_signals_answer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C cut an import short and the half-imported module then failed in an odd way
    (numpy: RecursionError): exit 130, not an internal error."""
    (tmp_path / "cut_short.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    raise RecursionError('maximum recursion depth exceeded') from None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    outcome = cli(capsys, "export", "cut_short:make", "--out", str(tmp_path / "o"))
    assert outcome.code == 130, outcome.err
    assert "internal error" not in outcome.err


def test_a_signal_a_library_swallows_still_ends_the_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C 1.2 s into a capture was caught inside torch.export, and the export went
    on to publish and exit 0. Here the model's factory swallows it: the command must
    still end as interrupted, with nothing written."""
    (tmp_path / "swallows.py").write_text(
        "import os, signal, time, torch\n"
        "def make():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(5)\n"
        "    except KeyboardInterrupt:\n"
        "        pass  # as a library may\n"
        "    return torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "o"
    outcome = cli(capsys, "export", "swallows:make", "--out", str(out))
    assert outcome.code == 130, outcome.err
    assert "interrupted" in outcome.err
    assert not out.exists()
