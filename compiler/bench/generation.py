"""``ultramem bench`` of a text-generation export's decoder: a prompt, and one token at a time.

Baseline: eager ``transformers`` as ``generate`` runs it (the model's forward with its
default dynamic cache). A prompt from an empty cache (prefill) is timed at each prompt
length; one new token (decode) at several cache fills (the eager cache is cropped back to
the fill after each call, so every call decodes at the same fill; the decoder takes the
same cache, filled by an eager run of it, as input).
Each backend's logits are first checked against eager's on the same tokens (a wrong
backend is not timed); then the backends are timed together, interleaved round by round,
with the same thread count (``run.torch_threads``, ONNX Runtime's session options).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import first_line
from ..artifacts import ArtifactError
from ..formats import ProgressFn
from ..generation.programs import GenerationProgram, decoder_inputs
from ..parity.compare import compare_outputs, tolerance_for
from ..pipeline import Compiled
from .run import TORCH_BACKENDS, bench_device, make_backends, report_head, torch_threads
from .timing import interleave, too_noisy

GENERATION_BENCH_SCHEMA = "ultramem-bench-generation/1"
GENERATION_BACKENDS = ("eager", "fused-ops", "onnxruntime-cpu", "aotinductor", "tensorrt")

StepFn = Callable[[tuple[Any, ...]], Any]  # the decoder: flat inputs -> (logits, cache...)


def cache_fills(max_cache_len: int) -> list[int]:
    return sorted({1, max_cache_len // 4, max_cache_len // 2, max_cache_len - 1} - {0})


def run_generation_bench(
    program: GenerationProgram,
    compiled: Compiled,
    artifacts: Path,
    wanted: Collection[str],
    formats: Collection[str],
    native_code: bool,
    prompt_lengths: list[int],
    batch: int,
    budget_s: float,
    progress: ProgressFn,
    threads: int,
) -> dict[str, Any]:
    with torch_threads(threads) as applied, torch.no_grad():
        loaded = make_backends(
            compiled, artifacts, [n for n in wanted if n != "eager"], formats, native_code, applied
        )  # eager is transformers' own forward, with its dynamic cache (below)
        backends = {b.name: b.run or b.reason for b in loaded}
        runnable = [n for n in wanted if n == "eager" or callable(backends.get(n))]
        if not runnable:
            why = "; ".join(f"{n}: {r}" for n, r in backends.items() if isinstance(r, str))
            raise ArtifactError(f"no backend of --backends can run here ({why or 'none given'})")
        return _bench(
            program, backends, wanted, (prompt_lengths, batch), budget_s, progress, applied
        )


def _bench(
    program: GenerationProgram,
    backends: dict[str, StepFn | str],
    wanted: Collection[str],
    sizes: tuple[list[int], int],
    budget_s: float,
    progress: ProgressFn,
    threads: int,
) -> dict[str, Any]:
    from transformers import DynamicCache

    prompt_lengths, batch = sizes
    device = bench_device()
    model = program.model
    vocab = int(model.config.get_text_config().vocab_size)
    tol = tolerance_for(next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(0)
    names = [n for n in GENERATION_BACKENDS if n in wanted]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    reasons = {n: r for n, r in backends.items() if isinstance(r, str)}
    points: list[tuple[str, int]] = [("prefill", t) for t in prompt_lengths]
    points += [("decode", f) for f in cache_fills(program.max_cache_len)]
    progress(f"threads: {threads} for every backend")
    for phase, size in points:
        prompt = torch.randint(0, vocab, (batch, size), generator=gen)
        token = torch.randint(0, vocab, (batch, 1), generator=gen)
        fns: dict[str, Callable[[], Any]] = {}
        if phase == "prefill":
            inputs: tuple[Any, ...] = decoder_inputs(prompt, 0, program.empty_cache(batch))
            reference = model(input_ids=prompt, use_cache=True).logits[:, -1]
            if "eager" in names:
                fns["eager"] = lambda prompt=prompt: model(input_ids=prompt, use_cache=True)
        else:
            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, cache=cache, use_cache=True)
            reference = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            _crop(cache, size)
            present = program.run(prompt, 0, program.empty_cache(batch))[1:]
            inputs = decoder_inputs(token, size, tuple(present))

            def eager_step(token: Tensor = token, cache: Any = cache, size: int = size) -> Any:
                out = model(input_ids=token, cache=cache, use_cache=True)
                _crop(cache, size)
                return out

            if "eager" in names:
                fns["eager"] = eager_step
        for name in names:
            run = backends.get(name)
            if name == "eager" or not callable(run):
                continue
            try:
                logits = run(inputs)[0][:, -1].to(reference.dtype).cpu()
                check = compare_outputs("logits", reference, logits, tol)
                message = "" if check.passed else check.message
            except Exception as exc:  # an artifact that does not take these inputs
                message = f"raised {type(exc).__name__}: {first_line(exc, 200)}"
            if message:
                rows[name].append({"phase": phase, "tokens": size, "status": "wrong",
                                   "parity": message})  # fmt: skip
                progress(f"WRONG | {name} | {phase} {size} | {message}")
                continue
            fns[name] = lambda run=run, inputs=inputs: run(inputs)
        progress(f"{phase} at {size} tokens: timing {', '.join(fns)} interleaved")
        timed = interleave(fns, device, budget_s)
        for name, timing in timed.timings.items():
            p10, p50, p90 = timing.p10, timing.p50, timing.p90
            new_tokens = batch * (size if phase == "prefill" else 1)
            rows[name].append({
                "phase": phase, "tokens": size, "batch": batch, "status": "ok",
                "p10_ms": p10, "p50_ms": p50, "p90_ms": p90, "reps": len(timing.samples_ms),
                "tokens_per_s": new_tokens / (p50 / 1e3), "noisy": too_noisy(p10, p50, p90),
            })  # fmt: skip
    eager = {(r["phase"], r["tokens"]): r for r in rows.get("eager", []) if r["status"] == "ok"}
    for results in rows.values():
        for row in results:
            base = eager.get((row["phase"], row["tokens"]))
            if row["status"] == "ok" and base is not None:
                row["speedup_vs_eager"] = base["p50_ms"] / row["p50_ms"]
    return {
        **report_head(GENERATION_BENCH_SCHEMA, program.decoder.source, device),
        "threads": threads,
        "batch": batch,
        "max_cache_len": program.max_cache_len,
        "budget_s": budget_s,
        "backends": [
            {
                "name": name,
                "available": name == "eager" or callable(backends.get(name)),
                "reason": reasons.get(name, ""),
                "settings": {"torch_threads": threads}
                if name in TORCH_BACKENDS
                else {"intra_op_num_threads": threads},
                "results": rows[name],
            }
            for name in names
        ],
    }


def _crop(cache: Any, size: int) -> None:
    """Back to ``size`` tokens (``crop`` takes how many to remove, as a negative count)."""
    extra = int(cache.get_seq_length()) - size
    if extra > 0:
        cache.crop(-extra)


def generation_markdown(report: dict[str, Any]) -> str:
    backends = [b for b in report["backends"] if b["available"]]
    head = "| phase | tokens | " + " | ".join(b["name"] for b in backends) + " |"
    lines = [
        f"# ultramem bench (text-generation): {report['model']}",
        "",
        f"{report['device']}, {report['threads']} threads, batch {report['batch']}, cache of "
        f"{report['max_cache_len']}. p50 ms (p10-p90), speedup over eager transformers; "
        "prefill: the prompt's tokens; decode: one token per sequence at that cache fill.",
        "",
        head,
        "|" + "---|" * (2 + len(backends)),
    ]
    keys = [(r["phase"], r["tokens"]) for r in backends[0]["results"]] if backends else []
    for phase, tokens in keys:
        cells = []
        for b in backends:
            row = next(
                (r for r in b["results"] if (r["phase"], r["tokens"]) == (phase, tokens)), None
            )
            if row is None:
                cells.append("-")
            elif row["status"] != "ok":
                cells.append("wrong")
            else:
                speed = f", {row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else ""
                noisy = " (noisy)" if row["noisy"] else ""
                cells.append(
                    f"{row['p50_ms']:.3g} ({row['p10_ms']:.3g}-{row['p90_ms']:.3g}){speed}{noisy}"
                )
        label = "decode at fill" if phase == "decode" else "prefill"
        lines.append(f"| {label} | {tokens} | " + " | ".join(cells) + " |")
    for b in report["backends"]:
        if not b["available"]:
            lines.append(f"\n- {b['name']}: not run: {b['reason']}")
    decode = [
        (b["name"], r["tokens_per_s"]) for b in backends for r in b["results"]
        if r["phase"] == "decode" and r["status"] == "ok" and r["tokens"] == keys[-1][1]
    ] if keys else []  # fmt: skip
    if decode:
        lines.append("")
        lines.append(
            "decode tokens/s at the fullest cache: "
            + ", ".join(f"{name} {rate:.0f}" for name, rate in decode)
        )
    return "\n".join(lines) + "\n"
