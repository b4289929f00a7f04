"""Neuron Merging oracles: an exactly proportional (positive factor) neuron merges with outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import prune

RNG_SEED = 0
FACTOR = 0.4  # the pruned neuron is FACTOR times its partner, so it has the lower l1 norm


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list[int], y_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _dominant(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Weights whose rows all have a clearly larger l1 norm than FACTOR times any other row."""
    w = rng.standard_normal(shape)
    flat = w.reshape(shape[0], -1)
    flat /= np.abs(flat).sum(axis=1, keepdims=True)
    return flat.reshape(shape) * (1.0 + 0.05 * rng.random((shape[0],) + (1,) * (len(shape) - 1)))


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name or i.name.startswith(name + "__"))


def _assert_merged(model: onnx.ModelProto, x: np.ndarray, ratio: float, shapes: dict[str, tuple[int, ...]]) -> None:
    result = prune(model, method="merge", ratio=ratio)
    for name, shape in shapes.items():
        assert _initializer(result.model, name).shape == shape, name
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), atol=1e-5, rtol=0)
    assert any("1 of 1 removed channels merged" in n for n in result.report.notes), result.report.notes
    plain = prune(model, method="l1", ratio=ratio)  # same selection, no merging: outputs do change
    assert np.max(np.abs(_run(plain.model, x) - _run(model, x))) > 1e-3


def test_gemm_proportional_neuron_merges_exactly() -> None:
    rng = np.random.default_rng(RNG_SEED)
    w1 = _dominant(rng, (6, 8)).T.copy()  # Gemm transB=0: [K, N]
    b1 = rng.standard_normal(6) * 0.1
    w1[:, 4], b1[4] = FACTOR * w1[:, 1], FACTOR * b1[1]
    w2 = rng.standard_normal((6, 3))
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"]),
        ],
        {"w1": w1, "b1": b1, "w2": w2},
        [2, 8],
        [2, 3],
    )
    x = rng.standard_normal((2, 8)).astype(np.float32)
    _assert_merged(model, x, 1 / 6, {"w1": (8, 5), "b1": (5,), "w2": (5, 3)})


def test_conv_proportional_filter_merges_exactly() -> None:
    rng = np.random.default_rng(RNG_SEED + 1)
    w1 = _dominant(rng, (5, 3, 3, 3))
    b1 = rng.standard_normal(5) * 0.1
    w1[2], b1[2] = FACTOR * w1[0], FACTOR * b1[0]
    w2 = rng.standard_normal((4, 5, 3, 3))
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Conv", ["p", "w2"], ["y"]),
        ],
        {"w1": w1, "b1": b1, "w2": w2},
        [1, 3, 8, 8],
        [1, 4, 2, 2],
    )
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    _assert_merged(model, x, 1 / 5, {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)})


def test_conv_unfused_bn_with_negative_gamma_merges_exactly() -> None:
    """The relation holds on BN-folded weights: channel 3 has a negative gamma and a negated filter."""
    rng = np.random.default_rng(RNG_SEED + 2)
    c = 6
    w1 = _dominant(rng, (c, 3, 3, 3))
    gamma = 0.5 + rng.random(c)
    beta = rng.standard_normal(c) * 0.1
    mean = rng.standard_normal(c) * 0.1
    var = 0.5 + rng.random(c)
    eps = 1e-5
    n, m = 3, 1
    gamma[n] = -0.8
    scale = gamma / np.sqrt(var + eps)
    w1[n] = FACTOR * w1[m] * scale[m] / scale[n]  # effective weights: FACTOR times the partner's
    beta[n] = FACTOR * (beta[m] - mean[m] * scale[m]) + mean[n] * scale[n]
    w2 = rng.standard_normal((2, c, 1, 1))
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["h", "g", "b", "mu", "var"], ["bn"], epsilon=eps),
            helper.make_node("Relu", ["bn"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"]),
        ],
        {"w1": w1, "g": gamma, "b": beta, "mu": mean, "var": var, "w2": w2},
        [1, 3, 6, 6],
        [1, 2, 6, 6],
    )
    # the l1 criterion sees the raw filter; make sure it is channel n that is removed
    raw_l1 = np.abs(w1).reshape(c, -1).sum(axis=1)
    assert int(np.argmin(raw_l1)) == n
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    _assert_merged(model, x, 1 / c, {"w1": (c - 1, 3, 3, 3), "g": (c - 1,), "w2": (2, c - 1, 1, 1)})


