"""The ``ultramem`` ONNX domain: function bodies against the PyTorch references, and the
custom-domain export of fused models (checker, stock ONNX Runtime, node counts, portable form).

Single-node models run the bodies in stock ONNX Runtime (CPU): with small-integer inputs
every sum is exact, so slots must be identical and ties must break as the reference's do;
with random inputs slots must still be identical (fixed seeds) and outputs within the
tolerance of their dtype. Nothing here needs a GPU.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from ultramem.compiler.capture import capture
from ultramem.compiler.onnx.domain import attach_functions, register_schemas
from ultramem.compiler.onnx.export import count_nodes, export_onnx
from ultramem.compiler.parity.selections import (
    inlined,
    layer_selections,
    run_recording_sites,
    site_plan,
)
from ultramem.compiler.parity.stages import run_parity
from ultramem.compiler.rewrite import rewrite
from ultramem.compiler.runners.onnxruntime import onnx_stage
from ultramem.kernels import (
    AGGREGATE,
    DOMAIN,
    DOMAIN_VERSION,
    RETRIEVE,
    aggregate_reference,
    retrieve_reference,
)
from ultramem.models.config import LMConfig, UltraMemConfig
from ultramem.models.lm import UltraMemLM
from ultramem.tests.kernels import test_aggregate as agg_cases
from ultramem.tests.kernels import test_retrieve as ret_cases
from ultramem.tests.kernels.compare import assert_close

OPSETS = [helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


def _run_single_node(
    op_type: str,
    inputs: dict[str, torch.Tensor | None],
    outputs: dict[str, tuple[torch.dtype, int]],
    **attrs: object,
) -> list[np.ndarray]:
    """One ``ultramem`` node with its function attached, checked, run in stock ORT."""
    register_schemas()
    given = {name: x for name, x in inputs.items() if x is not None}
    node = helper.make_node(
        op_type,
        [n if inputs[n] is not None else "" for n in inputs],
        outputs,
        domain=DOMAIN,
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "single",
        [
            helper.make_tensor_value_info(name, _elem_type(x.dtype), list(x.shape))
            for name, x in given.items()
        ],
        [
            helper.make_tensor_value_info(name, _elem_type(dtype), [None] * rank)
            for name, (dtype, rank) in outputs.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=OPSETS)
    assert attach_functions(model) == 1 and len(model.functions) == 1
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x.numpy() for name, x in given.items()})


def _elem_type(dtype: torch.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def _retrieve_onnx(inputs: list[torch.Tensor], topm: int, topk: int, activation: str) -> tuple:
    scores, slots = _run_single_node(
        "Retrieve",
        dict(zip(RETRIEVE.input_names, inputs, strict=True)),
        {"scores": (inputs[0].dtype, 4), "slots": (torch.int64, 3)},
        topm=topm,
        topk=topk,
        activation=activation,
    )
    return torch.from_numpy(scores), torch.from_numpy(slots)


@pytest.mark.parametrize("integer", [False, True], ids=["randn", "integer-ties"])
@pytest.mark.parametrize("case", ret_cases.CASES)
def test_retrieve_body_selects_what_the_reference_selects(
    case: ret_cases.Case, integer: bool
) -> None:
    inputs = [x.cpu() for x in case.inputs(integer=integer)]
    topm, topk, activation = case.attributes
    if integer:
        ret_cases.duplicate_keys(inputs[0], inputs[1])
    want_scores, want_slots = retrieve_reference(*inputs, topm, topk, activation)
    scores, slots = _retrieve_onnx(inputs, topm, topk, activation)
    ret_cases.assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-5, rtol=1e-5)


def test_retrieve_body_in_half_precision() -> None:
    inputs = [x.cpu() for x in ret_cases.make_inputs(5, 2, 33, 3, 2, dtype=torch.float16)]
    want_scores, want_slots = retrieve_reference(*inputs, 7, 9, "softmax")
    scores, slots = _retrieve_onnx(inputs, 7, 9, "softmax")
    assert scores.dtype == torch.float16
    ret_cases.assert_slots_equal(slots, want_slots)
    assert_close("scores", scores, want_scores, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("case", agg_cases.CASES)
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_aggregate_body_pools_what_the_reference_pools(
    case: agg_cases.Case, dtype: torch.dtype, atol: float
) -> None:
    args = agg_cases.cpu(case.inputs(dtype=dtype))
    groups, pooling = case.attributes
    want = aggregate_reference(*args, groups, pooling)
    (pooled,) = _run_single_node(
        "Aggregate",
        dict(zip(AGGREGATE.input_names, args, strict=True)),
        {"pooled": (dtype, 3)},
        groups=groups,
        pooling=pooling,
    )
    got = torch.from_numpy(pooled)
    assert got.dtype == dtype
    assert_close("pooled", got, want, atol=atol, rtol=atol)


def test_one_function_per_attribute_set_each_of_its_own_name() -> None:
    register_schemas()
    names = ["rs", "cs", "rw", "cw", "c"]
    nodes = [
        helper.make_node("Retrieve", names, [f"s{i}", f"i{i}"], domain=DOMAIN, **attrs)
        for i, attrs in enumerate(
            [
                {"topm": 4, "topk": 4, "activation": "relu"},
                {"topm": 4, "topk": 4, "activation": "relu"},
                {"topm": 4, "topk": 8, "activation": "relu"},
            ]
        )
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    model = helper.make_model(graph, opset_imports=OPSETS)
    assert attach_functions(model) == 3
    variants = [
        "Retrieve_topm4_topk4_relu",
        "Retrieve_topm4_topk4_relu",
        "Retrieve_topm4_topk8_relu",
    ]
    assert [n.op_type for n in model.graph.node] == variants
    assert sorted(f.name for f in model.functions) == variants[1:]
    # the name alone tells variants apart: graph tools drop ONNX's ``overload`` field
    assert not any(n.overload for n in model.graph.node)
    assert not any(f.overload for f in model.functions)


# ---- export of fused models -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_layer_exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-memory-layer LM (softmax scores, E = 4, 2 cores), exported unfused, custom, portable."""
    torch.manual_seed(0)
    cfg = LMConfig(
        memory=UltraMemConfig(heads=2, cores=2, expansion=4, score_activation="softmax"),
        memory_layers=dict.fromkeys(range(2), 1),
        max_seq_len=64,
    )
    model = UltraMemLM(cfg).eval()
    example = (torch.randint(0, 64, (2, 16)),)
    cap = capture(model, example, max_tokens=64)
    rewritten = rewrite(model, cap, example)
    assert len(rewritten.fused_layers) == 2
    directory = tmp_path_factory.mktemp("onnx_ops")
    paths = {}
    for form, program in (
        ("unfused", None),
        ("custom", rewritten.program),
        ("portable", rewritten.program),
    ):
        paths[form] = directory / f"{form}.onnx"
        export_onnx(
            cap, paths[form], program=program, form="portable" if form == "portable" else "custom"
        )
    plans = {"unfused": site_plan(cap.program.graph), "custom": site_plan(rewritten.program.graph)}
    plans["portable"] = inlined(plans["custom"])  # each retrieve's body: three TopK nodes
    return {"model": model, "paths": paths, "plan": rewritten.plan, "plans": plans}


