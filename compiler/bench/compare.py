"""An older ``bench.json`` given to ``bench --compare``: checked as data from anywhere.

No heavy import here: the CLI checks the file before the model loads.
"""

from __future__ import annotations

import math
from typing import Any


def comparable(old: Any) -> str | None:
    """Why an older ``bench.json`` cannot be compared with (a file from anywhere: its
    shape is checked before the bench runs, not when the table is made), or None."""
    backends = old.get("backends") if isinstance(old, dict) else None
    if not isinstance(backends, list):
        return "has no list of backends"
    for b in backends:
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            return "has a backend without a name"
        results = b.get("results", [])
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            return f"has results of {b['name']} that are not a list of records"
        for r in results:
            if r.get("status") != "ok":
                continue
            p50, tokens = r.get("p50_ms"), r.get("tokens")
            number = isinstance(p50, (int, float)) and not isinstance(p50, bool)
            if not number or not math.isfinite(p50) or p50 <= 0 or not isinstance(tokens, int):
                return f"has a result of {b['name']} without a positive p50_ms and tokens"
    return None
