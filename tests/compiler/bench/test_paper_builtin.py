"""``builtin:paper-layer``: docs/ultramem.md's paper-scale memory layer, generated, not shipped.

Its sizes are checked against docs/ultramem.md's numbers, its weights for being the same bits
in every load and every process (``check``/``bench`` compare them with the export's
fingerprint), and one token's forward against a float64 NumPy re-computation.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ultramem.compiler.loading import load_model, model_fingerprint
from ultramem.models.builtin import LoadedModel, generated_layer, list_builtins, load_builtin
from ultramem.models.config import UltraMemConfig
from ultramem.models.ultramem import UltraMemLayer

NAME = "paper-layer"


@pytest.fixture(scope="module")
def paper() -> LoadedModel:
    return load_model(f"builtin:{NAME}")


def test_listed_and_the_name_still_checked_against_the_listing() -> None:
    assert NAME in list_builtins()
    with pytest.raises(KeyError, match="unknown builtin"):
        load_builtin(f"../builtin/{NAME}")


def test_sizes_are_the_paper_scale_layer(paper: LoadedModel) -> None:
    layer = paper.model
    assert isinstance(layer, UltraMemLayer)
    cfg = layer.cfg
    # docs/ultramem.md, "Sizes to test and benchmark with", paper-scale layer (in fp32 here)
    assert cfg.n_keys**2 == 1 << 20  # 1M virtual slots
    assert (cfg.key_dim, cfg.heads, cfg.tucker_rank, cfg.cores) == (128, 2, 2, 2)
    assert (cfg.topm, cfg.topk, cfg.value_dim, cfg.expansion, cfg.d_model) == (
        32,
        32,
        256,
        4,
        1024,
    )
    assert tuple(layer.values.shape) == ((1 << 20) // 4, 256)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert weight_bytes < 300 * (1 << 20)  # 273 MiB, 256 of them the value table
    (x,) = paper.example_inputs
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 256, 1024)


def test_same_weights_in_every_load_and_every_process(paper: LoadedModel) -> None:
    state = torch.get_rng_state()
    again = load_builtin(NAME)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state untouched
    assert model_fingerprint(again.model) == model_fingerprint(paper.model)
    assert torch.equal(again.example_inputs[0], paper.example_inputs[0])
    code = (
        "from ultramem.compiler.loading import model_fingerprint;"
        "from ultramem.models.builtin import load_builtin;"
        f"print(model_fingerprint(load_builtin({NAME!r}).model))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert other.stdout.strip() == model_fingerprint(paper.model)


def test_a_smaller_layer_through_the_same_generator_depends_on_the_seed_only() -> None:
    cfg = UltraMemConfig(d_model=32, n_keys=16, key_dim=8, heads=2, cores=2, expansion=4)
    torch.manual_seed(123)
    a = generated_layer(cfg, seed=5)
    torch.manual_seed(456)  # another global state: the weights must not follow it
    b = generated_layer(cfg, seed=5)
    c = generated_layer(cfg, seed=6)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    with pytest.raises(ValueError, match="floating-point"):
        generated_layer(cfg, dtype="int64")


def _reference_forward(layer: UltraMemLayer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/ultramem.md's V1 forward, written from its steps in float64 NumPy for one token:
    the output [D] and the selected virtual slots [H, k] (as sets, sorted)."""
    cfg = layer.cfg
    # the 256 MiB value table stays fp32: only the rows read are widened
    w = {
        k: v.detach().numpy().astype(np.float64)
        for k, v in layer.state_dict().items()
        if k not in ("values", "shuffle")
    }
    values, shuffle = layer.values.detach().numpy(), layer.shuffle.numpy()
    q = (w["query.weight"] @ x).reshape(2, cfg.key_dim)
    q = (q - q.mean(-1, keepdims=True)) / np.sqrt(q.var(-1, keepdims=True) + 1e-5)
    q = q * w["query_norm.weight"] + w["query_norm.bias"]
    keys = w["keys"] / np.maximum(np.linalg.norm(w["keys"], axis=3, keepdims=True), 1e-12)
    out_pooled = np.zeros((cfg.expansion, cfg.value_dim))
    slots = []
    chunk = cfg.value_dim // cfg.cores
    rows = cfg.value_rows
    for h in range(cfg.heads):
        s_row = np.einsum("d,ndr->nr", q[0], keys[h, 0])  # [n, r]
        s_col = np.einsum("d,ndr->nr", q[1], keys[h, 1])
        i_row = np.argsort(-(s_row @ w["row_weight"][h]))[: cfg.topm]
        i_col = np.argsort(-(s_col @ w["col_weight"][h]))[: cfg.topm]
        # per core c: grid[c, a, b] = s_row[I_row[a]] · C_c · s_col[I_col[b]]
        grid = np.einsum("ar,crs,bs->cab", s_row[i_row], w["cores"][:, h], s_col[i_col])
        best = np.argsort(-grid.sum(0).reshape(-1))[: cfg.topk]
        a, b = best // cfg.topm, best % cfg.topm
        slot = i_row[a] * cfg.n_keys + i_col[b]
        virtual = shuffle[slot]
        scores = grid[:, a, b]  # [M, k]
        for j, v in enumerate(virtual):
            row = values[v % rows].astype(np.float64)
            value = row.reshape(cfg.cores, chunk) * scores[:, j : j + 1]
            out_pooled[v // rows] += value.reshape(-1)
        slots.append(np.sort(slot))
    return w["out_proj.weight"] @ out_pooled.reshape(-1), np.stack(slots)


class _SlotRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The slot ids the layer indexes its shuffle with (its selection)."""

    def __init__(self, shuffle: torch.Tensor) -> None:
        super().__init__()
        self.shuffle, self.slots = shuffle, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.index.Tensor and args[0].data_ptr() == self.shuffle.data_ptr():
            self.slots = args[1][0]
        return func(*args, **(kwargs or {}))


def test_one_token_forward_matches_a_float64_reference(paper: LoadedModel) -> None:
    layer = paper.model
    x = paper.example_inputs[0][:, :1]  # [1, 1, D]: the decode size
    recorder = _SlotRecorder(layer.shuffle)
    with torch.no_grad(), recorder:
        got = layer(x)
    assert tuple(got.shape) == (1, 1, 1024) and bool(torch.isfinite(got).all())
    want, want_slots = _reference_forward(layer, x[0, 0].double().numpy())
    assert recorder.slots is not None
    got_slots = np.sort(recorder.slots.reshape(layer.cfg.heads, -1).numpy(), axis=-1)
    # the same 2 × 32 slots out of 1M: fp32 vs fp64 scores order no near-tie here
    assert np.array_equal(got_slots, want_slots)
    # fp32 sums of 64 rows of 256 and a 1024-wide projection against fp64: 1e-4 relative
    # to the output's scale (its largest element is ~0.05)
    scale = float(np.abs(want).max())
    assert np.abs(got[0, 0].double().numpy() - want).max() <= 1e-4 * scale


@pytest.mark.slow
def test_bench_takes_it_like_any_builtin(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole path (capture, fusion at 1M slots, parity, timing): a minute or more on 2
    cores, so not in the default run."""
    from ultramem.cli.main import cli

    out = tmp_path / "bench"
    args = ["bench", f"builtin:{NAME}", "--tokens", "1", "--backends", "eager,fused-ops"]
    result = CliRunner().invoke(cli, [*args, "--budget", "0.01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| fused-ops |" in (out / "bench.md").read_text()