def test_custom_domain_export_is_valid_and_smaller(two_layer_exports: dict) -> None:
    paths = two_layer_exports["paths"]
    custom = onnx.load(str(paths["custom"]))
    onnx.checker.check_model(custom, full_check=True)
    counts = count_nodes(custom)
    assert counts[f"{DOMAIN}::Retrieve"] == counts[f"{DOMAIN}::Aggregate"] == 2
    assert not {"TopK", "ScatterElements", "GatherElements"} & set(counts)
    assert {f.name for f in custom.functions} == {
        "Retrieve_topm8_topk8_softmax",
        "Aggregate_groups4_add_row_map_group_map",
    }
    unfused = onnx.load(str(paths["unfused"]))
    assert len(custom.graph.node) < len(unfused.graph.node)
    inferred = onnx.shape_inference.infer_shapes(custom, strict_mode=True)
    (inp,), (out,) = inferred.graph.input, inferred.graph.output
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "tokens"]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim][:2] == [
        "batch",
        "tokens",
    ]


def test_portable_form_has_no_functions_and_no_custom_nodes(two_layer_exports: dict) -> None:
    portable = onnx.load(str(two_layer_exports["paths"]["portable"]))
    onnx.checker.check_model(portable, full_check=True)
    assert not portable.functions
    assert all(n.domain in ("", "ai.onnx") for n in portable.graph.node)
    assert DOMAIN not in {o.domain for o in portable.opset_import}
    assert count_nodes(portable)["TopK"] == 6  # row, column, grid per layer


@pytest.mark.parametrize("form", ["unfused", "custom", "portable"])
def test_every_form_runs_in_stock_onnxruntime_with_parity(
    two_layer_exports: dict, form: str
) -> None:
    model, plan = two_layer_exports["model"], two_layer_exports["plan"]
    inputs = [(torch.randint(0, 64, (1, 7)),), (torch.randint(0, 64, (3, 29)),)]
    stage = onnx_stage(two_layer_exports["paths"][form])
    stage.plan = two_layer_exports["plans"][form]
    report = run_parity(model, [stage], inputs, plan)
    (result,) = report.stages
    assert result.passed, report.summary_lines()
    assert len(result.selections) == 2 * len(inputs)  # both layers' sites were probed
    assert all(s.differing == 0 for s in result.selections)
    assert max(o.max_abs for o in result.outputs) <= 1e-5


def test_probed_custom_nodes_give_the_reference_slots(two_layer_exports: dict) -> None:
    model = two_layer_exports["model"]
    tokens = (torch.randint(0, 64, (2, 11)),)
    _, ref_records = run_recording_sites(model, tokens)
    stage = onnx_stage(two_layer_exports["paths"]["custom"])
    _, records = stage.run(tokens, ref_records)
    plans = two_layer_exports["plans"]
    ref = layer_selections(ref_records, two_layer_exports["plan"])
    got = layer_selections(records, plans["custom"])
    assert not isinstance(ref, str) and not isinstance(got, str)
    assert len(ref) == len(got) == 2
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r.slots.sort(-1).values, g.slots.sort(-1).values)
