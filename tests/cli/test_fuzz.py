"""Property: whatever a user passes, the CLI answers by its contract.

Hypothesis draws a command, a MODEL (good, missing, malformed, a factory that fails, a
file of random bytes, a zip that is no program), a weights file (good, truncated, random
bytes, wrong dtype or shape, a pickle that would run code), flag values (formats, opsets,
SMs, precisions, profiles, tokens, budgets) and an ``--out`` (new, a file, someone else's
folder). For every draw:

- the exit code is 0, 1 or 2 (3 would be an internal error: a bug), and no traceback;
- an error (2) is one line on stderr;
- ``--out`` is either complete (a valid manifest listing files that exist) or exactly as
  it was before the call;
- the pickle's payload never ran.

The draws are derandomized (the same examples in every CI run) and bounded to keep this
test's share of CI under a minute; most draws are refused before any capture.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ultramem.cli.main import run
from ultramem.tests.cli.conftest import FACTORY_MODULE

MODULE = "fuzz_user_models"

COMMANDS = st.sampled_from(["export", "inspect", "check", "bench"])
MODELS = st.sampled_from(
    [
        None,
        f"{MODULE}:layer",
        f"{MODULE}:raises",
        f"{MODULE}:not_callable",
        f"{MODULE}:forward_fails",
        f"{MODULE}:not_a_module",
        f"{MODULE}:missing",
        "no_such_pkg.mod:make",
        "builtin:nope",
        ":",
        "random.pt2",
        "zip.pt2",
        "just words",
    ]
)
WEIGHTS = st.sampled_from(
    [None, "good", "truncated", "random", "int32", "shapes", "pickle", "missing"]
)
OUTS = st.sampled_from(["new", "file", "theirs"])
FORMAT = st.lists(
    st.sampled_from(["onnx", "aoti", "kernels", "tensorrt", "pdf", ""]), min_size=0, max_size=3
).map(",".join)
NUMBERS = st.one_of(
    st.integers(min_value=-5, max_value=300).map(str),
    st.sampled_from(["", "abc", "1,2", "5,1,3", "0,1,2", "1,64,1024", "nan", "8x"]),
)
FLAGS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "--format",
                "--opset",
                "--sm",
                "--precision",
                "--profile-tokens",
                "--tokens",
                "--budget",
            ]
        ),
        st.one_of(FORMAT, NUMBERS, st.sampled_from(["fp16", "fp32", "int8"])),
    ),
    max_size=3,
)


def _files(root: Path, marker: Path) -> dict[str, Path]:
    namespace: dict[str, object] = {}
    exec(FACTORY_MODULE, namespace)
    model, _ = namespace["layer"]()  # type: ignore[operator]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = {}
    files["good"] = root / "good.safetensors"
    save_file(state, str(files["good"]))
    files["truncated"] = root / "truncated.safetensors"
    files["truncated"].write_bytes(files["good"].read_bytes()[:100])
    files["random"] = root / "random.pt"
    files["random"].write_bytes(os.urandom(512))
    files["int32"] = root / "int.safetensors"
    save_file({k: v.to(torch.int32) for k, v in state.items()}, str(files["int32"]))
    files["shapes"] = root / "shapes.safetensors"
    save_file({k: v.reshape(-1)[:1].contiguous() for k, v in state.items()}, str(files["shapes"]))

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    files["pickle"] = root / "pickle.pt"
    torch.save({"w": Payload()}, files["pickle"])
    files["missing"] = root / "missing.safetensors"
    (root / "random.pt2").write_bytes(os.urandom(300))
    with zipfile.ZipFile(root / "zip.pt2", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x04junk")
    return files


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(command=COMMANDS, model=MODELS, weights=WEIGHTS, out_kind=OUTS, flags=FLAGS)
def test_every_input_gets_an_answer_by_the_contract(
    command: str, model: str | None, weights: str | None, out_kind: str, flags: list
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / f"{MODULE}.py").write_text(FACTORY_MODULE)
        marker = root / "payload-ran"
        files = _files(root, marker)
        out = root / "out"
        if out_kind == "file":
            out.write_text("not a folder")
        elif out_kind == "theirs":
            out.mkdir()
            (out / "manifest.json").write_text('{"theirs": true}')
        before = _snapshot(out)
        args = [command]
        if model is not None:
            args.append(str(root / model) if model.endswith(".pt2") else model)
        if weights is not None:
            args += ["--weights", str(files[weights])]
        for flag, value in flags:
            args += [flag, value]
        args += ["--artifacts", str(out)] if command == "check" else []
        args += ["--out", str(out)] if command in ("export", "bench") else []
        if command == "bench":
            args += ["--backends", "eager", "--budget", "0.01", "--tokens", "4"]
        code, stdout, stderr = _run(args, root)
        assert code in (0, 1, 2), (args, code, stderr[-2000:])
        assert "Traceback" not in stdout + stderr, (args, stderr[-2000:])
        if code == 2:
            errors = [ln for ln in stderr.splitlines() if not ln.startswith("[ultramem]")]
            assert len(errors) == 1, (args, stderr)
        if command == "export":
            assert _snapshot(out) == before or _complete(out), (args, code, stderr[-500:])
        assert not marker.exists(), args


def _run(args: list[str], root: Path) -> tuple[int, str, str]:
    import sys

    stdout, stderr = io.StringIO(), io.StringIO()
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run(args)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)
    return code, stdout.getvalue(), stderr.getvalue()


def _snapshot(path: Path) -> object:
    if not path.exists():
        return None
    if path.is_file():
        return ("file", path.read_bytes())
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


def _complete(out: Path) -> bool:
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return manifest.get("kind") == "ultramem-artifacts" and all(
        (out / a["path"]).is_file() for a in manifest["artifacts"]
    )
