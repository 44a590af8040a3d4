"""``ultramem::retrieve``: candidate selection, grid scoring and top-k of one memory lookup.

Semantics (docs/ultramem.md, steps 3-6), for each token t and key head h:

    a_row = row_scores[t, h] @ row_weight[h]          # [n]   rank-1 merge
    a_col = col_scores[t, h] @ col_weight[h]
    I_row = topk(a_row, topm);  I_col = topk(a_col, topm)
    G_c[a, b] = row_scores[t, h, I_row[a]] @ cores[c, h] @ col_scores[t, h, I_col[b]]
    pos = topk(Σ_c G_c, topk) over the flattened m × m grid
    slots  = I_row[pos // m] * n + I_col[pos % m]      # [k] int64, grid slot ids
    scores = activation(G_c[pos]) for each core c      # [k, M]

Inputs: ``row_scores``/``col_scores`` [T, H, n, r] (the scoring GEMM stays outside the op:
it is a plain matmul that every backend already runs well, and keeping it out lets one op
serve shared, per-side, per-head and per-rank queries alike), ``row_weight``/``col_weight``
[H, r], ``cores`` [M, H, r, r]. Attributes: ``topm``, ``topk``, ``activation`` in
{none, relu, softmax} (softmax over the k selected, per core).

Variants bind as follows: PyPI ``ultra-mem``'s "each core selects its own k" is M cores
as M heads (H·M heads, one core each); PKM's additive score is r = 2 with
``row_scores = [s_row, 1]``, ``col_scores = [1, s_col]`` and the identity core (s_row·1 + 1·s_col).

Numerics: everything is computed in fp32; ties break toward the lower index at both
top-k stages (the grid index is ``a * m + b``), on every backend. NaN ranks above every
number (``torch.sort``'s order, which ``torch.topk`` shares): a NaN score is selected
first, NaNs among themselves by index, and an activation keeps it NaN. Outputs: scores in
the input dtype, slots int64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .contract import RETRIEVE
from .registry import define_op

ACTIVATIONS = RETRIEVE.attribute("activation").choices


def stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim, largest first, ties toward the lower index."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def check_retrieve_inputs(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The call's arguments by name, checked against the contract (``ValueError`` with
    what was received when they cannot form a lookup)."""
    bound = RETRIEVE.bind(*args, **kwargs)
    RETRIEVE.check(bound)
    return bound


def apply_activation(scores: Tensor, activation: str) -> Tensor:
    """``scores`` [..., k, M]: relu elementwise, or softmax over the k selected per core."""
    if activation == "relu":
        return scores.relu()
    if activation == "softmax":
        return scores.softmax(dim=-2)
    return scores


def retrieve_reference(
    row_scores: Tensor,
    col_scores: Tensor,
    row_weight: Tensor,
    col_weight: Tensor,
    cores: Tensor,
    topm: int,
    topk: int,
    activation: str = "none",
) -> tuple[Tensor, Tensor]:
    check_retrieve_inputs(
        row_scores, col_scores, row_weight, col_weight, cores, topm, topk, activation
    )
    tokens, heads, n, rank = row_scores.shape
    n_cores = cores.shape[0]
    s_row, s_col = row_scores.float(), col_scores.float()
    a_row = (s_row * row_weight.float()[None, :, None, :]).sum(-1)
    a_col = (s_col * col_weight.float()[None, :, None, :]).sum(-1)
    _, i_row = stable_topk(a_row, topm)
    _, i_col = stable_topk(a_col, topm)
    c_row = s_row.gather(2, i_row.unsqueeze(-1).expand(-1, -1, -1, rank))  # [T, H, m, r]
    c_col = s_col.gather(2, i_col.unsqueeze(-1).expand(-1, -1, -1, rank))
    # G[t, c, h, a, b] = Σ_p Σ_q c_row[t,h,a,p] · cores[c,h,p,q] · c_col[t,h,b,q]
    projected = torch.einsum("thap,chpq->tchaq", c_row, cores.float())
    grid = torch.einsum("tchaq,thbq->tchab", projected, c_col)
    grid = grid.reshape(tokens, n_cores, heads, topm * topm)
    _, pos = stable_topk(grid.sum(1), topk)  # [T, H, k]
    slots = i_row.gather(2, pos // topm) * n + i_col.gather(2, pos % topm)
    scores = grid.gather(3, pos.unsqueeze(1).expand(-1, n_cores, -1, -1)).permute(0, 2, 3, 1)
    scores = apply_activation(scores, activation)
    return scores.to(row_scores.dtype).contiguous(), slots


define_op(RETRIEVE, retrieve_reference)
