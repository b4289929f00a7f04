"""Nodes that share one weight tensor are pruned alike, so the weight stays shared.

Oracle: dead channels (zero filters after a ReLU) prune away with outputs unchanged (1e-5),
every shared weight is still ONE initializer feeding all its users, and the parameter count
falls; the budget's parameter figure is the report's.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models as M
from onnxslim_prune import analyze, prune

TOL = 1e-5


def siamese(dilations_b: list[int] | None = None, alias_through_identity: bool = False) -> onnx.ModelProto:
    """x -> conv0 -> Relu -> {convA, convB} (one weight w) -> Relu -> {headA, headB} (one weight wh) -> Add.

    `alias_through_identity`: convB reads w through an Identity, as exporters alias a
    deduplicated weight; `dilations_b`: convB's own (channel-neutral) attribute.
    """
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w0[[0, 1]] = 0  # dead channels of conv0's group
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    w[[2, 4]] = 0  # dead channels of the shared group
    wh = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    extra = {"dilations": dilations_b} if dilations_b else {}
    w_b = "w_alias" if alias_through_identity else "w"
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu0"),
        helper.make_node("Conv", ["r", "w"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r", w_b], ["b"], name="convB", pads=[1, 1, 1, 1], **extra),
        helper.make_node("Relu", ["a"], ["ra"], name="reluA"),
        helper.make_node("Relu", ["b"], ["rb"], name="reluB"),
        helper.make_node("Conv", ["ra", "wh"], ["ya"], name="headA"),
        helper.make_node("Conv", ["rb", "wh"], ["yb"], name="headB"),
        helper.make_node("Add", ["ya", "yb"], ["y"], name="add"),
    ]
    if alias_through_identity:
        nodes.insert(0, helper.make_node("Identity", ["w"], ["w_alias"], name="alias"))
    graph = helper.make_graph(
        nodes, "siamese",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in {"w0": w0, "w": w, "wh": wh}.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def shared_gemm(trans_b_second: int) -> onnx.ModelProto:
    """x -> fc0 -> Relu -> {fcA, fcB} with one square weight; fcB may read it transposed."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h"], name="fc0", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu0"),
        helper.make_node("Gemm", ["r", "w"], ["a"], name="fcA", transB=1),
        helper.make_node("Gemm", ["r", "w"], ["b"], name="fcB", transB=trans_b_second),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["rs"], name="relu1"),
        helper.make_node("Gemm", ["rs", "w2"], ["y"], name="fc2", transB=1),
    ]
    inits = {"w0": rng.standard_normal((6, 5)), "w": rng.standard_normal((6, 6)), "w2": rng.standard_normal((3, 6))}
    graph = helper.make_graph(
        nodes, "shared_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_close(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """Outputs equal within `TOL` relative to their largest magnitude: the siamese outputs reach 150, where float32
    rounding of a conv with fewer channels (another kernel path on another CPU) is 2e-5."""
    scale = max(float(np.abs(y).max()) for y in M.run(original, M.inputs_for(original, 0)))
    assert M.max_abs_diff(original, pruned) <= TOL * max(1.0, scale)


def weight_of(model: onnx.ModelProto, node: str) -> str:
    return next(n.input[1] for n in model.graph.node if n.name == node)


def test_shared_weight_users_form_one_group() -> None:
    trace = analyze(siamese()).trace
    groups = {m.node: g.index for g in trace.groups for m in g.members if m.role == "out"}
    assert groups["convA"] == groups["convB"]


def test_shared_weights_prune_alike_and_stay_shared() -> None:
    model = siamese()
    result = prune(model, "l1", 0.25)
    pruned = result.model
    inits = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert weight_of(pruned, "convA") == weight_of(pruned, "convB")
    assert weight_of(pruned, "headA") == weight_of(pruned, "headB")
    assert inits[weight_of(pruned, "convA")] == (5, 6, 3, 3)  # 1 of 6 dead filters out, 2 of 8 inputs out
    assert inits[weight_of(pruned, "headA")] == (4, 5, 1, 1)
    assert len(inits) == 3
    assert result.report.after.params < result.report.before.params
    assert_close(model, pruned)


def test_budget_counts_a_shared_weight_once() -> None:
    model = siamese()
    result = prune(model, "l1", 0.5, params={"target_macs": 0.6})
    params_kept = result.report.after.params / result.report.before.params
    assert params_kept < 1.0
    note = next(n for n in result.report.notes if n.startswith("global budget"))
    assert f"params {params_kept:.3f}" in note, (note, params_kept)
    assert weight_of(result.model, "convA") == weight_of(result.model, "convB")


@pytest.mark.parametrize("method", ["merge", "fpgm"])
def test_other_methods_keep_the_weight_shared(method: str) -> None:
    result = prune(siamese(), method, 0.25)
    assert weight_of(result.model, "convA") == weight_of(result.model, "convB")


@pytest.mark.parametrize("variant", ["identity_alias", "different_dilations"])
def test_aliases_and_channel_neutral_attributes_still_share(variant: str) -> None:
    model = siamese(alias_through_identity=variant == "identity_alias", dilations_b=[1, 1] if variant != "identity_alias" else None)
    result = prune(model, "l1", 0.25)
    assert weight_of(result.model, "convA") == weight_of(result.model, "convB")
    assert {tuple(i.dims) for i in result.model.graph.initializer if i.name == weight_of(result.model, "convA")} == {(5, 6, 3, 3)}
    assert_close(model, result.model)


def test_users_that_cannot_be_pruned_alike_are_frozen_with_the_reason() -> None:
    model = shared_gemm(trans_b_second=0)  # one square weight read as W and as W^T: rows are not columns
    trace = analyze(model).trace
    group = next(g for g in trace.groups if any(m.node == "fcA" and m.role == "out" for m in g.members))
    assert group.is_frozen and any("share weight w" in r for r in group.reasons), group.reasons
    result = prune(model, "l1", 0.5)
    assert weight_of(result.model, "fcA") == weight_of(result.model, "fcB")
    assert next(tuple(i.dims) for i in result.model.graph.initializer if i.name == weight_of(result.model, "fcA")) == (6, 6)
    assert M.max_abs_diff(model, result.model) == 0  # the users' inputs (fc0's channels) are held too
    assert any("share weight w" in n for n in result.report.notes)


def test_shared_gemm_read_alike_prunes() -> None:
    result = prune(shared_gemm(trans_b_second=1), "l1", 0.5)
    assert weight_of(result.model, "fcA") == weight_of(result.model, "fcB")
    assert next(tuple(i.dims) for i in result.model.graph.initializer if i.name == weight_of(result.model, "fcA")) == (3, 3)


def separate_copies(change_unsampled: bool) -> onnx.ModelProto:
    """`siamese` with convB reading its own copy of w (as folding leaves an alias); `change_unsampled` makes one
    element of the copy differ, at a position the sampled key of `EqualValues` (8 elements) does not read."""
    model = siamese()
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).copy()
    if change_unsampled:
        w[0, 3, 0, 1] += 1.0  # a kept weight; of 432 elements every 54th is sampled (270 and 33rd after pruning)
    model.graph.initializer.append(numpy_helper.from_array(w, "w_copy"))
    next(n for n in model.graph.node if n.name == "convB").input[1] = "w_copy"
    return model


@pytest.mark.parametrize("change_unsampled", [False, True])
def test_equal_copies_are_shared_and_a_copy_differing_outside_the_sample_is_not(
    change_unsampled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxslim_prune.graph.read import EqualValues

    monkeypatch.setattr(EqualValues, "SAMPLE", 8)  # the key reads 8 of the weight's 432 elements
    model = separate_copies(change_unsampled)
    nodes = {n.name: n for n in analyze(model).graph.nodes}
    assert (nodes["convA"].inputs[1] is nodes["convB"].inputs[1]) is not change_unsampled  # one constant object
    result = prune(model, "l1", 0.25)
    assert (weight_of(result.model, "convA") == weight_of(result.model, "convB")) is not change_unsampled
    assert_close(model, result.model)


def test_equal_values_compares_bytes() -> None:
    from onnxslim_prune.graph.read import EqualValues

    first: EqualValues[str] = EqualValues()
    zeros = np.zeros((3, 4), np.float32)
    assert first.first("a", zeros) == "a"
    assert first.first("b", zeros.copy()) == "a"  # equal bytes: the first one given
    assert first.first("c", -zeros) == "c"  # -0.0 equals 0.0 but not bit for bit (as the digest saw it)
    assert first.first("d", zeros.astype(np.float64)) == "d"  # same values, another dtype
    assert first.first("e", zeros.T.copy()) == "e"  # same bytes, another shape
    assert first.first("f", -zeros, reload=lambda: -zeros) == "c"