def test_residual_group_merges_when_every_source_agrees() -> None:
    """stem -> relu -> [conv_a -> relu -> conv_b] + shortcut -> relu -> GAP -> Gemm; channel 2 = FACTOR x channel 0 everywhere."""
    rng = np.random.default_rng(RNG_SEED + 3)
    c = 4
    stem = _dominant(rng, (c, 3, 3, 3))
    stem[2] = FACTOR * stem[0]
    conv_a = rng.standard_normal((3, c, 3, 3)) * 0.3  # 3 channels: a ratio of 1/4 removes none
    conv_b = _dominant(rng, (c, 3, 3, 3))
    conv_b[2] = FACTOR * conv_b[0]
    fc = rng.standard_normal((c, 3))
    model = _model(
        [
            helper.make_node("Conv", ["x", "stem"], ["s"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["s"], ["s_r"]),
            helper.make_node("Conv", ["s_r", "conv_a"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["a_r"]),
            helper.make_node("Conv", ["a_r", "conv_b"], ["b"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["b", "s_r"], ["sum"]),
            helper.make_node("Relu", ["sum"], ["out"]),
            helper.make_node("GlobalAveragePool", ["out"], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc"], ["y"]),
        ],
        {"stem": stem, "conv_a": conv_a, "conv_b": conv_b, "fc": fc},
        [1, 3, 6, 6],
        [1, 3],
    )
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    result = prune(model, method="merge", ratio=1 / c)
    assert _initializer(result.model, "stem").shape == (c - 1, 3, 3, 3)
    assert _initializer(result.model, "conv_b").shape == (c - 1, 3, 3, 3)
    assert _initializer(result.model, "conv_a").shape == (3, c - 1, 3, 3)
    assert _initializer(result.model, "fc").shape == (c - 1, 3)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), atol=1e-5, rtol=0)


def test_non_homogeneous_activation_falls_back_to_plain_pruning() -> None:
    rng = np.random.default_rng(RNG_SEED + 4)
    w1 = _dominant(rng, (6, 8)).T.copy()
    w1[:, 4] = FACTOR * w1[:, 1]
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"]),
            helper.make_node("Sigmoid", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"]),
        ],
        {"w1": w1, "w2": rng.standard_normal((6, 3))},
        [2, 8],
        [2, 3],
    )
    result = prune(model, method="merge", ratio=1 / 6)
    assert any("Sigmoid" in n and "not positively homogeneous" in n for n in result.report.notes)
    assert any("0 of 1 removed channels merged" in n for n in result.report.notes)


@pytest.mark.parametrize("threshold", [0.99])
def test_threshold_blocks_dissimilar_partners(threshold: float) -> None:
    rng = np.random.default_rng(RNG_SEED + 5)
    w1 = _dominant(rng, (6, 8)).T.copy() * np.array([1, 1, 1, 1, 0.3, 1])  # column 4 is weakest, not proportional
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"]),
        ],
        {"w1": w1, "w2": rng.standard_normal((6, 3))},
        [2, 8],
        [2, 3],
    )
    result = prune(model, method="merge", ratio=1 / 6, params={"merge_threshold": threshold})
    assert any("0 of 1 removed channels merged" in n for n in result.report.notes)


@pytest.mark.parametrize("merge_scale", ["norm", "projection"])
def test_merge_scale_of_an_inexact_pair(merge_scale: str) -> None:
    """Neuron 4 = 0.4 * neuron 1 + e with e orthogonal to neuron 1 (weights and bias together).

    Oracle: the kept partner's outgoing row becomes w2[1] + s * w2[4], with the paper's
    s = ||w_4|| / ||w_1|| or the least-squares projection s = <w_4, w_1> / ||w_1||^2 = 0.4.
    """
    rng = np.random.default_rng(RNG_SEED + 7)
    neurons = np.concatenate([_dominant(rng, (6, 8)), rng.standard_normal((6, 1)) * 0.1], axis=1)  # [w | b] rows
    partner = neurons[1]
    e = rng.standard_normal(9)
    e -= (e @ partner) / (partner @ partner) * partner
    e *= 0.2 * np.linalg.norm(partner) / np.linalg.norm(e)
    neurons[4] = FACTOR * partner + e
    w2 = rng.standard_normal((6, 3))
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"]),
        ],
        {"w1": neurons[:, :8].T.copy(), "b1": neurons[:, 8].copy(), "w2": w2},
        [2, 8],
        [2, 3],
    )
    params = {} if merge_scale == "norm" else {"merge_scale": merge_scale}
    result = prune(model, method="merge", ratio=1 / 6, params=params)
    assert any("1 of 1 removed channels merged" in n for n in result.report.notes), result.report.notes
    expected_scale = (
        np.linalg.norm(neurons[4]) / np.linalg.norm(partner) if merge_scale == "norm" else FACTOR
    )
    merged = _initializer(result.model, "w2")
    assert merged.shape == (5, 3)
    np.testing.assert_allclose(merged[1], w2[1] + expected_scale * w2[4], rtol=1e-5, atol=1e-6)


def test_unknown_merge_scale_is_a_usage_error() -> None:
    from onnxslim_prune.errors import UsageError

    rng = np.random.default_rng(RNG_SEED)
    model = _model(
        [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"])],
        {"w1": rng.standard_normal((8, 6)), "w2": rng.standard_normal((6, 3))},
        [2, 8],
        [2, 3],
    )
    with pytest.raises(UsageError, match="merge-scale"):
        prune(model, method="merge", ratio=0.5, params={"merge_scale": "cubic"})


def test_merge_ranks_by_weights_and_bias_by_default_as_the_authors_code() -> None:
    """Hidden neuron 0 has tiny weights (|w|_1 = 0.8) and a large bias (5); neuron 1 has larger weights (|w|_1 = 4)
    and no bias. `l1` removes neuron 0, `l1_bias` (|w|_1 + |b| = 5.8 against 4) removes neuron 1; merge without
    --criterion follows the authors' ranking, and with --criterion l1 the weights alone."""
    from onnxslim_prune import api

    rng = np.random.default_rng(0)
    w1 = np.ones((4, 4), dtype=np.float32)  # [in, hidden]
    w1[:, 0], w1[:, 1] = 0.2, 1.0
    w1[:, 2:] = 3.0
    b1 = np.array([5.0, 0.0, 0.0, 0.0], dtype=np.float32)
    w2 = rng.standard_normal((4, 3)).astype(np.float32)
    model = _model(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"])],
        {"w1": w1, "b1": b1, "w2": w2}, [2, 4], [2, 3])
    removed = {}
    for criterion in (None, "l1", "l1_bias"):
        plan = api.plan_only(model, "merge", 0.25, criterion=criterion).plan
        assert plan is not None and len(plan.groups) == 1
        removed[criterion] = plan.groups[0].pruned
    assert removed["l1"] == (0,) and removed["l1_bias"] == (1,) and removed[None] == (1,)
    result = prune(model, "l1_bias", 0.25)  # also a data-free method of its own
    assert numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "w1")).shape == (4, 3)
