"""Bind a lookup's value aggregation to ``ultramem::aggregate``, proven by evaluation.

After the selection is fused, the model's own ops read value tables at indices computed
from the slot ids and pool the weighted rows. An aggregation is anchored at such a *read*
(a float weight table read at indices the slot ids reach through integer ops alone:
``reads``) and ends at a *pooled* node every path from the read crosses (the first, or one
of the next few common post-dominators). Between them lie the region's other inputs:
per-selection float *factors* (the scores after any activation or gate: the op's
``weights``), integer glue (slot ids → rows, → pooling groups) and shapes.

What is computed, not guessed: each element's selection (``coordinates``), so a factor in
any layout is viewed as [T, H, k, M]; the row and group maps, from the glue on every slot
id (``index_maps``). What is hypothesised and proven: the pooled node's layout (which dims
are tokens, head groups, scatter groups, values) and, with a table per core, which table
goes with which core. Named rules, one module per family, run in order by ``bind``:

pooled_node → key_grids → ``row_map`` → ``weights`` (region_inputs, weights) → ``pooling``
(pooling, pooled_layout) → ``core_order`` → ``proof`` (aggregation_proof).

A binding is accepted only when the op reproduces the pooled node on the model's real
activations, on random factors and on random slot ids.
"""

from __future__ import annotations

from .bind import AGGREGATION_RULES, bind_aggregation
from .binding import AggregationBinding
from .fuse import fuse_aggregation

__all__ = ["AGGREGATION_RULES", "AggregationBinding", "bind_aggregation", "fuse_aggregation"]
