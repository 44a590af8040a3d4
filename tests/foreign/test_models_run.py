"""The foreign models build, run, capture and select slots far from ties.

For every case of `cases.py`:
- two builds under different global seeds give identical weights and outputs (the weights
  come from local generators only) and leave the global RNG untouched;
- the example inputs and `make_inputs(1, 5)`, `(3, 11)` (where the case admits them) run,
  with finite outputs whose leading dims are (batch, tokens);
- `torch.export.export(..., strict=False)` with dynamic batch and tokens succeeds and
  reproduces the model on another shape; for a case whose code pins a dimension the
  dynamic capture is refused (raised, or guarded so other shapes are rejected) and the
  static capture succeeds;
- every `aten.topk` the model runs on its example inputs decides its selection by a real
  gap: no exact tie between the k-th and (k+1)-th value, relative gap > 1e-4 in ≥ 99% of
  rows (or all rows but one), and > 1e-5 in every row.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.export import Dim, export

from ultramem.tests.foreign._topk_probe import topk_gaps
from ultramem.tests.foreign.cases import CAPTURE_PINNED, CASES, CASES_BY_ID, ForeignCase

IDS = [case.id for case in CASES]


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is faster than two fighting over the
    machine's cores (and far faster when another process is busy); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _leaves(out: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _build_under(
    case: ForeignCase, global_seed: int
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Build `case` with the global RNG seeded to `global_seed`; check it is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        built = case.build()
        assert torch.equal(torch.random.get_rng_state(), before), "build consumed the global RNG"
    return built


@functools.cache
def _built(case_id: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    return _build_under(CASES_BY_ID[case_id], global_seed=1)


def _shapes(case: ForeignCase) -> list[tuple[int, int]]:
    """The (batch, tokens) the case's eager forward admits among the ones we try."""
    pin = CAPTURE_PINNED.get(case.id)
    shapes = []
    for b, t in [(1, 5), (3, 11), (3, 16), (1, 16)]:
        if case.max_tokens is not None and t > case.max_tokens:
            continue
        if pin is not None and (pin.batch not in (None, b) or pin.tokens not in (None, t)):
            continue
        shapes.append((b, t))
    return shapes


def _dynamic_shapes(
    case: ForeignCase, example: tuple[torch.Tensor, ...]
) -> tuple[dict[int, Any], ...]:
    batch = Dim("batch", min=1, max=64)
    tokens = Dim("tokens", min=1, max=case.max_tokens or 256)
    return tuple({0: batch, 1: tokens} for _ in example)


def test_registry_is_well_formed() -> None:
    assert len(IDS) == len(set(IDS))
    for case in CASES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", case.id), case.id
        assert case.implementation and case.differs
        assert case.lookalike_part in ("", "selection", "aggregation", "both")
        assert (case.memory_layers == 0) == bool(case.lookalike_part), case.id
    assert set(CAPTURE_PINNED) <= set(IDS)


@pytest.mark.parametrize("case_id", IDS)
def test_deterministic_build(case_id: str) -> None:
    """Two builds under different global seeds: same weights, inputs and outputs."""
    m1, x1 = _built(case_id)  # built under global seed 1
    m2, x2 = _build_under(CASES_BY_ID[case_id], global_seed=2)
    assert not m1.training and not m2.training
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for name in s1:
        assert torch.equal(s1[name], s2[name]), name
    for a, b in zip(x1, x2, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        for a, b in zip(_leaves(m1(*x1)), _leaves(m2(*x2)), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case_id", IDS)
def test_runs_finite(case_id: str) -> None:
    case = CASES_BY_ID[case_id]
    model, example = _built(case_id)
    assert example[0].shape[:2] == (2, 16) or case.id in CAPTURE_PINNED
    runs = [(example, tuple(example[0].shape[:2]))]
    runs += [(case.make_inputs(b, t), (b, t)) for b, t in _shapes(case)]
    with torch.no_grad():
        for inputs, (b, t) in runs:
            outs = _leaves(model(*inputs))
            assert tuple(outs[0].shape[:2]) == (b, t)
            for out in outs:
                if out.is_floating_point():
                    assert torch.isfinite(out).all()
            assert outs[0].float().std() > 1e-3  # not a degenerate (all-zero) read


@pytest.mark.parametrize("case_id", IDS)
def test_export(case_id: str) -> None:
    case = CASES_BY_ID[case_id]
    model, example = _built(case_id)
    pin = CAPTURE_PINNED.get(case_id)
    others = [case.make_inputs(b, t) for b, t in _shapes(case)[:2] if (b, t) != (2, 16)]
    if pin is None:
        program = export(
            model, example, dynamic_shapes=_dynamic_shapes(case, example), strict=False
        )
        exported = program.module()
        with torch.no_grad():
            for inputs in [example, *others]:
                for got, want in zip(
                    _leaves(exported(*inputs)), _leaves(model(*inputs)), strict=True
                ):
                    torch.testing.assert_close(got, want)
        return
    if pin.capture == "raises":
        with pytest.raises(Exception, match=r"[Cc]onstraint|specializ"):
            export(model, example, dynamic_shapes=_dynamic_shapes(case, example), strict=False)
    else:  # "guard": the dynamic export goes through, the program refuses other shapes
        program = export(
            model, example, dynamic_shapes=_dynamic_shapes(case, example), strict=False
        )
        assert others, "a guarded case must admit other eager shapes"
        with torch.no_grad(), pytest.raises(Exception, match=r"[Gg]uard"):
            program.module()(*others[0])
    program = export(model, example, strict=False)
    with torch.no_grad():
        for got, want in zip(
            _leaves(program.module()(*example)), _leaves(model(*example)), strict=True
        ):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case_id", IDS)
def test_topk_selections_are_not_near_ties(case_id: str) -> None:
    case = CASES_BY_ID[case_id]
    model, example = _built(case_id)
    gaps = topk_gaps(model, example, rel=1e-4)
    assert len(gaps) >= 2 * case.memory_layers
    for gap in gaps:
        assert gap.exact_ties == 0, gap
        # one row in a small example may fall under 1e-4; none comes near fp32's
        # reassociation noise (~1e-6), which is what could flip a selection
        assert gap.near_ties <= max(1, 0.01 * gap.rows), gap
        assert gap.min_rel_gap > 1e-5, gap
