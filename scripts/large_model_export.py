"""Export an UltraMem model whose weights exceed 2 GB; report files, hashes and peak RSS.

    python scripts/large_model_export.py --out /tmp/large --value-gb 2.2

Builds a one-memory-layer LM whose value table alone holds ``--value-gb`` GB (fp32),
runs the whole ``ultramem export`` pipeline (capture, passes, ONNX with external data,
parity in ONNX Runtime) and prints the peak resident memory against the weight bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from ultramem.compiler.pipeline import export_model
from ultramem.models.builtin import LoadedModel
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--value-gb", type=float, default=2.2)
    args = parser.parse_args()
    n_keys, value_dim = 1024, 64
    rows_needed = int(args.value_gb * 1e9 / (4 * value_dim))
    expansion = max(1, n_keys * n_keys // rows_needed)
    while (n_keys * n_keys) % expansion:
        expansion -= 1
    rows = n_keys * n_keys // expansion
    value_dim = int(args.value_gb * 1e9 / (4 * rows)) // 2 * 2
    mem = UltraMemConfig(
        d_model=64,
        n_keys=n_keys,
        key_dim=32,
        heads=1,
        cores=2,
        topm=8,
        topk=8,
        value_dim=value_dim,
        expansion=expansion,
    )
    torch.manual_seed(0)
    model = UltraMemLM(LMConfig(memory=mem, max_seq_len=64)).eval()
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    baseline = peak_rss_bytes()
    tokens = torch.randint(0, 64, (1, 8))
    start = time.perf_counter()
    manifest, report = export_model(
        LoadedModel(model, (tokens,), "large-model-script", {"max_tokens": 64}), args.out, print
    )
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes()
    summary = {
        "weight_bytes": weights,
        "rss_before_export_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_over_weights": peak / weights,
        "export_seconds": round(elapsed, 1),
        "parity_passed": report.passed,
        "artifacts": manifest["artifacts"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
