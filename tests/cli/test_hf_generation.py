"""``export hf:DIR --task text-generation``: one decoder program over a static KV cache.

Checkpoints are made here with ``save_pretrained`` (``hf/checkpoints.py``). For each: the
decoder exported (every memory layer fused), ONNX tensors named as Optimum and ONNX Runtime
GenAI name them, greedy generation token-exact against ``transformers``' ``generate``: in
the export's own parity, and here, independently, by a loop written against
``onnxruntime`` alone (GenAI itself: ``test_genai.py``). TensorRT engines are built where
``tensorrt_rtx`` is installed (it builds on a CPU; running them needs a GPU, so their stages
are not executed).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ultramem.cli.main import cli
from ultramem.compiler.artifacts import sha256_file
from ultramem.tests.cli.hf import checkpoints

CACHE = 24
HAS_TRT_BUILDER = bool(
    importlib.util.find_spec("tensorrt_rtx") or importlib.util.find_spec("tensorrt")
)
FORMATS = "onnx,tensorrt" if HAS_TRT_BUILDER else "onnx"
LAYERS = {"fork": 4, "llama": 2, "olmoe": 2}


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _export(directory: Path, out: Path, *extra: str) -> dict:
    code, output = _run(
        "export", f"hf:{directory}", *extra, "--task", "text-generation",
        "--max-cache-len", str(CACHE), "--format", FORMATS, "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert "parity PASSED" in output, output
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fork_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    directory = checkpoints.memory_fork(tmp_path_factory.mktemp("memllama"))
    out = tmp_path_factory.mktemp("fork-generation") / "out"
    return directory, out, _export(directory, out, "--trust-remote-code")


def _onnx_greedy(folder: Path, prompt: torch.Tensor, new_tokens: int, layers: int) -> list[int]:
    """Greedy decoding with onnxruntime alone, by the tensor names (no ultramem code): the
    prompt from a cache of zeros, then one token at a time."""
    session = ort.InferenceSession(str(folder / "model.onnx"))
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    shapes = {i.name: i.shape for i in session.get_inputs()}
    cache = [np.zeros([1, *shapes[name][1:]], dtype=np.float32) for name in past]
    ids, start, tokens = prompt.numpy(), 0, []
    while True:
        end = start + ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            **dict(zip(past, cache, strict=True)),
        }
        logits, *cache = session.run(["logits", *present], feeds)
        tokens.append(int(logits[0, -1].argmax()))
        if len(tokens) == new_tokens:
            return tokens
        start, ids = end, np.array([[tokens[-1]]], dtype=np.int64)


def _rehash(folder: Path) -> None:
    """The manifest's hashes made to match the folder's files as they are now."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        artifact["sha256"] = sha256_file(folder / artifact["path"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _generate(directory: Path, prompt: torch.Tensor, new_tokens: int, remote: bool) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote).eval()
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, prompt.shape[1] :].tolist()


def _assert_generation_export(directory: Path, out: Path, manifest: dict, name: str) -> None:
    layers = LAYERS[name]
    assert manifest["task"] == "text-generation"
    assert manifest["generation"]["max_cache_len"] == CACHE
    assert manifest["generation"]["cache_layers"] == layers
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]
    assert inputs[:5] == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
        "past_key_values.0.value",
    ]  # fmt: skip

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(model.graph.input[0]) == dims(model.graph.input[2]) == ["batch", "tokens"]
    assert dims(model.graph.input[1]) == ["batch", "total"]
    cache = dims(model.graph.input[3])
    assert cache[0] == "batch" and cache[2] == CACHE  # the length a runtime reads
    if HAS_TRT_BUILDER:
        assert (out / "model.engine").stat().st_size > 0
    parity = json.loads((out / "parity.json").read_text())
    by_stage = {b["stage"]: b for b in parity["generation"]}
    ran = by_stage["onnxruntime-cpu"]
    assert ran["executed"] and ran["passed"], ran
    assert ran["prompts"] and all(p["exact"] for p in ran["prompts"])
    assert max(c["max_abs"] for c in ran["logits"]) <= 1e-4
    assert parity["program"]["passed"]


