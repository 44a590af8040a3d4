"""Registry of foreign memory-layer models: code written the way OTHER people write it.

Each `ForeignCase` builds a model in eval mode with trained-looking weights from a local
generator (deterministic, independent of the global RNG) and example inputs, and says
whose code it follows and how it departs from the paper authors' V1 reference. The
compiler is meant to find every real lookup in these models (`memory_layers`), leave the
MoE routers and the look-alikes (`lookalike_part`) alone, and cope with the captures the
code allows (`CAPTURE_PINNED`: models whose code pins a dimension).

Import as `ultramem.tests.foreign.cases`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import (
    authors_v1,
    authors_v2,
    blind_styles,
    hf_llama_memory,
    lookalikes,
    meta_memory_plus,
    moe_beside_memory,
    pinned_shapes,
    real_packages,
    xlm_hashing,
)
from .pinned_shapes import Pin


@dataclass(frozen=True)
class ForeignCase:
    id: str  # short, kebab-case, e.g. "pypi-ultra-mem-defaults"
    build: Callable[
        [], tuple[nn.Module, tuple[torch.Tensor, ...]]
    ]  # (model in eval mode, example inputs)
    make_inputs: Callable[
        [int, int], tuple[torch.Tensor, ...]
    ]  # (batch, tokens) -> inputs like the example's
    implementation: str  # whose code it follows, with the URL or package==version
    differs: str  # one sentence: what it does differently from the paper's V1 reference
    memory_layers: int  # how many real memory lookups the model holds (MoE routers do not count)
    lookalike_part: str = ""  # lookalikes only: "selection", "aggregation" or "both"
    max_tokens: int | None = None  # if the model cannot take any sequence length
    slow: bool = False  # True only for a paper-scale/default-size variant taking > 20 s


AUTHORS = "https://github.com/ZihaoHuang-notabot/Ultra-Sparse-Memory-Network"
META = "https://github.com/facebookresearch/memory (lingua/product_key/memory.py)"
XLM = "https://github.com/facebookresearch/XLM (xlm/model/memory/memory.py)"

CASES: list[ForeignCase] = [
    # -- the real PyPI packages, as installed -----------------------------------------------------
    ForeignCase(
        id="pypi-ultra-mem-defaults",
        build=real_packages.pypi_ultra_mem_defaults,
        make_inputs=real_packages.ultra_mem_inputs,
        implementation="ultra-mem==0.1.2 (PyPI), ultra_mem.UltraMem",
        differs=(
            "Two core heads share one key table and score tensor but each selects its own "
            "k=8 with its own core, u/v from torch.svd in forward, ReLU scores, its own "
            "memories table read at idx // 4 and pooled by zeros().scatter (not add) over a "
            "per-row permutation of 4 projection ids, heads concatenated, after RMSNorm "
            "prenorm + causal depthwise conv + LayerNorm queries (key LayerNorm computed, "
            "unused), returning (out, indices, aux_loss) with einx pinning batch and tokens "
            "under export; sizes changed: dim 64, num_memories 1,024 (default 1M), topk 8 "
            "(32), dim_queries_keys 32 (128)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="pypi-ultra-mem-e1-four-cores",
        build=real_packages.pypi_ultra_mem_e1_four_cores,
        make_inputs=real_packages.ultra_mem_e1_inputs,
        implementation="ultra-mem==0.1.2 (PyPI), ultra_mem.UltraMem",
        differs=(
            "value_expansion=1, core_heads=4, pre_query_causal_conv=False: four heads each "
            "selecting k=8 on shared scores with its own core and table (E = 1, plain weighted "
            "sum per head), ReLU scores, heads concatenated with no output projection, tuple "
            "output, einx pinning batch and tokens; sizes changed: dim 64, num_memories 576 "
            "(1M), topk 8 (32), dim_queries_keys 32 (128)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="pypi-pkm-defaults",
        build=real_packages.pypi_pkm_defaults,
        make_inputs=real_packages.pkm_inputs,
        implementation="product-key-memory==0.3.0 (PyPI), product_key_memory.PKM",
        differs=(
            "PKM maths (r = 1, additive grid, softmax) with 4 heads each with its own query "
            "per side, LayerNorm queries, one topk over both sides at once ([..., 2, n] then "
            "chunk), nn.EmbeddingBag summing all heads' rows, no output projection, four "
            "inert Dropout(0.) modules; sizes changed: dim 64, num_keys 32 (128), topk 8 (32), "
            "dim_head 32 (128)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="pypi-peer-defaults",
        build=real_packages.pypi_peer_defaults,
        make_inputs=real_packages.peer_inputs,
        implementation="PEER-pytorch==0.2.2 (PyPI), PEER_pytorch.PEER",
        differs=(
            "PEER: 8 product-key heads (additive grid, one topk over both sides then unbind), "
            "16 candidates per side but a final top-1 per head (non_competing_scores), ReLU "
            "score times GELU(<x, down[slot]>) gating up[slot], summed over heads, einx "
            "pinning batch and tokens; sizes changed: dim 64, num_experts 1,024 (1M)."
        ),
        memory_layers=1,
    ),
    # -- the paper authors' V1 habits -------------------------------------------------------------
    ForeignCase(
        id="authors-v1-buffers",
        build=authors_v1.authors_v1_buffers,
        make_inputs=authors_v1.v1_inputs,
        implementation=f"{AUTHORS} (olmo/ultramem_layer.py, UltraMemLayerV1)",
        differs=(
            "The reference itself as its authors run it: sign-smoothed u/v buffers (some "
            "heads hold -u, -v), scores from an autograd.Function filling two identical "
            "new_zeros buffers with matmul(out=buf[:, i]) per head and rank, 2 heads sharing "
            "one query, E = 4 via a global shuffle, scatter_add_ pooling (D 64, 32 × 32 keys, "
            "256 rows, m = k 8, M 2)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="authors-v1-svd-forward",
        build=authors_v1.authors_v1_svd_forward,
        make_inputs=authors_v1.v1_svd_inputs,
        implementation=f"{AUTHORS} (olmo/ultramem_layer.py, _calc_tucker_1rank in forward)",
        differs=(
            "u/v recomputed every call with torch.svd of the summed cores (V, not Vᵀ; the aux "
            "loss computed and dropped), 1 head, m = k 12, M 3 chunks of 16, D 96."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="authors-v1-ten-cores",
        build=authors_v1.authors_v1_ten_cores,
        make_inputs=authors_v1.v1_ten_inputs,
        implementation=f"{AUTHORS} (olmo/ultramem_layer.py, tucker_multihead=10)",
        differs=(
            "M = 10 Tucker cores as 10 separate Parameters of an nn.ParameterList, each "
            "scoring the grid in a Python loop, value rows of 40 split into 10 chunks."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="authors-v1-dropout-e1",
        build=authors_v1.authors_v1_dropout_e1,
        make_inputs=authors_v1.v1_dropout_inputs,
        implementation=f"{AUTHORS} (olmo/ultramem_layer.py, value_expand_time=1)",
        differs=(
            "nn.Dropout(0.1) on the query, the selected scores and the gathered values "
            "(inactive in eval), and E = 1 (32 × 32 keys over 1,024 rows, shuffle kept, "
            "scatter_add_ into a single group)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="authors-v1-skip-lm",
        build=authors_v1.authors_v1_skip_lm,
        make_inputs=authors_v1.skip_lm_inputs,
        implementation=f"{AUTHORS} (UltraMemLayerV1 in the paper's skip-layer placement)",
        differs=(
            "A 2-block token LM (vocab 96, D 64) whose V1 layer reads block 0's input and is "
            "added after block 1; int64 ids in, logits out."
        ),
        memory_layers=1,
    ),
    # -- UltraMemV2 -------------------------------------------------------------------------------
    ForeignCase(
        id="authors-v2-shared-table",
        build=authors_v2.authors_v2_shared_table,
        make_inputs=authors_v2.v2_shared_inputs,
        implementation=f"{AUTHORS} (olmo/ultramem_layer_v2.py, UltraMemLayerV2)",
        differs=(
            "Two layers reading one value table of 512 rows at ((j % 400) + 256·l) % 512, "
            "a GELU pre-value gate <x Wpre, PV[row]> per slot, a query per side and rank "
            "scored in one batched matmul, E = 1 with a 2×-larger key grid (40 × 40) whose 4 "
            "groups are summed, the second layer's input depending on the first's output."
        ),
        memory_layers=2,
    ),
    ForeignCase(
        id="authors-v2-expand-plain-gate",
        build=authors_v2.authors_v2_expand_plain_gate,
        make_inputs=authors_v2.v2_expand_inputs,
        implementation=f"{AUTHORS} (olmo/ultramem_layer_v2.py, mem_use_glu_act=False)",
        differs=(
            "Two layers on one 288-row table at offsets 0 and 144 (R = 144), a linear "
            "(no activation) pre-value gate, one query per side shared by both ranks, one "
            "core, E = 4 groups projected side by side, 24 × 24 keys, m = k 12, D 48."
        ),
        memory_layers=2,
    ),
    # -- Meta memory+ -----------------------------------------------------------------------------
    ForeignCase(
        id="meta-memory-plus",
        build=meta_memory_plus.meta_memory_plus,
        make_inputs=meta_memory_plus.memory_plus_inputs,
        implementation=META,
        differs=(
            "PKM maths (additive grid, float softmax) with 4 heads from a biased query "
            "Linear, flat key parameter viewed per head, F.embedding_bag(per_sample_weights) "
            "over all heads' rows and the SiLU output gate value_proj(out * silu(x Ws)) with "
            "biases; sizes: D 64, 32 × 32 keys (1024²), k_dim 64 (512), knn 8 (32)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="meta-memory-plus-shared-bn",
        build=meta_memory_plus.meta_memory_plus_shared_bn,
        make_inputs=meta_memory_plus.memory_plus_bn_inputs,
        implementation=f"{META}, mem_share_values + mem_query_batchnorm + mem_gated",
        differs=(
            "Two memory+ layers sharing one value module (the same Parameter under two "
            "names), BatchNorm1d queries with trained running stats, one topk over both "
            "sides ([bs, h, 2, n] then unbind), a sigmoid gate; 2 heads, 48 × 48 keys, knn 8."
        ),
        memory_layers=2,
    ),
    # -- XLM --------------------------------------------------------------------------------------
    ForeignCase(
        id="xlm-hashing-memory",
        build=xlm_hashing.xlm_hashing_memory,
        make_inputs=xlm_hashing.xlm_inputs,
        implementation=f"{XLM}, HashingMemoryProductFast",
        differs=(
            "PKM maths with 4 heads looped in Python (_get_indices per head, joined with "
            "cat), Linear + BatchNorm1d queries, F.linear side scores, float softmax, "
            "nn.EmbeddingBag with per_sample_weights=scores.to(weight.data), input/query/"
            "value dropout, usage statistics stored on the module in forward; D 64, 32 × 32 "
            "keys (512²), k_dim 64 (256), knn 8 (32)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="xlm-hashing-shuffled-modulo",
        build=xlm_hashing.xlm_hashing_shuffled_modulo,
        make_inputs=xlm_hashing.xlm_shuffled_inputs,
        implementation=f"{XLM}, mem_shuffle_indices + mem_modulo_size + mem_normalize_query",
        differs=(
            "XLM memory whose slot ids go through a per-head permutation buffer and then "
            "% 600 (1,024 grid slots onto a 600-row table), with L2-normalised query halves "
            "and temperature 0.5; 2 heads, knn 16, D 48."
        ),
        memory_layers=1,
    ),
    # -- transformers -----------------------------------------------------------------------------
    ForeignCase(
        id="hf-llama-memories",
        build=hf_llama_memory.hf_llama_with_memories,
        make_inputs=hf_llama_memory.hf_inputs,
        implementation="transformers==5.24.0 LlamaForCausalLM with memory MLP slots",
        differs=(
            "A 4-layer Llama (vocab 128, D 64, GQA, RoPE, SDPA) whose layers 1 and 3 hold an "
            "HF-style PKM (RMSNorm query halves, softmax, nn.Embedding + weighted sum over "
            "heads, SiLU-gated down_proj) and layer 2 a V1 layer, exported through a "
            "forward(input_ids) -> logits wrapper with use_cache=False."
        ),
        memory_layers=3,
    ),
    # -- MoE next to memory -----------------------------------------------------------------------
    ForeignCase(
        id="moe-top2-beside-v1",
        build=moe_beside_memory.moe_top2_beside_v1,
        make_inputs=moe_beside_memory.moe_v1_inputs,
        implementation="Switch/GShard-style MoE (gathered expert weights) + authors' V1 layer",
        differs=(
            "A V1 layer in parallel with a softmax top-2-of-8 MoE whose expert matrices are "
            "gathered by index (the router's topk is not a memory lookup)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="moe-dense-gather-beside-xlm",
        build=moe_beside_memory.moe_dense_gather_beside_xlm,
        make_inputs=moe_beside_memory.moe_xlm_inputs,
        implementation="dense MoE with torch.gather of expert outputs + XLM HashingMemory",
        differs=(
            "An XLM memory (2 heads, 24 × 24 keys, BN queries) in parallel with a 6-expert "
            "MoE computed densely whose top-2 outputs are read back with gather and weighted "
            "(a lookup-shaped aggregation that is not a lookup)."
        ),
        memory_layers=1,
    ),
    # -- pinned shapes ----------------------------------------------------------------------------
    ForeignCase(
        id="pinned-seq-len-assert",
        build=pinned_shapes.pinned_seq_len_assert,
        make_inputs=pinned_shapes.fixed_length_inputs,
        implementation="fixed-length encoder with `assert x.shape[1] == self.seq_len` + PKM",
        differs=(
            "PKM read in a fixed-length encoder that asserts exactly 16 tokens and adds a "
            "16-row position table unsliced, so tokens are pinned to 16 (make_inputs refuses "
            "other lengths; any batch works) and a dynamic-token capture is refused."
        ),
        memory_layers=1,
        max_tokens=16,
    ),
    ForeignCase(
        id="pinned-batch-and-tokens-view",
        build=pinned_shapes.pinned_batch_and_tokens_view,
        make_inputs=pinned_shapes.static_batch_inputs,
        implementation="single-serving-shape PKM: view(self.batch_size * self.seq_len, dim)",
        differs=(
            "PKM read (4 heads, 24 × 24 keys, k 6) that views with the batch 2 and 16 tokens "
            "stored in __init__, so only (2, 16) runs (make_inputs refuses other shapes) and "
            "a dynamic capture is refused."
        ),
        memory_layers=1,
        max_tokens=16,
    ),
    ForeignCase(
        id="pinned-xlm-len",
        build=pinned_shapes.xlm_len_pinned,
        make_inputs=pinned_shapes.xlm_len_inputs,
        implementation=f"{XLM}, get_indices exactly as written (bs = len(query))",
        differs=(
            "XLM memory with len(query): eager takes any shape, but under torch.export the "
            "flattened B·T becomes a hidden guard (B·T == 32), so the dynamic export "
            "succeeds and the program rejects every other B·T."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="position-table-lm",
        build=pinned_shapes.position_table_lm,
        make_inputs=pinned_shapes.position_inputs,
        implementation="token LM with a learned 32-row position table sliced by self.pos[:t] + PKM",
        differs=(
            "PKM read (2 heads, 32 × 32 keys, k 8) in an LM with a learned position table "
            "of 32 rows: any length up to 32 tokens, dynamic capture within that bound."
        ),
        memory_layers=1,
        max_tokens=pinned_shapes.MAX_LEN,
    ),
    # -- look-alikes (no memory lookup) -----------------------------------------------------------
    ForeignCase(
        id="lookalike-diagonal-topk",
        build=lookalikes.lookalike_diagonal_topk,
        make_inputs=lookalikes.diagonal_inputs,
        implementation="look-alike (this suite): product keys, final topk over grid diagonal",
        differs=(
            "Final top-4 over the 8 diagonal pairs (a-th row with a-th column) instead of "
            "the 8 × 8 grid, so no candidate grid is ever ranked."
        ),
        memory_layers=0,
        lookalike_part="selection",
    ),
    ForeignCase(
        id="lookalike-max-grid",
        build=lookalikes.lookalike_max_grid,
        make_inputs=lookalikes.max_grid_inputs,
        implementation="look-alike (this suite): product keys, grid max(r, c) + 0.25 min(r, c)",
        differs=(
            "The m × m grid is scored with max(r, c) + 0.25·min(r, c), neither additive nor "
            "bilinear in the two sides, then ReLU weights and a plain weighted sum."
        ),
        memory_layers=0,
        lookalike_part="selection",
    ),
    ForeignCase(
        id="lookalike-unweighted-mix",
        build=lookalikes.lookalike_unweighted_mix,
        make_inputs=lookalikes.unweighted_inputs,
        implementation="look-alike (this suite): PKM selection, per-row tanh mix, mean",
        differs=(
            "Exact PKM selection, but the selected rows go one by one through "
            "tanh(V[slot] W + b) and are averaged, ignoring the scores."
        ),
        memory_layers=0,
        lookalike_part="aggregation",
    ),
    ForeignCase(
        id="lookalike-max-pooled",
        build=lookalikes.lookalike_max_pooled,
        make_inputs=lookalikes.max_pooled_inputs,
        implementation="look-alike (this suite): PKM selection, max-pooled weighted rows",
        differs=(
            "Exact PKM selection and softmax weights, but the weighted rows are max-pooled "
            "(amax) over heads and slots instead of summed."
        ),
        memory_layers=0,
        lookalike_part="aggregation",
    ),
    ForeignCase(
        id="lookalike-concat-topk-of-topks",
        build=lookalikes.lookalike_concat_topk_of_topks,
        make_inputs=lookalikes.concat_inputs,
        implementation="look-alike (this suite): top-k of concatenated unrelated top-ks",
        differs=(
            "A final top-6 over the concatenation of a key-score top-8 and a top-8 of feature "
            "magnitudes (unrelated tensors, no grid), reading one of two tables per position."
        ),
        memory_layers=0,
        lookalike_part="both",
    ),
    # -- written blind (a session that never read the passes or these tests) --------------------
    ForeignCase(
        id="blind-stacked-bmm-pkm",
        build=blind_styles.MODELS["m01_stacked_bmm_pkm"],
        make_inputs=blind_styles.inputs("m01_stacked_bmm_pkm"),
        implementation="written blind (tests/foreign/blind_styles.py, m01)",
        differs=(
            "Stacked keys [2, n, dk] scored by one bmm for both halves, gather, softmax, "
            "F.embedding, einsum pooling."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-column-major-ids",
        build=blind_styles.MODELS["m02_colmajor_transposed_keys"],
        make_inputs=blind_styles.inputs("m02_colmajor_transposed_keys"),
        implementation="written blind (tests/foreign/blind_styles.py, m02)",
        differs=(
            "Keys stored transposed, LayerNorm per half, 1/sqrt(dk) scaling, column-major ids row"
            " + col*n picked with take_along_dim, m=10 != k=12."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-tucker-bmm-svd",
        build=blind_styles.MODELS["m03_tucker_bmm_svd"],
        make_inputs=blind_styles.inputs("m03_tucker_bmm_svd"),
        implementation="written blind (tests/foreign/blind_styles.py, m03)",
        differs=(
            "Tucker r=2 with explicit mm/bmm, keys normalised and SVD of the core inside forward,"
            " ReLU, index_select, bmm pooling."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-per-head-tables-loop",
        build=blind_styles.MODELS["m04_per_head_tables_loop"],
        make_inputs=blind_styles.inputs("m04_per_head_tables_loop"),
        implementation="written blind (tests/foreign/blind_styles.py, m04)",
        differs=(
            "One [H, R, Dv] table parameter, a Python loop over heads with F.embedding on "
            "values[h], div(floor)/remainder, heads concatenated."
        ),
        memory_layers=2,
    ),
    ForeignCase(
        id="blind-tiny-transformer",
        build=blind_styles.MODELS["m05_tiny_transformer_ids"],
        make_inputs=blind_styles.inputs("m05_tiny_transformer_ids"),
        implementation="written blind (tests/foreign/blind_styles.py, m05)",
        differs=(
            "Token ids, causal SDPA block, then a PKM block with residual + LayerNorm, "
            "BatchNorm'd queries, index_select, bmm pooling."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-ultramem-ive",
        build=blind_styles.MODELS["m06_ultramem_ive_mcs"],
        make_inputs=blind_styles.inputs("m06_ultramem_ive_mcs"),
        implementation="written blind (tests/foreign/blind_styles.py, m06)",
        differs=(
            "Authors' V1 habits: 2 key heads, r=2, 2 cores, loops into a new_empty buffer, "
            "RMSNorm, E=4 shuffle with mod/div, scatter_add."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-embedding-bag-tuple",
        build=blind_styles.MODELS["m07_embedding_bag_tuple"],
        make_inputs=blind_styles.inputs("m07_embedding_bag_tuple"),
        implementation="written blind (tests/foreign/blind_styles.py, m07)",
        differs=(
            "Lample-style 4 heads sharing a table, F.embedding_bag(per_sample_weights), returns "
            "(output, slot ids)."
        ),
        memory_layers=1,  # four heads, one bag
    ),
    ForeignCase(
        id="blind-v2-shared-table",
        build=blind_styles.MODELS["m08_v2_shared_table_gates"],
        make_inputs=blind_styles.inputs("m08_v2_shared_table_gates"),
        implementation="written blind (tests/foreign/blind_styles.py, m08)",
        differs=(
            "V2: two layers sharing one table with wrapped offsets, GELU per-slot gate, silu "
            "output gate, take_along_dim for the score gather."
        ),
        memory_layers=2,
    ),
    ForeignCase(
        id="blind-sigmoid-scores",
        build=blind_styles.MODELS["m09_shared_query_conv_sigmoid"],
        make_inputs=blind_styles.inputs("m09_shared_query_conv_sigmoid"),
        implementation="written blind (tests/foreign/blind_styles.py, m09)",
        differs=(
            "One shared query after a causal depthwise conv, one key matrix [2n, dk] split after "
            "one matmul, sigmoid on the selected scores."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-heads-last",
        build=blind_styles.MODELS["m10_heads_last_einsum"],
        make_inputs=blind_styles.inputs("m10_heads_last_einsum"),
        implementation="written blind (tests/foreign/blind_styles.py, m10)",
        differs=(
            "Heads as the LAST dim everywhere (top-k over dims 1 and 2), m=12 != k=16, einsum "
            "'tkh,tkhd->td'."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="blind-lookalike-topk-attention",
        build=blind_styles.MODELS["x01_lookalike_topk_attention"],
        make_inputs=blind_styles.inputs("x01_lookalike_topk_attention"),
        implementation="written blind (tests/foreign/blind_styles.py, x01)",
        differs="Top-k sparsified self-attention (scatter into -inf): no product keys.",
        memory_layers=0,
        lookalike_part="both",
    ),
    ForeignCase(
        id="blind-lookalike-flat-knn",
        build=blind_styles.MODELS["x02_lookalike_flat_knn"],
        make_inputs=blind_styles.inputs("x02_lookalike_flat_knn"),
        implementation="written blind (tests/foreign/blind_styles.py, x02)",
        differs="A kNN over a flat table of 1024 keys: one top-k, no grid.",
        memory_layers=0,
        lookalike_part="both",
    ),
    ForeignCase(
        id="blind-lookalike-top2-moe",
        build=blind_styles.MODELS["x03_lookalike_top2_moe"],
        make_inputs=blind_styles.inputs("x03_lookalike_top2_moe"),
        implementation="written blind (tests/foreign/blind_styles.py, x03)",
        differs="A top-2 MoE router computed densely.",
        memory_layers=0,
        lookalike_part="both",
    ),
]

#: cases whose capture is pinned: pinned_shapes' own, and the PyPI packages that compute
#: with einx (its torch backend reads shapes with int(), so batch and tokens specialise)
CAPTURE_PINNED: dict[str, Pin] = {
    **pinned_shapes.PINNED,
    **{
        case_id: Pin(batch=None, tokens=None, capture="raises")
        for case_id in sorted(real_packages.STATIC_CAPTURE_ONLY)
    },
    # take_along_dim on a dynamic token dim, or a top-k size computed from it: torch.export
    # refuses the dynamic capture
    **{
        case_id: Pin(batch=None, tokens=None, capture="raises")
        for case_id in (
            "blind-column-major-ids",
            "blind-v2-shared-table",
            "blind-lookalike-topk-attention",  # topk(min(4, L)) guards the token dim
        )
    },
}

CASES_BY_ID: dict[str, ForeignCase] = {case.id: case for case in CASES}
