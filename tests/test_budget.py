"""Global budgets (--target-macs / --target-params) and layer-compensated pruning (lcp)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLE_FMNIST, SAMPLE_LENET
from onnxslim_prune.judge import validate
from onnxslim_prune.api import analyze, prune
from onnxslim_prune.errors import UsageError
from onnxslim_prune.judge.evaluation import output_error
from onnxslim_prune.methods.budget import CostModel
from onnxslim_prune.analysis.plan import uniform_plan
from onnxslim_prune.analysis.score import score_groups

TOL = 0.02


def small_model(seed: int = 0) -> onnx.ModelProto:
    """conv 3->16, conv 16->16 + residual Add, grouped conv 16->16 (group 4), conv 16->24, GAP, Gemm."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, name: str, group: int = 1, k: int = 3) -> str:
        w = (rng.standard_normal((cout, cin // group, k, k)) * rng.uniform(0.05, 2.0, (cout, 1, 1, 1))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}_out"], name=name, kernel_shape=[k, k],
            pads=[k // 2] * 4, group=group,
        ))
        nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_r"))
        return f"{name}_relu"

    x = conv("input", 3, 16, "c0")
    h = conv(x, 16, 16, "c1")
    nodes.append(helper.make_node("Add", [x, h], ["res"], name="res"))
    g = conv("res", 16, 16, "g2", group=4)
    y = conv(g, 16, 24, "c3")
    nodes.append(helper.make_node("GlobalAveragePool", [y], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits.extend([
        numpy_helper.from_array((rng.standard_normal((10, 24)) * 0.3).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"),
    ])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def fractions(result) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    before, after = result.report.before, result.report.after
    return after.macs / before.macs, after.params / before.params


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_small_model_macs_target(target: float) -> None:
    result = prune(small_model(), "l1", params={"target_macs": target})
    macs, _ = fractions(result)
    assert abs(macs - target) <= TOL
    groups = {g.index: g for g in result.trace.groups}
    for gp in result.plan.groups:
        size = groups[gp.group].size
        assert gp.kept >= 1
        assert len(gp.pruned) <= math.floor(0.9 * size)
        if groups[gp.group].block > 1:  # grouped conv: the same count from every block
            per = size // groups[gp.group].block
            index = {c: i for i, c in enumerate(groups[gp.group].classes)}
            counts = np.bincount([index[c] // per for c in gp.pruned], minlength=groups[gp.group].block)
            assert len(set(counts.tolist())) == 1


def test_small_model_params_target_and_grouped_constraint_present() -> None:
    result = prune(small_model(), "l1", params={"target_params": 0.5})
    _, params = fractions(result)
    assert abs(params - 0.5) <= TOL
    assert any(g.block == 4 for g in result.trace.groups)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_lenet_macs_and_params_targets(target: float) -> None:
    macs, _ = fractions(prune(SAMPLE_LENET, "l1", params={"target_macs": target}))
    assert abs(macs - target) <= TOL
    _, params = fractions(prune(SAMPLE_LENET, "l2", params={"target_params": target}))
    assert abs(params - target) <= TOL


def test_max_ratio_respected_per_group() -> None:
    result = prune(SAMPLE_LENET, "l1", params={"target_macs": 0.05, "max_ratio": 0.5})
    sizes = {g.index: g.size for g in result.trace.groups}
    assert result.plan.groups
    for gp in result.plan.groups:
        assert len(gp.pruned) <= math.floor(0.5 * sizes[gp.group])
    assert any("not reachable" in n for n in _notes(SAMPLE_LENET, {"target_macs": 0.05, "max_ratio": 0.5}))


def _notes(model, params):  # type: ignore[no-untyped-def]
    from onnxslim_prune.methods.budget import global_plan_with_notes
    from onnxslim_prune.methods.base import Context, Options

    a = analyze(model)
    options = Options(params=params)
    ctx = Context(a.model, a.graph, a.trace, options, a.input_shapes, a.opset)
    return global_plan_with_notes(ctx, score_groups(a.trace, a.graph, "l1"))[1]


def test_round_to_and_determinism() -> None:
    a = prune(small_model(), "l1", round_to=4, params={"target_macs": 0.5})
    b = prune(small_model(), "l1", round_to=4, params={"target_macs": 0.5})
    assert a.plan == b.plan
    assert a.model.SerializeToString() == b.model.SerializeToString()
    for gp in a.plan.groups:
        assert gp.kept % 4 == 0 or gp.kept == gp.size
    assert abs(fractions(a)[0] - 0.5) <= TOL


def test_target_one_prunes_nothing_and_bad_values_raise() -> None:
    result = prune(SAMPLE_LENET, "l1", params={"target_macs": 1.0})
    assert not result.plan.groups
    for params in ({"target_macs": 0.0}, {"target_macs": 1.5}, {"target_params": -0.2},
                   {"target_macs": float("nan")}, {"target_macs": 0.5, "max_ratio": 0.0}):
        with pytest.raises(UsageError):
            prune(SAMPLE_LENET, "l1", params=params)


def test_cost_model_matches_model_stats() -> None:
    for model in (small_model(), onnx.load(str(SAMPLE_LENET))):
        a = analyze(model)
        plan = uniform_plan(a.trace, score_groups(a.trace, a.graph, "l1"), 0.4)
        cost = CostModel.build(a.trace, a.graph)
        from onnxslim_prune.analysis.materialize import materialize

        pruned = validate.model_stats(materialize(a.graph, a.model, a.trace, plan, a.opset), a.input_shapes)
        before = validate.model_stats(a.model, a.input_shapes)
        saved_macs, saved_params = cost.savings(plan)
        assert before.macs - saved_macs == pytest.approx(pruned.macs, rel=1e-9)
        assert before.params - saved_params == pytest.approx(pruned.params, rel=1e-9)


def _error_on_fmnist(model: onnx.ModelProto, reference: list[np.ndarray], x: np.ndarray) -> float:
    return output_error(reference, validate.run(model, {"input": x}))


def test_lcp_meets_target_and_beats_uniform_l1() -> None:
    data = np.load(SAMPLE_FMNIST)
    x = data["input"].astype(np.float32)
    reference = validate.run(onnx.load(str(SAMPLE_LENET)), {"input": x})
    uniform = prune(SAMPLE_LENET, "l1", 0.6)
    target, _ = fractions(uniform)
    result = prune(SAMPLE_LENET, "lcp", 0.6, calib=SAMPLE_FMNIST, params={"target_macs": target, "lcp_iterations": 16, "reconstruct": False})
    macs, _ = fractions(result)
    assert abs(macs - target) <= TOL
    assert _error_on_fmnist(result.model, reference, x) <= _error_on_fmnist(uniform.model, reference, x)
    assert any("lcp: 16 iterations" in n and " s;" in n for n in result.report.notes)


def test_lcp_data_free_deterministic_default_target() -> None:
    a = prune(small_model(), "lcp", 0.5, params={"lcp_iterations": 8})
    b = prune(small_model(), "lcp", 0.5, params={"lcp_iterations": 8})
    assert a.plan == b.plan
    assert abs(fractions(a)[0] - 0.5) <= TOL  # default target: 1 - ratio
    assert any("data-free" in n for n in a.report.notes)
    with pytest.raises(UsageError):
        prune(small_model(), "lcp", 0.5, params={"lcp_iterations": 0})



def test_part_settings_cap_their_groups_under_a_budget() -> None:
    """``--target-macs F --heads 0``: the attention heads stay whole and the FFN meets the target; ``--ffn 0.5``
    caps the FFN at half where the ranking alone would take more."""
    from onnxslim_prune.ops.test_attention import _attention_text
    from onnxslim_prune.ops.testing import initializer, parse, weights

    text = _attention_text().replace("y = MatMul (om, wo)", "a = MatMul (om, wo)\n f = MatMul (a, w1)\n"
                                     " r = Relu (f)\n y = MatMul (r, w2)")
    model = parse(text, wq=weights(8, 8), bq=weights(8, seed=1), wk=weights(8, 8, seed=2), wv=weights(8, 8, seed=3),
                  wo=weights(8, 8, seed=4), w1=weights(8, 32, seed=8), w2=weights(32, 8, seed=9),
                  split=np.array([1, 4, 4, 2]), merge=np.array([1, 4, 8]), scale=np.array(0.7),
                  mask=weights(1, 1, 1, 4, seed=5))
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)

    def macs_kept(result: object) -> float:
        return result.report.after.macs / result.report.before.macs  # type: ignore[attr-defined]

    free = prune(model, "l1", latency=False, params={"target_macs": 0.4})
    assert initializer(free.model, "wq").shape[1] < 8  # without a cap the ranking takes heads too
    capped = prune(model, "l1", latency=False, params={"target_macs": 0.4, "heads": 0.0})
    assert initializer(capped.model, "wq").shape == (8, 8) and initializer(capped.model, "w1").shape[1] < 32
    capped_half = prune(model, "l1", latency=False, params={"target_macs": 0.4, "ffn": 0.5})
    assert initializer(free.model, "w1").shape[1] < 16
    assert initializer(capped_half.model, "w1").shape == (4, 16)  # both FFN groups lose exactly their half
    for result in (free, capped, capped_half):
        assert macs_kept(result) == pytest.approx(0.4, abs=TOL)
        assert validate.run(result.model, {"x": x})[0].shape == (1, 4, 8)
