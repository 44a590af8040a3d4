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
    compile_checks_pkm,
    csordas_lowrank_pkm,
    flax_peer_port,
    hf_llama_memory,
    lingua_peer_variant,
    llama_peer_engram,
    lookalikes,
    memory_plus_finetune,
    mesh_tf_memory,
    meta_memory_plus,
    moe_beside_memory,
    multimolecule_rnamsm_pkm,
    peer_block_glu,
    pinned_shapes,
    praxis_mixture_of_depths,
    praxis_peer,
    real_packages,
    tf_pkm_keras_port,
    ultramem_one_einsum,
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
    # top-ks that stay after fusion because the model returns what they rank (candidates)
    kept_topks: int = 0
    # a lookup the ops cannot express: the reason the compiler must give, in a few words
    refused: str = ""
    # ``ultramem::aggregate`` calls when not one per memory layer: heads that read the table
    # each on their own and are summed by ``+`` fuse one aggregation per head (reads are
    # pooled into one call only when their slots are joined before one read)
    aggregates: int | None = None


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
    # -- round 2: more public code, read by a session independent of the compiler ----------------
    ForeignCase(
        id="csordas-pkm-nograd-rescore",
        build=csordas_lowrank_pkm.csordas_pkm_nograd_rescore,
        make_inputs=csordas_lowrank_pkm.rescore_inputs,
        implementation=(
            "https://github.com/RobertCsordas/moe (layers/lowrank_approximate_2layer.py, "
            "LowrankApproximate2Layer)"
        ),
        differs=(
            "PKM maths with 2 heads looped in Python over SparseAddress objects, selection "
            "under torch.no_grad() with topk(sorted=False), the selected scores recomputed "
            "by gathering the full side scores at idx // n and idx % n, head 0's ids shifted "
            "by head 1's offset mod n², ReLU scores, nn.EmbeddingBag(per_sample_weights), in "
            "a pre-LN residual; sizes: D = k_dim 64, 32 × 32 keys, knn 8 (32)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="csordas-two-memories-one-topk",
        build=csordas_lowrank_pkm.csordas_two_memories_one_topk,
        make_inputs=csordas_lowrank_pkm.merged_inputs,
        implementation=(
            "https://github.com/RobertCsordas/moe (LowrankApproximate2Layer, head_merge_topk "
            "via SparseAddress.cat)"
        ),
        differs=(
            "Two product-key memories (own query, own 24 × 24 keys) hand over their whole "
            "8 × 8 candidate grids, concatenated (128 candidates) before ONE top-8 over both, "
            "read from one shared 576-row EmbeddingBag (memory 0's ids shifted by 12 mod "
            "576), ReLU scores; sizes: D = k_dim 48."
        ),
        memory_layers=1,
        refused="ranks the candidate grids of 2 selections together",
    ),
    ForeignCase(
        id="memory-plus-exhaustive-grid",
        build=memory_plus_finetune.memory_plus_exhaustive_grid,
        make_inputs=memory_plus_finetune.exhaustive_inputs,
        implementation=(
            "https://github.com/Satgoy152/finetuningmemorylayers (qwen_mem/memory_layer.py, "
            "MemoryPlus) with Memory+ product keys"
        ),
        differs=(
            "Cosine scores per side (F.normalize on query halves and keys), the FULL 32 × 32 "
            "grid of row + col sums scored and ONE top-8 over all 1,024 slots (no per-side "
            "top-m), for each of 2 heads in a Python loop, softmax, values[idx] weighted sums "
            "added over heads, out_proj(read * silu(gate_proj(x))) in a Qwen2 RMSNorm + "
            "residual slot; sizes: d_model 64 (896), 1,024 slots (10,000 flat), d_key 32 "
            "(256), k 8 (32)."
        ),
        memory_layers=1,
        aggregates=2,
    ),
    ForeignCase(
        id="lingua-peer-gelu-variant",
        build=lingua_peer_variant.lingua_peer_variant,
        make_inputs=lingua_peer_variant.peer_variant_inputs,
        implementation=(
            "https://github.com/facebookresearch/memory (lingua/product_key/memory.py, "
            "HashingMemory peer_variant=True), as in its single-GPU copies"
        ),
        differs=(
            "PEER behind lingua's PKM selection: 4 heads' softmax scores over heads · knn "
            "one-neuron experts, gelu(<x, values_u[slot]>) · score · values_v[slot] by two "
            "einsums, unused value_proj/swilu_projection left in the state dict, after a "
            "dense SwiGLU layer; sizes: D 64, k_dim 32 (512), 32 × 32 keys (1024²), knn 8 "
            "(32)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="peer-block-glu-one-head",
        build=peer_block_glu.peer_block_glu_one_head,
        make_inputs=peer_block_glu.glu_one_head_inputs,
        implementation="public PEER reproduction `PEERBlock` (XLM _get_indices, glu=True)",
        differs=(
            "GLU experts from three tables: relu(<x, down[slot]>) · <x, gate[slot]> · "
            "softmax(score) · up[slot] via einops.einsum, 1 head, biased Linear + BatchNorm "
            "queries, XLM per-head loop with F.linear sides, returns (out, knn² grid "
            "scores); sizes: d_model 64, 32 × 32 experts, key_dim 32, top-8."
        ),
        memory_layers=1,
        kept_topks=2,  # it returns the candidate grid (all_scores)
    ),
    ForeignCase(
        id="peer-block-glu-three-heads",
        build=peer_block_glu.peer_block_glu_three_heads,
        make_inputs=peer_block_glu.glu_three_heads_inputs,
        implementation="public PEER reproduction `PEERBlock` (XLM _get_indices, glu=True)",
        differs=(
            "The same GLU PEER with 3 heads looped in Python, joined with torch.cat and "
            "einops.rearrange('(b t) h k -> b t h k'), SiLU on the down product, the heads' "
            "experts summed by one einsum; sizes: d_model 48, 24 × 24 experts, key_dim 24, "
            "top-6."
        ),
        memory_layers=1,
        kept_topks=6,  # it returns every head's candidate grid (all_scores)
    ),
    ForeignCase(
        id="compile-checks-pkm",
        build=compile_checks_pkm.compile_checks_pkm,
        make_inputs=compile_checks_pkm.check_inputs,
        implementation=(
            "torch.compile idiom: torch._check / torch._check_is_size (pytorch.org exportdb "
            "torch.dynamic-value) around a functional PKM"
        ),
        differs=(
            "PKM maths with torch._check_is_size(B), _check_is_size(T, max=4096) and six "
            "torch._check on shapes inside forward, F.rms_norm query halves, one einsum and "
            "one topk over both sides then unbind, float32 softmax, F.embedding_bag over 4 "
            "heads, output Linear; sizes: D 64, 4 heads, 32 × 32 keys, head_dim 16, top-8."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="llama-peer-sliced-keys",
        build=llama_peer_engram.llama_peer_sliced_keys,
        make_inputs=llama_peer_engram.llama_peer_inputs,
        implementation=(
            "https://github.com/MikeyBeez/PEER (llama_peer_engram.py, LlamaPEER + "
            "ModifiedLlamaDecoderLayer) on transformers==5.24.0 LlamaForCausalLM"
        ),
        differs=(
            "A 3-layer HF Llama whose layers 1 and 2 are wrapped to add PEER after the "
            "layer: sides scored through slices of the key parameter keys[:, :, p, :], "
            "explicit expand cartesian grid, SiLU(<x, down[slot]>) · relu(score) · up[slot], "
            "4 heads; int64 ids in, logits out; sizes: D 64, 32 × 32 experts (128²), 8 per "
            "head, dim_key 16 (64)."
        ),
        memory_layers=2,
    ),
    ForeignCase(
        id="ultramem-one-einsum",
        build=ultramem_one_einsum.ultramem_one_einsum,
        make_inputs=ultramem_one_einsum.one_einsum_inputs,
        implementation=f"{AUTHORS} layout, arXiv 2411.12364 Eq. 7-16, written as one einsum",
        differs=(
            "V1 maths with ONE einsum 'tsd,hsndr->tshnr' scoring both sides of both heads, "
            "u/v buffers from linalg.svd of the summed cores, all cores in one 3-operand "
            "einsum, global shuffle, E = 4 via scatter_add_, in a pre-LN residual (D 64, "
            "32 × 32 keys, 256 rows, Dk 32, r 2, M 2, m = k 8, Dv 32)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="ultramem-sliced-views",
        build=ultramem_one_einsum.ultramem_sliced_views,
        make_inputs=ultramem_one_einsum.sliced_inputs,
        implementation=f"{AUTHORS} layout, arXiv 2411.12364, written with parameter views",
        differs=(
            "The same V1 layer scoring each side through a slice of the key parameter "
            "(einsum('...d,hndr->...hnr', q_row, keys[:, 0]), keys.select(1, 1)), a value "
            "table stored transposed and read as values_t.t(), F.linear with a bare output "
            "weight; D 48, 24 × 24 keys, 144 rows, Dk 24, m 10 != k 6, Dv 24."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="flax-peer-language-model",
        build=flax_peer_port.flax_peer_language_model,
        make_inputs=flax_peer_port.flax_lm_inputs,
        implementation="public Flax (linen) port of lucidrains/PEER-pytorch, back in torch",
        differs=(
            "A 1-block LM (vocab 96, D 64, non-causal MHA) running two PEERs in a row "
            "(peer2(gelu_tanh(peer1(x)))), each with Dense + BatchNorm queries whose output "
            "OVERWRITES x (experts read the query features), per-side topk in a list "
            "comprehension, take_along_dim, index_select on the tables, 1 head; sizes: "
            "32 × 32 experts (1M), 8 per head (16)."
        ),
        memory_layers=2,
    ),
    ForeignCase(
        id="mesh-tf-product-key-value-memory",
        build=mesh_tf_memory.mesh_tf_product_key_value_memory,
        make_inputs=mesh_tf_memory.mesh_inputs,
        implementation=(
            "https://github.com/tensorflow/mesh (mesh_tensorflow/transformer/"
            "memory_layers.py, ProductKeyValueMemory), in torch"
        ),
        differs=(
            "PKM maths with named-dim layout: biased dense query into [b, l, h, 2, k], mtf "
            "layer_norm (scale only, eps 1e-6), one einsum and one top_k over both sides "
            "then unstack, values gathered to [b, l, h, knn, d] and one einsum reducing "
            "heads and knn, in an rms_norm residual sublayer; sizes: d_model 64, key_size "
            "64, 32 × 32 keys, 4 heads, knn 8."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="tf-pkm-keras-port",
        build=tf_pkm_keras_port.tf_pkm_keras_port,
        make_inputs=tf_pkm_keras_port.keras_inputs,
        implementation=(
            "https://github.com/Rocketknight1/tf-pkm-layer (tf_memory_layer.py), in torch"
        ),
        differs=(
            "XLM PKM as ported to Keras: Dense kernel [in, out] + bias, Keras BatchNorm "
            "(eps 1e-3) queries, a Python loop over 4 heads with matmul(transpose_b) sides, "
            "broadcast grids, gather, values[indices] * scores reduce_sum instead of "
            "EmbeddingBag, post-LN BERT slot; sizes: D 64 (768), k_dim 32 (256), 32 × 32 "
            "keys (512²), knn 8 (32)."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="multimolecule-rnamsm-pkm",
        build=multimolecule_rnamsm_pkm.multimolecule_rnamsm_pkm,
        make_inputs=multimolecule_rnamsm_pkm.rnamsm_inputs,
        implementation=(
            "https://github.com/DLS5-Omics/multimolecule (models/rnamsm/modeling_rnamsm.py, "
            "RnaMsmPkmLayer) with product-key-memory==0.3.0"
        ),
        differs=(
            "RNA MSA transformer (axial layer, then the 'pkm' layer) in R x C x B x D layout "
            "at MSA depth 1, the real PKM package fed (R·C) x B so its 'batch' is the "
            "residues and its 'tokens' the batch; nucleotide ids in, hidden states out; "
            "sizes: D 64, 4 PKM heads, 32 × 32 keys, topk 8, head size 16."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="praxis-peer-offset-heads",
        build=praxis_peer.praxis_peer_offset_heads,
        make_inputs=praxis_peer.praxis_peer_inputs,
        implementation="https://github.com/0-5788719150923125/praxis (PraxisPEER 0.1.0)",
        differs=(
            "PEER with BatchNorm1d on the INPUT before the query Linear, Unflatten + Permute "
            "modules, one topk over both sides unpacked per side, per-head expert sets "
            "(ids + h · n²), sigmoid(score) · gelu(<x, down[slot]>) · up[slot], dropout on "
            "the gathered rows; sizes: D 64, 4 heads, 32 × 32 experts per head, key_dims 16, "
            "k 8."
        ),
        memory_layers=1,
    ),
    ForeignCase(
        id="lookalike-praxis-mixture-of-depths",
        build=praxis_mixture_of_depths.praxis_mixture_of_depths,
        make_inputs=praxis_mixture_of_depths.mod_inputs,
        implementation="https://github.com/0-5788719150923125/praxis (PraxisMixtureOfDepths)",
        differs=(
            "Mixture-of-Depths router: topk(sorted=False) of router logits over the "
            "sequence, sort of the indices, gather of the chosen tokens, a transformer "
            "block on them, scatter_add of sigmoid(weight) · update back; no product keys, "
            "no table (D 64, capacity 0.5)."
        ),
        memory_layers=0,
        lookalike_part="both",
    ),
    ForeignCase(
        id="lookalike-flax-peer-position-bug",
        build=flax_peer_port.flax_peer_position_bug,
        make_inputs=flax_peer_port.position_bug_inputs,
        implementation="public Flax (linen) port of lucidrains/PEER-pytorch, bugs kept",
        differs=(
            "The Flax PEER as published: top-k pairs unpacked the wrong way round (the "
            "'grid' adds x-side scores to x-side integer key ids) and the expert tables read "
            "at the positions in the 6 × 6 candidate grid instead of slot ids (D 48, "
            "24 × 24 experts, 6 per head)."
        ),
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
    # round 2: int(s * capacity) specialises the token count; jnp.take_along_axis ported as
    # torch.take_along_dim specialises batch and tokens
    **{
        case_id: Pin(batch=None, tokens=None, capture="raises")
        for case_id in (
            "lookalike-praxis-mixture-of-depths",
            "flax-peer-language-model",
            "lookalike-flax-peer-position-bug",
        )
    },
}

CASES_BY_ID: dict[str, ForeignCase] = {case.id: case for case in CASES}