def test_a_memory_fork_exports_one_decoder_fused_and_token_exact(
    fork_export: tuple[Path, Path, dict],
) -> None:
    directory, out, manifest = fork_export
    _assert_generation_export(directory, out, manifest, "fork")
    layers = manifest["memory_layers"]
    assert len(layers) == 2 and all(
        layer["fused"] == ["selection", "aggregation"] for layer in layers
    ), layers
    after = manifest["ops"]["after"]
    assert after.get("ultramem.retrieve") == 2 and after.get("ultramem.aggregate") == 2
    # the weights once: the one program holds every parameter, and nothing else does
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    onnx_bytes = (out / "model.onnx").stat().st_size
    assert weights <= onnx_bytes < 1.5 * weights + (1 << 20)
    parity = json.loads((out / "parity.json").read_text())
    onnx = next(b for b in parity["generation"] if b["stage"] == "onnxruntime-cpu")
    compared = sum(c["rows"] for c in onnx["selections"])
    assert compared > 0 and not sum(c["differing"] for c in onnx["selections"])
    # independently: onnxruntime alone against generate on the checkpoint, 10 tokens
    prompt = torch.tensor([[5, 17, 3, 99, 42, 8]])
    assert _onnx_greedy(out, prompt, 10, LAYERS["fork"]) == _generate(directory, prompt, 10, True)


def test_the_files_a_runtime_reads_are_beside_the_program(
    fork_export: tuple[Path, Path, dict],
) -> None:
    """The checkpoint's config and generation config, byte for byte and hashed; each
    program's ONNX file says what it is and for which cache, as the manifest does."""
    directory, out, manifest = fork_export
    copied = manifest["checkpoint_files"]
    assert {"config.json", "generation_config.json"} <= set(copied)
    listed = {a["path"]: a for a in manifest["artifacts"]}
    for name in copied:
        assert (out / name).read_bytes() == (directory / name).read_bytes()
        assert listed[name]["sha256"] == sha256_file(out / name)
    generation = manifest["generation"]
    eos = json.loads((directory / "generation_config.json").read_text())["eos_token_id"]
    assert generation["eos_token_ids"] == sorted([eos] if isinstance(eos, int) else eos)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["ultramem.program"] == "decoder"
    assert props["ultramem.task"] == "text-generation"
    assert int(props["ultramem.max_cache_len"]) == generation["max_cache_len"] == CACHE
    assert int(props["ultramem.cache_layers"]) == generation["cache_layers"]
    assert props["ultramem.eos_token_ids"] == ",".join(map(str, generation["eos_token_ids"]))
    assert props["producer"].startswith("ultramem ")
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == CACHE
    assert genai["model"]["decoder"]["num_hidden_layers"] == generation["cache_layers"]
    assert listed["genai_config.json"]["sha256"] == sha256_file(out / "genai_config.json")


@pytest.mark.parametrize("tool", ["onnxslim", "onnx-graphsurgeon"])
def test_the_decoder_through_graph_tools_generates_the_same_tokens(
    fork_export: tuple[Path, Path, dict], tool: str, tmp_path: Path
) -> None:
    """The decoder through onnxslim, or onnx-graphsurgeon's import, cleanup and export
    (what ``polygraphy surgeon sanitize`` does): valid, and greedy decoding by ONNX
    Runtime alone gives the tokens the exported file gives."""
    _, out, _ = fork_export
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    path = copy / "model.onnx"
    model = onnx.load(str(path))
    if tool == "onnxslim":
        import onnxslim

        model = onnxslim.slim(model)
    else:
        import onnx_graphsurgeon as gs

        model = gs.export_onnx(gs.import_onnx(model).cleanup().toposort())
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    prompt = torch.tensor([[5, 17, 3, 99, 42, 8]])
    want = _onnx_greedy(out, prompt, 8, LAYERS["fork"])
    assert _onnx_greedy(copy, prompt, 8, LAYERS["fork"]) == want


def test_check_never_trusts_the_code_of_a_checkpoint_a_folder_names(
    fork_export: tuple[Path, Path, dict],
) -> None:
    _, out, _ = fork_export
    code, output = _run("check", "--artifacts", str(out))
    assert code == 2 and "ships its own modeling code" in output, output
    code, output = _run("check", "--trust-remote-code", "--artifacts", str(out))
    assert code == 2 and "name the checkpoint yourself" in output, output


