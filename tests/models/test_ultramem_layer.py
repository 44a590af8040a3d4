"""The reference UltraMem layer against a deliberately naive re-implementation.

The naive version below follows docs/ultramem.md step by step with Python loops over tokens,
heads, candidates and cores, plain indexing and ``(a * b).sum()`` dot products: no einsum,
no gather, no scatter, top-k by sorting Python lists (ties to the lower index). It works
in float64 from the layer's fp32 weights, so it is the more exact of the two; the layer
must pick the *same slots in the same order* and match outputs within fp32 tolerance
(atol 1e-5, rtol 1e-4: the layer sums at most a few hundred fp32 products of O(1) terms).
The layer's own selection is read with a dispatch mode that records its ``aten.topk``
outputs, so the layer's code needs no hooks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM
from ultramem.models.ultramem import UltraMemLayer, leading_singular_vectors

ATOL, RTOL = 1e-5, 1e-4
BATCH, SEQ = 2, 5

# Tiny sizes: n = 6 keys per side (36 virtual slots, so E = 4 gives 9 rows), m = 4, k = 5 (m ≠ k).
BASE = UltraMemConfig(d_model=16, n_keys=6, key_dim=8, topm=4, topk=5, value_dim=8)

CONFIGS: dict[str, UltraMemConfig] = {
    "plain": BASE,
    "E4": dataclasses.replace(BASE, expansion=4),
    "H2": dataclasses.replace(BASE, heads=2),
    "M2": dataclasses.replace(BASE, cores=2),
    "authors_H2_M2_E4_conv3": dataclasses.replace(
        BASE, heads=2, cores=2, expansion=4, query_conv=3
    ),
    "relu_rmsnorm": dataclasses.replace(BASE, score_activation="relu", query_norm="rmsnorm"),
    "softmax_M2_H2": dataclasses.replace(BASE, score_activation="softmax", cores=2, heads=2),
    "softmax_no_norms": dataclasses.replace(
        BASE, score_activation="softmax", query_norm="none", key_norm=False
    ),
    "identity_E4_conv2": dataclasses.replace(
        BASE, slot_mapping="identity", expansion=4, query_conv=2
    ),
    # without an output projection E · Dv must equal D
    "no_proj_E1": dataclasses.replace(BASE, output_proj=False, value_dim=16),
    "no_proj_E4_M2_relu": dataclasses.replace(
        BASE, output_proj=False, expansion=4, value_dim=4, cores=2, score_activation="relu"
    ),
    "svd_in_forward_H2_M2": dataclasses.replace(
        BASE, heads=2, cores=2, expansion=4, rank1_from_svd_in_forward=True
    ),
    "rank1_m_equals_n_k_1": dataclasses.replace(BASE, tucker_rank=1, topm=6, topk=1),
    "rank3_k_is_m2": dataclasses.replace(BASE, tucker_rank=3, topm=3, topk=9, heads=2),
}


def _topk_ids(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def _norm(vec: Tensor, kind: str, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if kind == "layernorm":
        mean = vec.mean()
        var = ((vec - mean) ** 2).mean()
        return (vec - mean) / math.sqrt(float(var) + 1e-5) * weight + bias
    if kind == "rmsnorm":
        return vec / math.sqrt(float((vec**2).mean()) + 1e-6) * weight
    return vec


def naive_layer(layer: UltraMemLayer, x: Tensor) -> tuple[Tensor, list[list[list[int]]]]:
    """``out [B, L, D]`` and the selected slots ``[token][head] -> k ids``, the slow way."""
    cfg = layer.cfg
    p: dict[str, Any] = {
        k: v.detach().double() if v.is_floating_point() else v
        for k, v in layer.state_dict().items()
    }
    x = x.detach().double()
    batch, seq, d = x.shape
    n, m, dk, rank = cfg.n_keys, cfg.topm, cfg.key_dim, cfg.tucker_rank
    chunk = cfg.value_dim // cfg.cores
    keys = p["keys"].clone()
    if cfg.key_norm:
        for h in range(cfg.heads):
            for side in range(2):
                for i in range(n):
                    for r in range(rank):
                        col = keys[h, side, i, :, r]
                        keys[h, side, i, :, r] = col / max(float((col**2).sum().sqrt()), 1e-12)
    if cfg.rank1_from_svd_in_forward:
        summed = sum(p["cores"][c] for c in range(cfg.cores))
        u_all = [torch.linalg.svd(summed[h])[0][:, 0] for h in range(cfg.heads)]
        v_all = [torch.linalg.svd(summed[h])[2][0, :] for h in range(cfg.heads)]
    else:
        u_all = [p["row_weight"][h] for h in range(cfg.heads)]
        v_all = [p["col_weight"][h] for h in range(cfg.heads)]

    out = torch.zeros(batch, seq, d, dtype=torch.float64)
    selected: list[list[list[int]]] = []
    for b in range(batch):
        for t in range(seq):
            xq = x[b, t].clone()
            if cfg.query_conv:
                ksz = cfg.query_conv
                xq = p["query_conv.bias"].clone()
                for j in range(ksz):  # causal: tap j reads token t - (ksz - 1) + j
                    src = t - (ksz - 1) + j
                    if src >= 0:
                        xq = xq + p["query_conv.weight"][:, 0, j] * x[b, src]
            q = torch.stack([(p["query.weight"][o] * xq).sum() for o in range(2 * dk)])
            halves = [q[:dk], q[dk:]]
            halves = [
                _norm(hq, cfg.query_norm, p.get("query_norm.weight"), p.get("query_norm.bias"))
                for hq in halves
            ]
            pooled = torch.zeros(cfg.expansion, cfg.value_dim, dtype=torch.float64)
            token_slots: list[list[int]] = []
            for h in range(cfg.heads):
                # S[side][i][r] = q_side · K[h, side, i, :, r]
                s = [
                    [
                        [float((halves[side] * keys[h, side, i, :, r]).sum()) for r in range(rank)]
                        for i in range(n)
                    ]
                    for side in range(2)
                ]
                u, v = u_all[h], v_all[h]
                a_row = [sum(s[0][i][r] * float(u[r]) for r in range(rank)) for i in range(n)]
                a_col = [sum(s[1][i][r] * float(v[r]) for r in range(rank)) for i in range(n)]
                i_row, i_col = _topk_ids(a_row, m), _topk_ids(a_col, m)
                per_core: list[list[float]] = []  # [grid position][core]
                for a in range(m):
                    for bb in range(m):
                        per_core.append(
                            [
                                sum(
                                    s[0][i_row[a]][r1]
                                    * float(p["cores"][c, h, r1, r2])
                                    * s[1][i_col[bb]][r2]
                                    for r1 in range(rank)
                                    for r2 in range(rank)
                                )
                                for c in range(cfg.cores)
                            ]
                        )
                pos = _topk_ids([sum(g) for g in per_core], cfg.topk)
                slots = [i_row[ps // m] * n + i_col[ps % m] for ps in pos]
                token_slots.append(slots)
                scores = [per_core[ps] for ps in pos]  # [k][core]
                if cfg.score_activation == "relu":
                    scores = [[max(0.0, sc) for sc in row] for row in scores]
                elif cfg.score_activation == "softmax":  # over the k slots, per core
                    for c in range(cfg.cores):
                        exps = [math.exp(row[c]) for row in scores]
                        for row, e in zip(scores, exps, strict=True):
                            row[c] = e / sum(exps)
                for slot, row_scores in zip(slots, scores, strict=True):
                    virtual = int(p["shuffle"][slot])
                    phys, group = virtual % cfg.value_rows, virtual // cfg.value_rows
                    for c in range(cfg.cores):
                        part = p["values"][phys, c * chunk : (c + 1) * chunk]
                        pooled[group, c * chunk : (c + 1) * chunk] += row_scores[c] * part
            selected.append(token_slots)
            flat = pooled.reshape(-1)
            if cfg.output_proj:
                flat = torch.stack([(p["out_proj.weight"][o] * flat).sum() for o in range(d)])
            out[b, t] = flat
    return out, selected


class _TopkRecorder(TorchDispatchMode):
    """Records the indices of every ``aten.topk`` the layer runs, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.topk.default:
            self.indices.append(out[1].clone())
        return out


