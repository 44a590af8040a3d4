"""Bind a lookup's selection to ``ultramem::retrieve``, proven by evaluation.

The selection is the sub-graph from the score tensors to its *outputs*: the first nodes
that combine the final top-k's positions with candidate data (the selected slot ids, or
their rows and columns; the selected per-core scores), and the final top-k's own values
(the ranked scores). Everything downstream of the outputs (activations, gates, slot
shuffles, table reads, pooling) is the rest of the model's graph and is left as it is.

A binding (``binding``) says which tensor holds the row and column scores and how to view
each as ``[T, H, n, r]``, the rank-1 vectors and cores among the weights on their paths, and,
for each output, which of the op's outputs it is in which layout. It is found by named
rules, one module per hypothesis family, run in order by ``bind``:

``outputs`` (selection_outputs) → candidate_counts → ``score_source`` (score_source,
score_sides) → ``layout`` (score_layout) → ``merge_weights`` (rank_one_vectors, cores) →
``proof`` (output_proof) → ``grid_order`` → ``activation``.

Nothing is accepted on looks: a binding must reproduce every output on the model's real
activations and on random score tensors (ints exactly). PKM's additive grid (score = row +
column, r = 1) binds as rank 2 with rows ``[s, 1]``, columns ``[1, s]`` and the identity core.
"""

from __future__ import annotations

from .bind import SELECTION_RULES, bind_selection
from .binding import SelectionBinding
from .fuse import fuse_selection

__all__ = ["SELECTION_RULES", "SelectionBinding", "bind_selection", "fuse_selection"]
