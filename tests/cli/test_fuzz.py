"""Property: whatever a user passes, the CLI answers by its contract.

Hypothesis draws a command, a MODEL (good, missing, malformed, a factory that fails, a
file of random bytes, a zip that is no program, a program that calls ``aten.from_file``,
an ``hf:`` checkpoint nested past the JSON parser's depth or naming a shard outside its
folder, a name too long), a weights file (good, truncated, random bytes, wrong dtype or
shape, bool for float, a pickle that would run code), flag values (formats, opsets, SMs,
precisions, profiles, tokens, budgets) and an ``--out`` (new, a file, someone else's
folder, our file names planted as links to a file outside, a deep manifest, a name too
long, a name that is not UTF-8). For every draw:

- the exit code is 0, 1 or 2 (3 would be an internal error: a bug), and no traceback;
- an error (2) is one line on stderr;
- ``--out`` is either complete (a valid manifest listing files that exist) or exactly as
  it was before the call;
- the pickle's payload never ran, and no file outside the target was written or made.

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

import pytest
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
        "from_file.pt2",
        "just words",
        "hf:deep",
        "hf:outside",
        "long",
    ]
)
WEIGHTS = st.sampled_from(
    [None, "good", "truncated", "random", "int32", "bool", "shapes", "pickle", "missing"]
)
# new, a file, another tool's folder, our export's names planted as links to a file
# outside, a manifest nested past the parser's depth, a name the system cannot take, a
# name that is not UTF-8
OUTS = st.sampled_from(["new", "file", "theirs", "links", "deep", "long", "not-utf8"])
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
    model, example = namespace["layer"]()  # type: ignore[operator]
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
    files["bool"] = root / "bool.safetensors"
    save_file({k: v > 0 for k, v in state.items()}, str(files["bool"]))
    files["missing"] = root / "missing.safetensors"
    (root / "random.pt2").write_bytes(os.urandom(300))
    with zipfile.ZipFile(root / "zip.pt2", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x04junk")
    _from_file_pt2(model, example, root / "from_file.pt2", marker)
    deep = root / "deep"
    deep.mkdir()
    (deep / "config.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    (deep / "model.safetensors").write_bytes(files["good"].read_bytes())
    outside = root / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(files["good"].read_bytes())
    shard = root / "outside_shard"
    shard.mkdir()
    config = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    (shard / "config.json").write_text(json.dumps(config))
    index = {"weight_map": {"lm_head.weight": "../outside/model.safetensors"}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def _from_file_pt2(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, marker: Path
) -> None:
    """A real program whose first call names ``aten.from_file`` on ``marker``: loading
    or running it as torch would creates the file."""
    torch.export.save(torch.export.export(model, example), str(path))
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    for name, data in members.items():
        if name.endswith(".json") and "/models/" in f"/{name}":
            text = data.decode()
            program = json.loads(text)
            nodes = program["graph_module"]["graph"]["nodes"]
            nodes[0]["target"] = "torch.ops.aten.from_file.default"
            nodes[0]["inputs"] = [
                {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                {"name": "size", "arg": {"as_int": 1 << 20}, "kind": 1},
            ]
            members[name] = json.dumps(program).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


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
    _answers_by_the_contract(command, model, weights, out_kind, flags)


# every hostile input at least once, with no flag that would stop it first (the draws
# above mostly end at a flag a command does not take)
HOSTILE = [
    *[
        ("export", model, None, "new")
        for model in ("from_file.pt2", "hf:deep", "hf:outside", "long")
    ],
    ("export", f"{MODULE}:layer", "bool", "new"),
    *[
        (command, None, None, out)
        for command in ("export", "check", "bench")
        for out in ("links", "deep", "long", "not-utf8")
    ],
]


@pytest.mark.parametrize(("command", "model", "weights", "out_kind"), HOSTILE)
def test_each_hostile_input_gets_an_answer_by_the_contract(
    command: str, model: str | None, weights: str | None, out_kind: str
) -> None:
    _answers_by_the_contract(command, model, weights, out_kind, [])


def _answers_by_the_contract(
    command: str, model: str | None, weights: str | None, out_kind: str, flags: list
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / f"{MODULE}.py").write_text(FACTORY_MODULE)
        marker = root / "payload-ran"
        files = _files(root, marker)
        out = root / "out"
        victim = root / "outside" / "victim"
        victim.write_text("precious")
        if out_kind == "file":
            out.write_text("not a folder")
        elif out_kind == "theirs":
            out.mkdir()
            (out / "manifest.json").write_text('{"theirs": true}')
        elif out_kind == "links":
            out.mkdir()
            for name in ("manifest.json", "model.onnx", ".ultramem.lock", "bench.json"):
                (out / name).symlink_to(victim)
        elif out_kind == "deep":
            out.mkdir()
            (out / "manifest.json").write_text("[" * 50_000 + "]" * 50_000)
        elif out_kind == "long":
            out = root / ("o" * 300)
        elif out_kind == "not-utf8":
            out = root / "out\udcff"
        outside_before = _snapshot(root / "outside")
        before = _snapshot(out)
        args = [command]
        if model == "long":
            args.append(str(root / ("m" * 300)) + ".pt2")
        elif model is not None and model.startswith("hf:"):
            args.append(f"hf:{root / ('deep' if model == 'hf:deep' else 'outside_shard')}")
        elif model is not None:
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
        # nothing outside the target was written, whatever links the folder held
        assert victim.read_text() == "precious", args
        assert _snapshot(root / "outside") == outside_before, args


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
    try:
        if not path.exists():
            return None
    except (OSError, ValueError):  # a name the system cannot take: nothing is there
        return None
    if path.is_file():
        return ("file", path.read_bytes())
    return sorted(
        (str(p.relative_to(path)), p.lstat().st_size, p.is_symlink()) for p in path.rglob("*")
    )


def _complete(out: Path) -> bool:
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return manifest.get("kind") == "ultramem-artifacts" and all(
        (out / a["path"]).is_file() for a in manifest["artifacts"]
    )
