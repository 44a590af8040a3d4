"""``hf:DIR``: local ``transformers`` checkpoints as MODEL, made here with save_pretrained.

A plain ``LlamaForCausalLM``, and a research fork's Llama with memory layers in two MLP
slots shipped as remote code (its own modeling file and ``auto_map``): that one loads only
with ``--trust-remote-code``, and without it its file is never imported. Nothing is
downloaded; parity is against the checkpoint's own model in ``transformers``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ultramem.cli.main import cli
from ultramem.tests.cli.hf import checkpoints


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def fork(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.memory_fork(tmp_path_factory.mktemp("memllama"))


def test_a_llama_checkpoint_exports_and_checks(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _run("export", f"hf:{llama}", "--out", str(out))
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["model"] == f"hf:{llama.resolve()}"
    onnx = manifest["parity"]["stages"]["onnxruntime-cpu"]
    assert onnx["passed"] and onnx["max_abs"] <= 1e-4
    code, output = _run("check", f"hf:{llama}", "--artifacts", str(out))
    assert code == 0 and "parity PASSED" in output, output


def test_a_bf16_checkpoint_with_memories_fuses_exports_and_checks(tmp_path: Path) -> None:
    """What save_pretrained writes of a model trained in bf16: every memory layer fused,
    parity by the half-precision rule, ONNX Runtime's CPU provider (no bfloat16 kernels)
    not executed, saying why; check agrees."""
    import torch

    directory = checkpoints.memory_fork(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "out"
    code, output = _run("export", f"hf:{directory}", "--trust-remote-code", "--out", str(out))
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["memory_layers"]) == 2
    assert all(set(e["fused"]) == {"selection", "aggregation"} for e in manifest["memory_layers"])
    stages = manifest["parity"]["stages"]
    assert stages["fused-ops"]["passed"]
    ort = stages["onnxruntime-cpu"]
    assert ort["passed"] is None and "no kernel for" in ort["reason"]
    code, output = _run("check", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(out))
    assert code == 0 and "parity PASSED" in output, output


def test_an_olmoe_checkpoint_exports_its_forward_with_stock_operators(tmp_path: Path) -> None:
    """transformers' default grouped_mm experts are a custom op torch.onnx cannot
    translate; the load switches to batched_mm (the same maths) and says so."""
    if not importlib.util.find_spec("transformers.models.olmoe"):
        pytest.skip("this transformers has no OlmoeForCausalLM")
    directory = checkpoints.olmoe(tmp_path / "olmoe")
    out = tmp_path / "out"
    code, output = _run("export", f"hf:{directory}", "--out", str(out))
    assert code == 0, output
    assert "batched_mm experts" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["memory_layers"] == []  # the routers' top-ks are no memory lookup
    onnx = manifest["parity"]["stages"]["onnxruntime-cpu"]
    assert onnx["passed"] and onnx["max_abs"] <= 1e-4


def test_remote_code_needs_the_flag_and_is_never_imported_without_it(
    fork: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    monkeypatch.setenv("MEMLLAMA_IMPORT_MARKER", str(marker))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # where transformers copies it
    code, output = _run("inspect", f"hf:{fork}")
    assert code == 2 and "--trust-remote-code" in output and "auto_map" in output
    assert not marker.exists()
    out = tmp_path / "out"
    code, output = _run("export", f"hf:{fork}", "--trust-remote-code", "--out", str(out))
    assert code == 0, output
    assert marker.exists()
    manifest = json.loads((out / "manifest.json").read_text())
    # both memory MLPs fused, each part, selection-exact in every stage that ran
    assert manifest["ops"]["after"].get("ultramem.retrieve") == 2
    assert manifest["ops"]["after"].get("ultramem.aggregate") == 2
    for stage in manifest["parity"]["stages"].values():
        assert stage["passed"] is not False and not stage["selections_differing"]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: None, "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "no weights"),
        (
            lambda d: [
                (d / "config.json").write_text('{"model_type": "llama"}'),
                (d / "pytorch_model.bin").write_bytes(b"x"),
            ],
            "--allow-unsafe-pickle",
        ),
        (
            lambda d: [
                (d / "config.json").write_text(
                    '{"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 10000000,'
                    ' "vocab_size": 32000}'
                ),
                (d / "model.safetensors").write_bytes(b"x"),
            ],
            "more than this machine's",
        ),
    ],
    ids=["no-config", "bad-json", "no-weights", "pickled-weights", "absurd-size"],
)
def test_broken_checkpoints_are_one_line_errors(tmp_path: Path, make: object, says: str) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    make(directory)  # type: ignore[operator]
    code, output = _run("inspect", f"hf:{directory}")
    assert code == 2 and says in output, output
    assert "Traceback" not in output


def test_an_opset_torch_onnx_cannot_write_is_one_line_naming_one_it_can(
    llama: Path, tmp_path: Path
) -> None:
    """torch.onnx's version converter cannot take Llama's graph down to opset 17 (it
    writes 18); that is the user's option to change, not an internal error."""
    out = tmp_path / "out"
    code, output = _run("export", f"hf:{llama}", "--opset", "17", "--out", str(out))
    assert code == 2 and "use --opset 18 or later" in output, output
    assert "Traceback" not in output and not (out / "manifest.json").exists()