def layer_with_selection(layer: UltraMemLayer, x: Tensor) -> tuple[Tensor, list[list[list[int]]]]:
    """The layer's output and its selected slots, rebuilt from its three top-k results."""
    recorder = _TopkRecorder()
    with torch.no_grad(), recorder:
        out = layer(x)
    i_row, i_col, pos = recorder.indices  # [T, H, m], [T, H, m], [T, H, k]
    m, n = layer.cfg.topm, layer.cfg.n_keys
    selected = [
        [
            [int(i_row[t, h, ps // m]) * n + int(i_col[t, h, ps % m]) for ps in pos[t, h].tolist()]
            for h in range(pos.shape[1])
        ]
        for t in range(pos.shape[0])
    ]
    return out, selected


def _randomised_layer(cfg: UltraMemConfig) -> UltraMemLayer:
    """A layer whose norms, conv bias and cores are away from their initial values."""
    layer = UltraMemLayer(cfg, seed=3)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith(("query_norm", "query_conv")) or name == "cores":
                param.add_(0.3 * torch.randn_like(param))
    layer.refresh_rank1()
    return layer


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_layer_matches_naive_implementation(cfg: UltraMemConfig) -> None:
    layer = _randomised_layer(cfg)
    x = torch.randn(BATCH, SEQ, cfg.d_model)
    out, slots = layer_with_selection(layer, x)
    ref, ref_slots = naive_layer(layer, x)
    assert slots == ref_slots
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


def test_svd_in_forward_ignores_stale_buffers() -> None:
    cfg = CONFIGS["svd_in_forward_H2_M2"]
    layer = _randomised_layer(cfg)
    x = torch.randn(BATCH, SEQ, cfg.d_model)
    before = layer_with_selection(layer, x)[0]
    with torch.no_grad():
        layer.row_weight.copy_(torch.randn_like(layer.row_weight))
        layer.col_weight.copy_(torch.randn_like(layer.col_weight))
    assert torch.equal(layer_with_selection(layer, x)[0], before)
    # and the buffer variant does read them: the option is what makes the difference
    buffered = UltraMemLayer(dataclasses.replace(cfg, rank1_from_svd_in_forward=False))
    buffered.load_state_dict(layer.state_dict())
    assert not torch.allclose(layer_with_selection(buffered, x)[0], before)


def test_refresh_rank1_writes_leading_singular_vectors() -> None:
    layer = _randomised_layer(CONFIGS["M2"])
    with torch.no_grad():
        layer.cores.add_(torch.randn_like(layer.cores))
    layer.refresh_rank1()
    u, v = leading_singular_vectors(layer.cores.detach())
    assert torch.equal(layer.row_weight, u)
    assert torch.equal(layer.col_weight, v)


def test_negating_keys_and_rank1_vectors_leaves_the_layer_unchanged() -> None:
    """The SVD's joint sign of (u, v) is arbitrary; negating a head's keys compensates exactly.

    The training script relies on this to keep buffers equal to ``refresh_rank1``'s output.
    """
    cfg = CONFIGS["authors_H2_M2_E4_conv3"]
    layer = _randomised_layer(cfg)
    x = torch.randn(BATCH, SEQ, cfg.d_model)
    out, slots = layer_with_selection(layer, x)
    with torch.no_grad():
        layer.keys[1].neg_()
        layer.row_weight[1].neg_()
        layer.col_weight[1].neg_()
    flipped_out, flipped_slots = layer_with_selection(layer, x)
    assert flipped_slots == slots
    torch.testing.assert_close(flipped_out, out, atol=1e-6, rtol=0)


def _skip_lm() -> UltraMemLM:
    memory = UltraMemConfig(d_model=32, n_keys=8, key_dim=8, topm=4, topk=4, value_dim=16)
    cfg = LMConfig(
        vocab_size=20,
        d_model=32,
        n_layers=3,
        n_heads=2,
        max_seq_len=16,
        memory_layers={0: 2, 1: 1},  # a skip-layer memory and an ordinary one
        memory=memory,
    )
    return UltraMemLM(cfg).eval()


def _manual_forward(model: UltraMemLM, tokens: Tensor, add_mem0_at: int) -> Tensor:
    x = model.embed(tokens) + model.pos(torch.arange(tokens.shape[1]))
    mem0 = model.memories["0"](model.memory_norms["0"](x))  # reads block 0's input
    x = model.blocks[0](x)
    mem1 = model.memories["1"](model.memory_norms["1"](x))  # reads block 1's input
    for i in (1, 2):
        x = model.blocks[i](x)
        if i == 1:
            x = x + mem1
        if i == add_mem0_at:
            x = x + mem0
    return model.head(model.norm(x))


def test_lm_adds_skip_layer_memory_at_its_destination_block() -> None:
    model = _skip_lm()
    tokens = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        logits = model(tokens)
        torch.testing.assert_close(logits, _manual_forward(model, tokens, 2), atol=1e-6, rtol=0)
        # negative case: the same memory output added one block early is a different model
        early = _manual_forward(model, tokens, 1)
    assert not torch.allclose(logits, early, atol=1e-3)
