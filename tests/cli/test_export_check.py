"""``ultramem export`` + ``ultramem check`` end to end: the bundled model and a user factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ultramem.cli.main import cli
from ultramem.compiler.artifacts import sha256_file
from ultramem.kernels import DOMAIN_VERSION


@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundled") / "artifacts"
    result = CliRunner().invoke(cli, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_bundled_model_exports_selection_exact_at_fp32(bundled_export: Path) -> None:
    manifest = json.loads((bundled_export / "manifest.json").read_text())
    assert manifest["source"]["model"] == "builtin:facts"
    assert [m["name"] for m in manifest["memory_layers"]] == ["memories.0"]
    assert all(m["fused"] == ["selection", "aggregation"] for m in manifest["memory_layers"])
    assert manifest["ops"]["after"]["ultramem.retrieve"] == 1
    assert "topk" not in manifest["ops"]["after"] and manifest["ops"]["before"]["topk"] == 3
    assert manifest["parity"]["passed"] is True
    for version in ("ultramem", "torch", "onnx", "onnxruntime"):
        assert manifest["versions"][version] != "not installed"
    onnx_info = manifest["onnx"]  # the fused lookup as two custom-domain nodes
    assert onnx_info["form"] == "custom" and onnx_info["domain"] == {
        "name": "ultramem",
        "version": DOMAIN_VERSION,
    }
    assert onnx_info["op_counts"]["ultramem::Retrieve"] == 1
    assert onnx_info["op_counts"]["ultramem::Aggregate"] == 1
    assert "TopK" not in onnx_info["op_counts"] and len(onnx_info["functions"]) == 2
    [onnx_art] = [a for a in manifest["artifacts"] if a["format"] == "onnx"]
    assert onnx_art["sha256"] == sha256_file(bundled_export / "model.onnx")
    report = json.loads((bundled_export / "parity.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert set(stages) == {"torch.export", "fused-ops", "onnxruntime-cpu", "onnxruntime-cuda"}
    # the CUDA provider is a stage of its own, reported as not executed where it cannot run
    cuda = stages["onnxruntime-cuda"]
    assert cuda["executed"] or "not executed" in cuda["reason"]
    assert len(report["inputs"]) >= 4  # sequence lengths other than the example's
    for stage in (s for s in stages.values() if s["executed"]):
        assert stage["passed"]
        assert stage["selections"] and all(s["differing"] == 0 for s in stage["selections"])
        assert all(o["max_abs"] <= 1e-4 for o in stage["outputs"])
    assert not list(bundled_export.glob(".ultramem-staging*"))


def test_check_passes_then_catches_a_changed_artifact(bundled_export: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(bundled_export)])
    assert result.exit_code == 0, result.output
    assert "parity PASSED" in result.output
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for p in bundled_export.iterdir():
        (tampered / p.name).write_bytes(p.read_bytes())
    with (tampered / "model.onnx").open("ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(tampered)])
    assert result.exit_code == 2 and "changed since export" in result.output


def test_factory_model_exports_and_check_needs_it_named(tmp_path: Path, user_models: str) -> None:
    out = tmp_path / "user"
    result = CliRunner().invoke(cli, ["export", f"{user_models}:two_layers", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["name"] for m in manifest["memory_layers"]] == ["memories.0", "memories.1"]
    assert manifest["source"]["model"] == f"{user_models}:two_layers"
    assert len(manifest["source"]["fingerprint"]) == 64
    # the folder names a factory: check imports nothing it names, and says how to ask
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(out)])
    assert result.exit_code == 2 and f"ultramem check {user_models}:two_layers" in result.output
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli,
        ["check", f"{user_models}:two_layers", "--artifacts", str(out), "--report", str(report)],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["passed"] is True
    # another model's weights: said in one line, not every output reported WRONG
    result = CliRunner().invoke(
        cli, ["check", f"{user_models}:two_layers_other_weights", "--artifacts", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "is not the model" in result.output and "FAILED |" not in result.output
    # re-exporting into our own earlier export is allowed
    result = CliRunner().invoke(cli, ["export", f"{user_models}:two_layers", "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_aotinductor_package_exports_and_joins_parity(tmp_path: Path) -> None:
    out = tmp_path / "aoti"
    result = CliRunner().invoke(cli, ["export", "--format", "onnx,aoti", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["format"] for a in manifest["artifacts"]} == {"onnx", "aoti"}
    stages = {s["stage"]: s for s in json.loads((out / "parity.json").read_text())["stages"]}
    aoti = stages["aotinductor"]
    assert aoti["passed"] and aoti["selections"]
    assert all(s["differing"] == 0 for s in aoti["selections"])
    assert all(o["max_abs"] <= 1e-4 for o in aoti["outputs"])

    # a folder is data from elsewhere: its shared library runs only when the user says so
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(out)])
    assert result.exit_code == 0, result.output
    verdict = result.output.strip().splitlines()[-1]
    assert verdict.startswith("parity PASSED") and "aotinductor" in verdict
    assert "--allow-native-code" in result.output
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(out), "--allow-native-code"])
    verdict = result.output.strip().splitlines()[-1]
    assert result.exit_code == 0 and "aotinductor" not in verdict, result.output


def test_check_runs_only_what_the_manifest_lists(bundled_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "planted"
    folder.mkdir()
    for entry in bundled_export.iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    # files beside the listed ones, as an attacker would plant them: none is loaded
    (folder / "model.aoti.pt2").write_bytes(b"PK\x03\x04 not a package, and never opened")
    (folder / "model.engine").write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(folder), "--allow-native-code"])
    assert result.exit_code == 0, result.output
    assert "aotinductor" not in result.output and "tensorrt" not in result.output


def test_portable_form_inlines_the_functions_and_keeps_parity(tmp_path: Path) -> None:
    out = tmp_path / "portable"
    result = CliRunner().invoke(cli, ["export", "--onnx-form", "portable", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx"]["form"] == "portable" and manifest["onnx"]["functions"] == []
    assert not any(op.startswith("ultramem::") for op in manifest["onnx"]["op_counts"])
    assert manifest["onnx"]["op_counts"]["TopK"] == 3
    stage = manifest["parity"]["stages"]["onnxruntime-cpu"]
    assert stage["passed"] and stage["selections_differing"] == 0 < stage["selections_compared"]


def test_unknown_format_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["export", "--format", "onnx,tflite", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "tflite" in result.output
    assert not (tmp_path / "o").exists()


def test_engine_and_kernel_bundle_for_the_bundled_model(tmp_path: Path) -> None:
    """TensorRT-RTX builds the engine on this CPU machine; the engine cannot run here, and
    the manifest and the report say so. The bundle holds cubin and PTX per SM."""
    out = tmp_path / "trt"
    args = ["export", "--format", "onnx,tensorrt,kernels", "--sm", "80,90,120", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    formats = [a["format"] for a in manifest["artifacts"]]
    assert formats.count("onnx") == 1 and formats.count("tensorrt") == 1
    cubins = [a["path"] for a in manifest["artifacts"] if a["path"].endswith(".cubin")]
    assert len(cubins) == 6 and {c.rsplit("-sm", 1)[1] for c in cubins} == {
        "80.cubin",
        "90.cubin",
        "120.cubin",
    }
    for art in manifest["artifacts"]:
        assert sha256_file(out / art["path"]) == art["sha256"]
    trt = manifest["tensorrt"]
    assert trt["executed"] is False and trt["execution_note"]
    assert trt["layer_counts"]["TOPK"] == 3  # the lookup in TensorRT's own layers
    assert trt["profile"]["tokens"][2] == 64  # capped at what the capture admits
    stages = {s["stage"]: s for s in json.loads((out / "parity.json").read_text())["stages"]}
    assert (
        stages["tensorrt"]["executed"] is False and "not executed" in stages["tensorrt"]["reason"]
    )
    kernels = stages["plugin-kernels"]  # the bundle, launched as a plugin would, on a GPU
    assert kernels["passed"] if kernels["executed"] else "CUDA" in kernels["reason"]


def test_plugin_mode_under_tensorrt_rtx_is_refused_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "plugin"
    result = CliRunner().invoke(
        cli, ["export", "--format", "tensorrt", "--trt-mode", "plugin", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "cannot build a plugin engine" in result.output and "native" in result.output
    assert not out.exists()


def _tampered(bundled_export: Path, tmp_path: Path, change: object) -> Path:
    folder = tmp_path / "tampered"
    folder.mkdir()
    for entry in bundled_export.iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest, folder)  # type: ignore[operator]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _link_out(manifest: dict, folder: Path) -> None:
    outside = folder.parent / "elsewhere.onnx"
    (folder / "model.onnx").rename(outside)
    (folder / "model.onnx").symlink_to(outside)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m, _: m.update(formats=[]), "lists formats []"),
        (lambda m, _: m.update(formats=["onnx", "onnx"]), "lists formats"),
        (lambda m, _: m.update(artifacts=[]), "without model.onnx among its artifacts"),
        (_link_out, "a link out of the folder"),
    ],
    ids=["no-formats", "twice", "entry-removed", "symlink-out"],
)
def test_a_manifest_that_hides_or_unhashes_an_artifact_is_refused(
    bundled_export: Path, tmp_path: Path, change: object, says: str
) -> None:
    folder = _tampered(bundled_export, tmp_path, change)
    result = CliRunner().invoke(cli, ["check", "--artifacts", str(folder)])
    assert result.exit_code == 2 and says in result.output, result.output