def test_check_reruns_generation_parity_and_refuses_another_model(
    fork_export: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    directory, out, _ = fork_export
    code, output = _run("check", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(out))
    assert code == 0 and "parity PASSED (the decoder and greedy generation" in output, output
    other = checkpoints.llama(tmp_path / "llama")
    code, output = _run("check", f"hf:{other}", "--artifacts", str(out))
    assert code == 2 and "not the model" in output, output


@pytest.mark.parametrize("name", ["llama", "olmoe"])
def test_plain_and_moe_checkpoints_generate_token_exact(name: str, tmp_path: Path) -> None:
    if name == "olmoe" and not importlib.util.find_spec("transformers.models.olmoe"):
        pytest.skip("this transformers has no OlmoeForCausalLM")
    directory = getattr(checkpoints, name)(tmp_path / name)
    out = tmp_path / "out"
    manifest = _export(directory, out)
    _assert_generation_export(directory, out, manifest, name)
    # OLMoE's routers (4 experts, top 2: experts = k², as the real 64/8) are no memory layer
    assert manifest["memory_layers"] == []
    prompt = torch.tensor([[7, 1, 30]])
    assert _onnx_greedy(out, prompt, 8, LAYERS[name]) == _generate(directory, prompt, 8, False)
    if name == "llama":  # an hf:DIR without code of its own loads as data: MODEL may go
        code, output = _run("check", "--artifacts", str(out))
        assert code == 0 and "parity PASSED (the decoder" in output, output


def test_a_bf16_memory_checkpoint_generates_by_the_half_precision_rule(tmp_path: Path) -> None:
    """A bf16 save_pretrained checkpoint: every memory layer fused in the decoder,
    greedy generation agrees with generate's, tokens parting only at near-ties of its own
    logits (counted); ONNX Runtime's CPU provider runs no bfloat16, so its backend is not
    executed, saying why."""
    directory = checkpoints.memory_fork(tmp_path / "ckpt", dtype=torch.bfloat16)
    out = tmp_path / "out"
    code, output = _run(
        "export", f"hf:{directory}", "--trust-remote-code", "--task", "text-generation",
        "--max-cache-len", "16", "--out", str(out),
    )  # fmt: skip
    assert code == 0 and "parity PASSED" in output, output
    manifest = json.loads((out / "manifest.json").read_text())
    layers = manifest["memory_layers"]
    assert layers and all(set(e["fused"]) == {"selection", "aggregation"} for e in layers)
    report = json.loads((out / "parity.json").read_text())["generation"]
    backends = {b["stage"]: b for b in report}
    fused = backends["fused-ops"]
    assert fused["passed"] and fused["prompts"]
    for prompt in fused["prompts"]:
        if not prompt["exact"]:  # parted, and only where the reference's logits tied
            assert prompt["near_tie_at"] is not None
            step = prompt["near_tie_at"]
            assert prompt["generated"][:step] == prompt["reference"][:step]
    ort = backends["onnxruntime-cpu"]
    assert ort["passed"] is None and "no kernel for" in ort["reason"]


def test_bench_times_prompts_and_steps_against_eager(
    fork_export: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    directory, out, _ = fork_export
    code, output = _run(
        "bench", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(out),
        "--tokens", "1,8,100", "--budget", "0.05", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert code == 0, output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert report["schema"] == "ultramem-bench-generation/1"
    rows = {b["name"]: b["results"] for b in report["backends"]}
    for name in ("eager", "fused-ops", "onnxruntime-cpu"):
        phases = {(r["phase"], r["tokens"]) for r in rows[name] if r["status"] == "ok"}
        assert {("prefill", 1), ("prefill", 8), ("decode", CACHE - 1)} <= phases, rows[name]
        assert ("prefill", 100) not in phases  # longer than the cache: left out
    onnx = next(r for r in rows["onnxruntime-cpu"] if r["phase"] == "decode")
    assert onnx["p10_ms"] <= onnx["p50_ms"] <= onnx["p90_ms"] and onnx["speedup_vs_eager"] > 0
    assert "decode at fill" in (tmp_path / "bench" / "bench.md").read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["builtin:facts", "--task", "text-generation"], "takes an hf:DIR"),
        (["builtin:facts", "--max-cache-len", "8"], "applies to --task text-generation"),
        (["HF", "--task", "text-generation", "--max-cache-len", "1"], "at least 2"),
        (["HF", "--task", "text-generation", "--max-cache-len", "65"], "max_position_embeddings"),
    ],
    ids=["not-hf", "cache-without-task", "cache-too-short", "cache-past-positions"],
)
def test_generation_options_are_one_line_errors(args: list[str], says: str, tmp_path: Path) -> None:
    directory = checkpoints.llama(tmp_path / "llama")
    args = [f"hf:{directory}" if a == "HF" else a for a in args]
    code, output = _run("export", *args, "--out", str(tmp_path / "out"))
    assert code == 2 and says in output and "Traceback" not in output, output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bench_reports_an_artifact_that_refuses_its_inputs_as_wrong(
    fork_export: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """The ONNX file's cache length edited (a cache it no longer takes), the manifest's
    hashes made to match: the bench says the backend is wrong, it does not crash (and
    times the others)."""
    directory, out, _ = fork_export
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    model = onnx.load(str(swapped / "model.onnx"))
    for value in model.graph.input[3:]:
        value.type.tensor_type.shape.dim[2].dim_value = CACHE + 1
    onnx.save(model, str(swapped / "model.onnx"))
    _rehash(swapped)
    code, output = _run(
        "bench", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(swapped),
        "--tokens", "4", "--budget", "0.02", "--backends", "eager,onnxruntime-cpu",
        "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert code == 0 and "Traceback" not in output, output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {b["name"]: b["results"] for b in report["backends"]}
    assert rows["onnxruntime-cpu"] and all(r["status"] == "wrong" for r in rows["onnxruntime-cpu"])
    assert all(r["status"] == "ok" for r in rows["eager"])


def test_check_refuses_onnx_metadata_that_is_not_what_the_model_gives(
    fork_export: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """model.onnx's metadata_props say the cache's length: edited (its hash made to
    match), check refuses the folder."""
    directory, out, _ = fork_export
    edited = Path(shutil.copytree(out, tmp_path / "edited"))
    model = onnx.load(str(edited / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "ultramem.max_cache_len":
            prop.value = str(CACHE * 2)
    onnx.save(model, str(edited / "model.onnx"))
    _rehash(edited)
    code, output = _run(
        "check", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(edited)
    )
    assert code == 2 and "metadata_props ultramem.max_cache_len" in output, output


def test_check_refuses_a_genai_config_that_is_not_what_the_model_gives(
    fork_export: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """A runtime drives its loop from genai_config.json: an edited one (its hash made to
    match) is refused, as an edited generation section is."""
    directory, out, _ = fork_export
    edited = Path(shutil.copytree(out, tmp_path / "edited"))
    config = json.loads((edited / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = 99
    (edited / "genai_config.json").write_text(json.dumps(config))
    _rehash(edited)
    code, output = _run(
        "check", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(edited)
    )
    assert code == 2 and "genai_config.json is not what this model gives" in output, output


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda m: m["generation"].update(eos_token_ids=[99]), "generation section"),
        (lambda m: m["generation"].update(cache_layers=1), "generation section"),
        (lambda m: m["generation"].update(inputs=["input_ids"]), "generation section"),
        (lambda m: m.update(task="translation"), "names task 'translation'"),
    ],
    ids=["eos", "cache-layers", "inputs", "unknown-task"],
)
def test_check_refuses_a_manifest_whose_generation_metadata_was_edited(
    fork_export: tuple[Path, Path, dict], tmp_path: Path, edit: object, says: str
) -> None:
    """A runtime drives its loop from these values: check holds them to the model's."""
    directory, out, _ = fork_export
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    code, output = _run(
        "check", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(edited)
    )
    assert code == 2 and says in output and "Traceback" not in output, output


def test_bench_with_no_backend_that_can_run_is_exit_2(
    fork_export: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    directory, out, _ = fork_export
    code, output = _run(
        "bench", f"hf:{directory}", "--trust-remote-code", "--artifacts", str(out),
        "--backends", "aotinductor", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert code == 2 and "no backend of --backends can run here" in output, output


def _save(model_class: str, config_class: str, directory: Path, **config: object) -> Path:
    import transformers

    base = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # within the vocabulary
    made = getattr(transformers, config_class)(**{**base, **ids, **config})
    getattr(transformers, model_class)(made).eval().save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("model", "config", "settings", "cache", "says"),
    [
        ("MistralForCausalLM", "MistralConfig", {"sliding_window": 4}, 16,
         "sliding window of 4 tokens; export with --max-cache-len 4 or less"),
        ("Phi3ForCausalLM", "Phi3Config", {"original_max_position_embeddings": 8,
         "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 4,
                             "long_factor": [2.0] * 4}}, 16,
         "longrope rotary embeddings change past 8 positions"),
    ],
    ids=["sliding-window-shorter-than-the-cache", "longrope-past-its-original-length"],
)  # fmt: skip
def test_attention_the_static_program_cannot_follow_is_refused_up_front(
    tmp_path: Path, model: str, config: str, settings: dict, cache: int, says: str
) -> None:
    directory = _save(model, config, tmp_path / "ckpt", **settings)
    code, output = _run(
        "export", f"hf:{directory}", "--task", "text-generation", "--max-cache-len", str(cache),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and says in output and "Traceback" not in output, output
    assert "capturing" not in output  # before any long work


def test_a_window_that_holds_the_whole_cache_is_full_attention(tmp_path: Path) -> None:
    from transformers.cache_utils import StaticLayer

    from ultramem.compiler.generation.programs import _static_cache
    from ultramem.compiler.loading import load_model

    directory = _save("MistralForCausalLM", "MistralConfig", tmp_path / "ckpt", sliding_window=64)
    model = load_model(f"hf:{directory}").model.model
    cache = _static_cache(model, 16)
    assert all(type(layer) is StaticLayer and layer.max_cache_len == 16 for layer in cache.layers)
