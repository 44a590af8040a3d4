"""The ``plugin-kernels`` parity stage: fused ops routed to the bundle's kernels by name.

On CPU the routing, the kernel names and the site records are checked with the op
references standing in for the launcher (each call must name a kernel the bundle holds);
the launch itself is the ``gpu`` test, which has not run on any machine here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ultramem.compiler.capture import parity_inputs
from ultramem.compiler.parity.plugin_kernels import STAGE, plugin_kernels_stage
from ultramem.compiler.parity.selections import site_plan
from ultramem.compiler.parity.stages import run_parity
from ultramem.compiler.pipeline import compile_model
from ultramem.models.builtin import DEFAULT_BUILTIN, load_builtin
from ultramem.plugins.metadata import BundleManifest


@pytest.fixture(scope="module")
def compiled() -> Any:
    return compile_model(load_builtin(DEFAULT_BUILTIN))


def test_fused_ops_are_routed_to_bundled_kernels_by_name(
    compiled: Any, bundle: BundleManifest
) -> None:
    launched: list[str] = []

    def references(op: str, name: str, bound: dict[str, Any]) -> Any:
        bundle.find(name, 90)  # KeyError: the stage would launch a kernel the bundle lacks
        launched.append(name)
        # inside the router's dispatch the op runs its CPU kernel: the reference
        return (torch.ops.ultramem.retrieve if op == "retrieve" else torch.ops.ultramem.aggregate)(
            **bound
        )

    stage = plugin_kernels_stage(compiled.rewrite.program, bundle.root, runner=references)
    inputs = parity_inputs(compiled.loaded.example_inputs, compiled.capture)
    stage.plan = site_plan(compiled.rewrite.program.graph)
    report = run_parity(compiled.loaded.model, [stage], inputs, compiled.rewrite.plan)
    (result,) = report.stages
    assert result.stage == STAGE and result.passed, report.summary_lines()
    assert result.selections and all(s.differing == 0 for s in result.selections)
    assert sorted(set(launched)) == sorted(
        m.name for m in bundle.kernels if m.sm == 90 and "fp32" in m.name and "_h2_" in m.name
    )
    assert len(launched) == 2 * len(inputs)  # one retrieve and one aggregate per run


def test_without_a_gpu_the_stage_says_why(compiled: Any, bundle: BundleManifest) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the stage runs")
    stage = plugin_kernels_stage(compiled.rewrite.program, bundle.root)
    assert stage.run is None and "CUDA" in stage.reason


@pytest.mark.gpu
def test_bundled_kernels_match_the_reference_on_the_gpu(
    compiled: Any, bundle: BundleManifest
) -> None:
    stage = plugin_kernels_stage(compiled.rewrite.program, bundle.root)
    inputs = parity_inputs(compiled.loaded.example_inputs, compiled.capture)
    stage.plan = site_plan(compiled.rewrite.program.graph)
    report = run_parity(compiled.loaded.model, [stage], inputs, compiled.rewrite.plan)
    (result,) = report.stages
    assert result.executed and result.passed, report.summary_lines()
    assert all(s.differing == 0 for s in result.selections)
