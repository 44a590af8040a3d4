"""What ``check`` and ``bench`` read from a folder, through the real entry point.

An artifacts folder and an ``hf:DIR`` checkpoint are data from elsewhere: everything read
from one is listed in its manifest and hashed (an ONNX model's external data, a kernel
bundle's cubins included), or refused up front, exit 2 in one line naming the file,
before the model loads. A suggested command quotes what the folder says. Native code
(the bundle's cubins, like the AOTInductor package) runs only with ``--allow-native-code``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import helper, numpy_helper

from ultramem.cli.main import run
from ultramem.compiler.artifacts import sha256_file
from ultramem.tests.cli.conftest import FACTORY_MODULE
from ultramem.tests.cli.test_reliability import bad, cli, snapshot

MODULE = "user_models_reads"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``user_models``, once per module: the export below is made once."""
    folder = tmp_path_factory.mktemp("models")
    (folder / f"{MODULE}.py").write_text(FACTORY_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield MODULE


@pytest.fixture(scope="module")
def exported(models: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    args = ["export", f"{models}:layer", "--format", "onnx,kernels", "--sm", "80"]
    assert run([*args, "--out", str(out)]) == 0
    return out


@pytest.fixture
def folder(exported: Path, tmp_path: Path) -> Path:
    """A copy of the export, for a test to tamper with."""
    return Path(shutil.copytree(exported, tmp_path / "artifacts", symlinks=True))


@pytest.fixture
def model(models: str) -> str:
    return f"{models}:layer"


def _edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rehash(folder: Path, name: str) -> None:
    """What an attacker who writes the manifest too does after changing a listed file."""

    def change(manifest: dict[str, Any]) -> None:
        for art in manifest["artifacts"]:
            if art["path"] == name:
                art["sha256"] = sha256_file(folder / name)
                art["bytes"] = (folder / name).stat().st_size

    _edit_manifest(folder, change)


def _list(folder: Path, name: str, fmt: str) -> None:
    def change(manifest: dict[str, Any]) -> None:
        path = folder / name
        entry = {"path": name, "format": fmt, "bytes": path.stat().st_size}
        manifest["artifacts"].append({**entry, "sha256": sha256_file(path)})

    _edit_manifest(folder, change)


def _external(tensor: onnx.TensorProto, data: bytes, location: str, into: Path | None) -> None:
    """``tensor``'s bytes moved to ``location`` (written to ``into`` when given)."""
    if into is not None:
        into.parent.mkdir(parents=True, exist_ok=True)
        into.write_bytes(data)
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        tensor.external_data.add(key=key, value=value)


def _plant_external(folder: Path, location: str, into: Path | None) -> str:
    """The model's largest weight read from ``location`` instead, its true bytes written
    to ``into`` (so that a runtime which read it would pass parity), and ``model.onnx``
    rehashed in the manifest; the tensor's name."""
    path = folder / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    tensor = max(graph.graph.initializer, key=lambda t: numpy_helper.to_array(t).nbytes)
    _external(tensor, numpy_helper.to_array(tensor).tobytes(), location, into)
    path.write_bytes(graph.SerializeToString())
    _rehash(folder, "model.onnx")
    return tensor.name


def _refused_up_front(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str, says: tuple[str, ...]
) -> None:
    """``check`` and ``bench`` of ``folder``: exit 2 in one line saying ``says``, before
    the model loads, nothing written."""
    before = snapshot(folder)
    outcome = cli(capsys, "check", model, "--artifacts", str(folder))
    assert outcome.code == 2, (outcome.code, outcome.err)
    line = outcome.error_line()
    assert all(s in line for s in says), line
    assert "[ultramem] loading" not in outcome.err
    bench_out = folder.parent / "bench"
    bad(capsys, "bench", model, "--artifacts", str(folder), "--out", str(bench_out), says=says)
    assert not bench_out.exists()
    assert snapshot(folder) == before


# ---- an ONNX model's external data -------------------------------------------------------------


def test_external_data_planted_beside_the_model_is_refused(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str
) -> None:
    # the planted file holds the true weights: read, it would pass parity unnoticed
    name = _plant_external(folder, "planted.bin", folder / "planted.bin")
    _refused_up_front(capsys, folder, model, (repr(name), "'planted.bin'", "not a file"))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_external_data_outside_the_folder_is_refused(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str, where: str
) -> None:
    outside = folder.parent / "outside.bin"
    location = "../outside.bin" if where == "parent" else str(outside)
    name = _plant_external(folder, location, outside)
    _refused_up_front(capsys, folder, model, (repr(name), repr(location)))


def test_external_data_in_a_subgraph_is_refused(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str
) -> None:
    """An If node whose branch holds the externally stored weight: the walk goes into
    subgraphs, where the graph's own initializers are not."""
    path = folder / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    weights = numpy_helper.to_array(graph.graph.initializer[0])
    hidden = numpy_helper.from_array(weights, "hidden")
    _external(hidden, weights.tobytes(), "planted.bin", folder / "planted.bin")

    def branch(name: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", hidden.data_type, None)
        node = helper.make_node("Identity", ["hidden"], [f"{name}_out"])
        return helper.make_graph([node], name, [], [out], initializer=[hidden])

    cond = helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", 9, [], [1]))
    branches = {"then_branch": branch("then"), "else_branch": branch("else")}
    graph.graph.node.extend([cond, helper.make_node("If", ["cond"], ["unused"], **branches)])
    path.write_bytes(graph.SerializeToString())
    _rehash(folder, "model.onnx")
    _refused_up_front(capsys, folder, model, ("'hidden'", "'planted.bin'"))


def test_our_own_external_data_is_listed_hashed_and_checks(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large model's weights go to ``model.onnx.data``: the export lists it (so check
    reads it), and a changed byte in it is refused like any artifact's."""
    from ultramem.compiler.onnx import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)  # every model is large
    out = tmp_path / "out"
    assert cli(capsys, "export", model, "--out", str(out)).code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    formats = {a["path"]: a["format"] for a in manifest["artifacts"]}
    assert formats == {"model.onnx": "onnx", "model.onnx.data": "onnx-external-data"}
    outcome = cli(capsys, "check", model, "--artifacts", str(out))
    assert outcome.code == 0 and "parity PASSED" in outcome.out, outcome.err
    with (out / "model.onnx.data").open("r+b") as f:
        f.write(b"\x7f")
    bad(capsys, "check", model, "--artifacts", str(out), says=("model.onnx.data changed",))


# ---- the manifest and the paths it lists -------------------------------------------------------


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_manifest_that_is_a_link_is_refused(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str, target: str
) -> None:
    real = (folder.parent if target == "outside" else folder) / "real-manifest.json"
    (folder / "manifest.json").rename(real)
    (folder / "manifest.json").symlink_to(real)
    _refused_up_front(capsys, folder, model, (f"{folder / 'manifest.json'} is a link",))


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_an_artifact_under_a_linked_subfolder_is_refused(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str, target: str
) -> None:
    """``kernels/`` moved elsewhere (or to another name in the folder) and linked back:
    every file under it is unchanged and hashes right, and is still refused."""
    moved = (folder.parent if target == "outside" else folder) / "moved-kernels"
    (folder / "kernels").rename(moved)
    (folder / "kernels").symlink_to(moved, target_is_directory=True)
    _refused_up_front(capsys, folder, model, (f"{folder / 'kernels'} is a link",))


# ---- the kernel bundle's cubins ----------------------------------------------------------------


def _bundle_names(folder: Path, cubin: str) -> None:
    """bundle.json's first kernel loads ``cubin`` instead; bundle.json rehashed."""
    path = folder / "kernels" / "bundle.json"
    bundle = json.loads(path.read_text())
    bundle["kernels"][0]["cubin"] = cubin
    path.write_text(json.dumps(bundle))
    _rehash(folder, "kernels/bundle.json")


@pytest.mark.parametrize("cubin", ["planted.cubin", "../planted.cubin", "/tmp/planted.cubin"])
def test_a_cubin_the_manifest_does_not_list_is_refused(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str, cubin: str
) -> None:
    original = next((folder / "kernels").glob("*.cubin"))
    if not cubin.startswith("/"):
        shutil.copy(original, folder / "kernels" / cubin)  # the true bytes, unlisted
    _bundle_names(folder, cubin)
    _refused_up_front(capsys, folder, model, (repr(cubin), "kernels/bundle.json"))


def _plugin_stage(capsys: pytest.CaptureFixture[str], folder: Path, *args: str) -> dict:
    report = folder.parent / "report.json"
    outcome = cli(capsys, "check", *args, "--artifacts", str(folder), "--report", str(report))
    assert outcome.code == 0, outcome.err
    stages = {s["stage"]: s for s in json.loads(report.read_text())["stages"]}
    return stages["plugin-kernels"]


def test_bundled_kernels_run_only_with_the_opt_in(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str
) -> None:
    """The cubins are native code: like the AOTInductor package, not executed without
    --allow-native-code (with it, here, the reason is the GPU this machine lacks)."""
    kernels = _plugin_stage(capsys, folder, model)
    assert not kernels["executed"]
    assert "kernels holds GPU kernels" in kernels["reason"]
    assert "--allow-native-code" in kernels["reason"]
    kernels = _plugin_stage(capsys, folder, model, "--allow-native-code")
    assert "--allow-native-code" not in kernels["reason"]


@pytest.mark.gpu
def test_on_a_gpu_kernels_run_with_consent_and_a_changed_cubin_never_loads(
    capsys: pytest.CaptureFixture[str], models: str, tmp_path: Path
) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability()
    out, model = tmp_path / "out", f"{models}:layer"
    args = ("--format", "onnx,kernels", "--sm", f"{major}{minor}", "--out", str(out))
    assert cli(capsys, "export", model, *args).code == 0
    assert "--allow-native-code" in _plugin_stage(capsys, out, model)["reason"]
    kernels = _plugin_stage(capsys, out, model, "--allow-native-code")
    assert kernels["executed"] and kernels["passed"]
    # listed and rehashed in the manifest, but not the bytes bundle.json records
    cubin = next((out / "kernels").glob("*.cubin"))
    cubin.write_bytes(cubin.read_bytes() + b"\0")
    _rehash(out, f"kernels/{cubin.name}")
    outcome = cli(capsys, "check", model, "--artifacts", str(out), "--allow-native-code")
    assert outcome.code == 1 and "sha256" in outcome.err + outcome.out, outcome.err


# ---- the command check suggests quotes what the folder says ------------------------------------


def _suggested(line: str) -> list[str]:
    command = line.split("e.g. `", 1)[1].rsplit("`", 1)[0]
    return shlex.split(command)


def _name_in_manifest(folder: Path, model: str, weights: str | None = None) -> None:
    _edit_manifest(folder, lambda m: m["source"].update(model=model, weights=weights))


def test_a_suggested_command_is_quoted(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    model = f"x; touch {marker}"
    weights = f"$(touch {marker}).safetensors"
    _name_in_manifest(folder, model, weights)
    line = bad(capsys, "check", "--artifacts", str(folder), says=("name it yourself",))
    want = ["ultramem", "check", model, "--weights", weights, "--artifacts", str(folder)]
    assert _suggested(line) == want
    assert not marker.exists()


@pytest.mark.parametrize(
    "model",
    ["x\ntouch /tmp/pwned", "x\x1b]0;title\x07", "a  b", "--allow-native-code"],
    ids=["newline", "terminal-escape", "two-spaces", "an-option"],
)
def test_a_name_that_does_not_paste_back_is_left_to_the_user(
    capsys: pytest.CaptureFixture[str], folder: Path, model: str
) -> None:
    """A word that, quoted, would not read back as itself from a one-line error (or would
    read as an option) becomes MODEL; what the folder said is shown escaped."""
    _name_in_manifest(folder, model)
    outcome = cli(capsys, "check", "--artifacts", str(folder))
    assert outcome.code == 2
    line = outcome.error_line()  # one line, whatever the name held
    assert "\x1b" not in outcome.err and "\x07" not in outcome.err
    assert _suggested(line) == ["ultramem", "check", "MODEL", "--artifacts", str(folder)]


def test_a_trusted_checkpoint_suggestion_is_quoted(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    model = "hf:ckpt`touch x`; rm -rf ~"
    _name_in_manifest(folder, model)
    args = ("check", "--trust-remote-code", "--artifacts", str(folder))
    line = bad(capsys, *args, says=("never the one a folder names",))
    assert _suggested(line) == [
        "ultramem", "check", model, "--trust-remote-code", "--artifacts", str(folder),
    ]  # fmt: skip


# ---- an hf:DIR checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved in several shards, with its model.safetensors.index.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("sharded") / "ckpt"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(directory, max_shard_size="40KB")
    assert len(list(directory.glob("*.safetensors"))) > 1
    return directory


@pytest.fixture
def checkpoint(sharded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "ckpt", symlinks=True))


INDEX = "model.safetensors.index.json"


def _map_shard(checkpoint: Path, to: str) -> str:
    """The index maps the first shard's tensors to ``to``; that shard's name."""
    index = json.loads((checkpoint / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: to if v == shard else v for k, v in index["weight_map"].items()}
    (checkpoint / INDEX).write_text(json.dumps(index))
    return shard


def test_a_sharded_checkpoint_loads(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> None:
    assert cli(capsys, "inspect", f"hf:{checkpoint}").code == 0


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_an_index_naming_a_shard_outside_is_refused(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, where: str
) -> None:
    other = checkpoint.parent / "other"
    other.mkdir()
    target = {
        "parent": "../other/model.safetensors",
        "absolute": str(other / "model.safetensors"),
        "subfolder": "other/model.safetensors",
    }[where]
    if where == "subfolder":
        other = checkpoint / "other"
        other.mkdir()
    shard = _map_shard(checkpoint, target)
    (checkpoint / shard).rename(other / "model.safetensors")  # the true weights, elsewhere
    bad(capsys, "inspect", f"hf:{checkpoint}", says=(INDEX, repr(target)))


def test_a_shard_linked_out_of_the_folder_is_refused(
    capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    outside = checkpoint.parent / shard.name
    shard.rename(outside)
    shard.symlink_to(outside)
    bad(capsys, "inspect", f"hf:{checkpoint}", says=(f"{shard.name} is a link out",))


def test_an_index_entry_linked_out_of_the_folder_is_refused(
    capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    """A shard whose name matches no weights pattern, reached through the index only."""
    shard = _map_shard(checkpoint, "weights.bytes")
    outside = checkpoint.parent / "weights.bytes"
    (checkpoint / shard).rename(outside)
    (checkpoint / "weights.bytes").symlink_to(outside)
    bad(capsys, "inspect", f"hf:{checkpoint}", says=(INDEX, "'weights.bytes'"))


def test_a_config_linked_out_of_the_folder_is_refused(
    capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    outside = checkpoint.parent / "config.json"
    (checkpoint / "config.json").rename(outside)
    (checkpoint / "config.json").symlink_to(outside)
    bad(capsys, "inspect", f"hf:{checkpoint}", says=("config.json is a link out",))


def test_a_hugging_face_cache_snapshot_loads_and_only_its_blobs_are_followed(
    capsys: pytest.CaptureFixture[str], sharded: Path, tmp_path: Path
) -> None:
    """``huggingface_hub`` keeps a snapshot as links into its repository's ``blobs/``:
    those are the checkpoint's own files. A link from there to anywhere else is not."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(sharded.iterdir())):
        blob = blobs / f"blob{i}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    assert cli(capsys, "inspect", f"hf:{snapshot}").code == 0
    stranger = tmp_path / "elsewhere.json"
    shutil.copyfile(sharded / "config.json", stranger)
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(stranger)
    bad(capsys, "inspect", f"hf:{snapshot}", says=("config.json is a link out",))


@pytest.mark.parametrize("which", ["index", "shard"])
def test_a_fifo_in_a_checkpoint_is_refused_not_waited_on(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, which: str
) -> None:
    path = checkpoint / INDEX if which == "index" else sorted(checkpoint.glob("*.safetensors"))[-1]
    path.unlink()
    os.mkfifo(path)
    bad(capsys, "inspect", f"hf:{checkpoint}", says=(path.name,))


def test_an_index_mapping_to_something_other_than_a_name_is_refused(
    capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    index = json.loads((checkpoint / INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = 123
    (checkpoint / INDEX).write_text(json.dumps(index))
    bad(capsys, "inspect", f"hf:{checkpoint}", says=(INDEX, "123"))


def test_a_checkpoint_error_is_one_line_without_transformers_progress_bars(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    # loads (a progress bar's moment), then fails on an opset the model cannot be written in
    bad(capsys, "export", f"hf:{checkpoint}", "--opset", "17", "--out", str(tmp_path / "o"))
