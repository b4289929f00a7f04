"""Quantized models: QDQ weights (int8 / uint8, per tensor / per channel, opsets 13 and 21), activation
QuantizeLinear / DequantizeLinear pairs, QOperator freeze reasons, compensation re-quantized.

Oracle: zeroed channels quantize to the zero point, so they dequantize to exact zeros and prune
away with the outputs unchanged (float32 tolerance ``rtol = atol = 1e-5``, `quant.output_tolerance`;
onnxruntime runs the same integer sums on fewer channels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .. import api
from ..graph import qdq
from ..graph.qdq import Scheme
from .quant import output_tolerance
from .testing import initializer, weights, zeroed


def _quantize(w: np.ndarray, dtype: type, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric quantization of `w` (per channel along `axis`, or per tensor); zero channels get scale 0.01."""
    info = np.iinfo(dtype)
    middle = 0 if info.min < 0 else 128
    if axis is None:
        bound = np.abs(w).max(keepdims=False)
        scale = np.asarray(bound / 127 if bound > 0 else 0.01, np.float32)
        zero: np.ndarray = np.asarray(middle, dtype)
        q = np.clip(np.rint(w / scale) + middle, info.min, info.max).astype(dtype)
        return q, scale, zero
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    bound = np.abs(moved).max(axis=1)
    scale = np.where(bound > 0, bound / 127, 0.01).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)) + middle, info.min, info.max).astype(dtype)
    return q, scale, np.full(w.shape[axis], middle, dtype)


def _dq_weight(name: str, w: np.ndarray, dtype: type, axis: int | None) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    q, scale, zero = _quantize(w, dtype, axis)
    node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name])
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))
    return node, [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s"),
                  numpy_helper.from_array(zero, f"{name}_z")]


def _qdq_pair(x: str, out: str, dtype: type) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A per-tensor activation QuantizeLinear / DequantizeLinear pair."""
    zero: np.ndarray = np.asarray(0 if np.iinfo(dtype).min < 0 else 128, dtype)
    nodes = [helper.make_node("QuantizeLinear", [x, f"{out}_s", f"{out}_z"], [f"{out}_q"]),
             helper.make_node("DequantizeLinear", [f"{out}_q", f"{out}_s", f"{out}_z"], [out])]
    return nodes, [numpy_helper.from_array(np.asarray(0.05, np.float32), f"{out}_s"), numpy_helper.from_array(zero, f"{out}_z")]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: list[int], y: list[int], opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_conv(dtype: type, opset: int, axis: int | None = 0) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ w1, b1) -> Relu -> Q/DQ -> Conv(DQ w2) -> y; w1's channels 1 and 2 are zero."""
    w1, w2 = zeroed(weights(4, 3, 3, 3), (1, 2)), weights(5, 4, 3, 3, seed=1)
    n1, i1 = _dq_weight("w1", w1, dtype, axis)
    n2, i2 = _dq_weight("w2", w2, dtype, axis)
    p1, j1 = _qdq_pair("x", "xd", dtype)
    p2, j2 = _qdq_pair("r", "rd", dtype)
    nodes = [n1, n2, *p1, helper.make_node("Conv", ["xd", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]), *p2, helper.make_node("Conv", ["rd", "w2"], ["y"], pads=[1, 1, 1, 1])]
    b1 = numpy_helper.from_array(zeroed(weights(4, seed=2), (1, 2)), "b1")
    return _model(nodes, [*i1, *i2, *j1, *j2, b1], [1, 3, 8, 8], [1, 5, 8, 8], opset)


def qdq_dense(dtype: type, opset: int, per_channel: bool = True) -> onnx.ModelProto:
    """x -> Q/DQ -> Gemm(transB, DQ w1 [8, 6] axis 0) -> Relu -> Q/DQ -> MatMul(DQ w2 [8, 3] axis 1) -> y."""
    w1, w2 = zeroed(weights(8, 6), (0, 5, 6)), weights(8, 3, seed=1)
    n1, i1 = _dq_weight("w1", w1, dtype, 0 if per_channel else None)
    n2, i2 = _dq_weight("w2", w2, dtype, 1 if per_channel else None)
    p1, j1 = _qdq_pair("x", "xd", dtype)
    p2, j2 = _qdq_pair("r", "rd", dtype)
    nodes = [n1, n2, *p1, helper.make_node("Gemm", ["xd", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             *p2, helper.make_node("MatMul", ["rd", "w2"], ["y"])]
    return _model(nodes, [*i1, *i2, *j1, *j2], [2, 6], [2, 3], opset)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    import onnxruntime as ort

    # the QDQ semantics (dequantize, then the float op): the fused integer kernels onnxruntime substitutes at its
    # extended level depend on the CPU (on AVX2 without VNNI its u8s8 sums saturate: 1.06 off on a 6-wide Gemm)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same(original: onnx.ModelProto, pruned: onnx.ModelProto, shape: list[int], step: float = 0.0) -> None:
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for a, b in zip(_run(original, feeds), _run(pruned, feeds)):
        rtol, atol = output_tolerance(a.dtype, step)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_per_channel_qdq_conv_prunes_its_zero_channels_exactly(dtype: type, opset: int) -> None:
    model = qdq_conv(dtype, opset)
    result = api.prune(model, "l1", 0.5, latency=False)
    out = _inits(result.model)
    assert out["w1_q"].shape == (2, 3, 3, 3) and out["w1_q"].dtype == dtype
    assert out["w1_s"].shape == (2,) and out["w1_z"].shape == (2,)
    assert out["w2_q"].shape == (5, 2, 3, 3) and out["w2_s"].shape == (5,)  # input channels sliced, scales kept
    assert out["b1"].shape == (2,)
    original = _inits(model)
    np.testing.assert_array_equal(out["w1_q"], original["w1_q"][[0, 3]])  # the kept channels' integers, unchanged
    np.testing.assert_array_equal(out["w2_q"], original["w2_q"][:, [0, 3]])
    np.testing.assert_array_equal(out["w1_s"], original["w1_s"][[0, 3]])
    assert _ops(result.model).count("DequantizeLinear") == _ops(model).count("DequantizeLinear")
    assert result.report.after.params < result.report.before.params
    assert_same(model, result.model, [1, 3, 8, 8])


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_per_channel_qdq_gemm_and_matmul_prune_exactly(dtype: type, opset: int) -> None:
    model = qdq_dense(dtype, opset)
    result = api.prune(model, "l1", 0.375, latency=False)
    out = _inits(result.model)
    assert out["w1_q"].shape == (5, 6) and out["w1_s"].shape == (5,)  # transB [N, K]: N and its scales sliced
    assert out["w2_q"].shape == (5, 3) and out["w2_s"].shape == (3,)  # [K, N] per-channel on N: K sliced, scales kept
    assert_same(model, result.model, [2, 6])


def test_per_tensor_qdq_weights_keep_their_one_scale() -> None:
    model = qdq_dense(np.int8, 13, per_channel=False)
    result = api.prune(model, "l1", 0.375, latency=False)
    out, original = _inits(result.model), _inits(model)
    assert out["w1_q"].shape == (5, 6) and out["w1_s"].shape == ()
    assert out["w1_s"] == original["w1_s"]
    assert_same(model, result.model, [2, 6])


def test_per_tensor_conv_weights_opset21() -> None:
    model = qdq_conv(np.uint8, 21, axis=None)
    result = api.prune(model, "l1", 0.5, latency=False)
    assert _inits(result.model)["w1_q"].shape == (2, 3, 3, 3)
    assert_same(model, result.model, [1, 3, 8, 8])


def test_per_channel_activation_quantization_is_sliced() -> None:
    model = qdq_conv(np.int8, 13)
    for node in model.graph.node:  # make the pair after the Relu per channel
        if len(node.input) > 1 and node.input[1] == "rd_s":
            node.attribute.append(helper.make_attribute("axis", 1))
    for init in model.graph.initializer:
        if init.name == "rd_s":
            init.CopyFrom(numpy_helper.from_array(np.full(4, 0.05, np.float32), "rd_s"))
        if init.name == "rd_z":
            init.CopyFrom(numpy_helper.from_array(np.zeros(4, np.int8), "rd_z"))
    onnx.checker.check_model(model, full_check=True)
    result = api.prune(model, "l1", 0.5, latency=False)
    assert initializer(result.model, "rd_s").shape == (2,) and initializer(result.model, "rd_z").shape == (2,)
    assert_same(model, result.model, [1, 3, 8, 8])


def _ort_quantized(qoperator: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> Conv (channels 0 and 4 of the first zero) quantized by onnxruntime's quantize_static."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    w1, b1 = zeroed(weights(6, 3, 3, 3), (0, 4)), zeroed(weights(6, seed=3), (0, 4))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(v, n) for n, v in
             (("w1", w1), ("b1", b1), ("w2", weights(4, 6, 3, 3, seed=1)), ("b2", weights(4, seed=4)))]
    float_model = _model(nodes, inits, [1, 3, 8, 8], [1, 4, 8, 8], 13)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "f.onnx", Path(folder) / "q.onnx"
        onnx.save(float_model, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return onnx.load(dst)


def test_onnxruntime_quantize_static_model_prunes_with_an_int32_bias() -> None:
    """A model quantized by onnxruntime (QDQ, per-channel int8 weights, int32 biases) prunes its zero channels exactly."""
    model = _ort_quantized()
    result = api.prune(model, "l1", 0.34, latency=False)
    groups = [g for g in result.plan.groups]
    assert groups and sum(g.size - g.kept for g in groups) == 2
    biases = {k: v for k, v in _inits(result.model).items() if v.dtype == np.int32}
    assert biases["b1_quantized"].shape == (4,) and biases["b2_quantized"].shape == (4,)
    assert_same(model, result.model, [1, 3, 8, 8])


def test_onnxruntime_qoperator_model_is_frozen_with_the_reason() -> None:
    model = _ort_quantized(qoperator=True)
    assert "QLinearConv" in _ops(model)
    trace = api.analyze(model).trace
    assert trace.groups and all(g.is_frozen for g in trace.groups)
    assert any("QLinearConv" in r and "QOperator" in r for g in trace.groups for r in g.reasons)
    result = api.prune(model, "l1", 0.5, latency=False)
    assert any("QOperator" in n for n in result.report.notes)
    assert_same(model, result.model, [1, 3, 8, 8])


def test_requantize_keeps_matched_channels_and_refits_changed_ones() -> None:
    w = weights(4, 5)
    q, scale, zero = _quantize(w, np.int8, 0)
    scheme = Scheme(q=q, scale=scale, zero_point=zero, axis=0, symmetric=True, limit=127, names=("q", "s", "z"))
    old = qdq.dequantize(q, scale, zero, 0)
    values, sliced = qdq.requantize(scheme, old, old[[1, 3]][:, [0, 2, 4]])
    np.testing.assert_array_equal(sliced.q, q[[1, 3]][:, [0, 2, 4]])
    np.testing.assert_array_equal(sliced.scale, scale[[1, 3]])
    changed = old.copy()
    changed[2] *= 3.0  # a compensated channel: its scale is recomputed, the others are untouched
    values, refit = qdq.requantize(scheme, old, changed)
    np.testing.assert_array_equal(refit.q[[0, 1, 3]], q[[0, 1, 3]])
    assert refit.scale[2] == pytest.approx(3 * scale[2], rel=1e-6)
    np.testing.assert_allclose(values[2], changed[2], atol=float(refit.scale[2]) / 2 + 1e-7)


def test_blocked_quantization_freezes_with_its_reason() -> None:
    w = weights(4, 8)
    q = np.clip(np.rint(w / 0.02), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1, block_size=4),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.full((4, 2), 0.02, np.float32), "ws"),
             numpy_helper.from_array(weights(8, 2), "w2")]
    model = _model(nodes, inits, [2, 4], [2, 2], 21)
    trace = api.analyze(model).trace
    assert any("block_size=4" in r for g in trace.groups for r in g.reasons)
    result = api.prune(model, "l1", 0.5, latency=False)
    assert "DequantizeLinear" in _ops(result.model)


def test_qoperator_conv_integer_freezes_with_a_reason() -> None:
    w = np.random.default_rng(0).integers(-50, 50, (4, 3, 3, 3)).astype(np.int8)
    w2 = np.random.default_rng(1).integers(-50, 50, (2, 4, 1, 1)).astype(np.int8)
    nodes = [helper.make_node("ConvInteger", ["x", "w"], ["c"]), helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["f"], ["r"]), helper.make_node("Cast", ["r"], ["ri"], to=TensorProto.UINT8),
             helper.make_node("ConvInteger", ["ri", "w2"], ["c2"]), helper.make_node("Cast", ["c2"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "ci", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    trace = api.analyze(model).trace
    assert len(trace.groups) >= 1 and all(g.is_frozen for g in trace.groups)
    assert any("ConvInteger" in r and "QOperator" in r for g in trace.groups for r in g.reasons)
    assert "QOperator" in api.nothing_prunable_reason(trace, model)


def test_report_counts_int8_weights() -> None:
    model = qdq_conv(np.int8, 13)
    result = api.prune(model, "l1", 0.5, latency=False)
    every = sum(v.size for v in _inits(model).values())  # each initializer here is a weight, bias or quantization parameter
    assert result.report.before.params == every
    assert result.report.after.params == sum(v.size for v in _inits(result.model).values())
    assert any("stored quantized again" in n for n in result.report.notes)


def _dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model computing the same: each weight's DequantizeLinear replaced by its float values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = _inits(model)
    keep = []
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            s = inits[node.input[1]]
            per = None if s.ndim == 0 else axis
            value = qdq.dequantize(inits[node.input[0]], s, inits[node.input[2]] if len(node.input) > 2 else None, per)
            out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def test_merge_on_a_qdq_model_requantizes_the_merged_weights() -> None:
    """Neuron Merging computes on the dequantized weights; merged channels get recomputed scales (the note says so)."""
    w1, w2 = weights(6, 3, 3, 3), weights(4, 6, 3, 3, seed=1)
    w1[3] = 0.9 * w1[0]  # a near-duplicate neuron: merged into channel 0
    n1, i1 = _dq_weight("w1", w1, np.int8, 0)
    n2, i2 = _dq_weight("w2", w2, np.int8, 0)
    nodes = [n1, n2, helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    model = _model(nodes, [*i1, *i2], [1, 3, 8, 8], [1, 4, 8, 8], 13)
    quantized = api.prune(model, "merge", 0.34, latency=False)
    floating = api.prune(_dequantized(model), "merge", 0.34, latency=False)
    out = _inits(quantized.model)
    assert out["w2_q"].dtype == np.int8 and out["w2_q"].shape == (4, 4, 3, 3)
    assert not np.isin(out["w2_s"], _inits(model)["w2_s"]).all()  # merged rows: new scales
    assert any("recomputed" in n for n in quantized.report.notes)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    (a,), (b,) = _run(floating.model, feeds), _run(quantized.model, feeds)
    # the re-quantized merged weights differ from the float merge by at most half a step per weight
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()


def test_least_squares_refit_on_a_qdq_model_stays_quantized() -> None:
    """LDRF's refit computes in float on the dequantized weights; the refitted weights are stored quantized again."""
    model = qdq_conv(np.int8, 13)
    result = api.prune(model, "ldrf", 0.5, calib="random", latency=False)
    floating = api.prune(_dequantized(model), "ldrf", 0.5, calib="random", latency=False)
    out = _inits(result.model)
    assert out["w1_q"].dtype == np.int8 and out["w1_q"].shape[0] == 2 and out["w2_q"].dtype == np.int8
    assert _ops(result.model).count("DequantizeLinear") == _ops(model).count("DequantizeLinear")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    (a,), (b,) = _run(floating.model, feeds), _run(result.model, feeds)
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()  # re-quantization: within a step of the float refit


# ----------------------------------------------------------------------------- fp16 and bf16


def half_conv(dtype: Any, *, keep_io: bool, stored: bool = False) -> onnx.ModelProto:
    """Two convs with fp16 / bf16 weights; `keep_io`: float32 graph input/output through Casts; `stored`: weights
    stored in `dtype` and cast to float32 (compute in float32, the form a bf16 model takes on onnxruntime's CPU)."""
    code = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.BFLOAT16
    w1, b1, w2 = zeroed(weights(4, 3, 3, 3), (1, 2)), zeroed(weights(4, seed=2), (1, 2)), weights(5, 4, 3, 3, seed=1)
    inits = [numpy_helper.from_array(v.astype(dtype), n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2))]
    nodes: list[onnx.NodeProto] = []
    names = ["w1", "b1", "w2"]
    if stored:
        nodes += [helper.make_node("Cast", [n], [f"{n}f"], to=TensorProto.FLOAT) for n in names]
        names = [f"{n}f" for n in names]
    x, y = "x", "y"
    if keep_io and not stored:
        nodes.append(helper.make_node("Cast", ["x"], ["xh"], to=code))
        x, y = "xh", "yh"
    nodes += [helper.make_node("Conv", [x, names[0], names[1]], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Conv", ["r", names[2]], [y], pads=[1, 1, 1, 1])]
    if keep_io and not stored:
        nodes.append(helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT))
    io = TensorProto.FLOAT if keep_io or stored else code
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", io, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", io, [1, 5, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("keep_io", [False, True])
def test_fp16_conv_keeps_its_dtype_and_prunes_exactly(keep_io: bool) -> None:
    model = half_conv(np.float16, keep_io=keep_io)
    result = api.prune(model, "l1", 0.5, latency=False)
    out = {t.name: t for t in result.model.graph.initializer}
    assert {t.data_type for t in out.values()} == {TensorProto.FLOAT16}
    assert tuple(out["w1"].dims) == (2, 3, 3, 3) and tuple(out["w2"].dims) == (5, 2, 3, 3)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32 if keep_io else np.float16)
    (a,), (b,) = _run(model, {"x": x}), _run(result.model, {"x": x})
    rtol, atol = output_tolerance(np.dtype(np.float16))
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_weights_stored_in_half_precision_stay_so(dtype: Any) -> None:
    """bf16: onnxruntime's CPU has no bf16 Conv, so the bf16 model is the Cast-wrapped form (bf16 storage, fp32 compute)."""
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    model = half_conv(np_dtype, keep_io=False, stored=True)
    result = api.prune(model, "l1", 0.5, latency=False)
    code = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.BFLOAT16
    out = {t.name: t for t in result.model.graph.initializer}
    assert {t.data_type for t in out.values()} == {code}
    assert tuple(out["w1"].dims) == (2, 3, 3, 3) and tuple(out["w2"].dims) == (5, 2, 3, 3)
    assert _ops(result.model).count("Cast") == 3
    assert result.report.after.file_bytes < result.report.before.file_bytes
    rtol, atol = output_tolerance(np.dtype(np_dtype))
    assert_same(model, result.model, [1, 3, 8, 8])  # float32 compute on the same bf16 / fp16 values: float32 exact
    assert (rtol, atol) >= (1e-2, 1e-2)


def test_an_identity_alias_of_a_folded_weight_is_the_weight() -> None:
    """Exporters alias shared weights through Identity; of a Cast or DequantizeLinear graph-surgeon leaves it unfolded."""
    model = half_conv(np.float16, keep_io=False, stored=True)
    for node in model.graph.node:
        if node.op_type == "Conv" and "b1f" in node.input:
            node.input[2] = "b1alias"
    model.graph.node.insert(3, helper.make_node("Identity", ["b1f"], ["b1alias"]))
    onnx.checker.check_model(model, full_check=True)
    trace = api.analyze(model).trace
    assert not any("not a constant" in r for g in trace.groups for r in g.reasons)
    result = api.prune(model, "l1", 0.5, latency=False)
    assert tuple(next(t for t in result.model.graph.initializer if t.name == "b1").dims) == (2,)
    assert_same(model, result.model, [1, 3, 8, 8])


def _q_of_constant(name: str, value: np.ndarray, scale: float, zero: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``DQ(Q(value))`` of a float constant with a uint8 per-tensor scale: how ``quantize_static`` quantizes an Add's bias."""
    nodes = [helper.make_node("QuantizeLinear", [f"{name}_f", f"{name}_s", f"{name}_z"], [f"{name}_q"]),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name])]
    return nodes, [numpy_helper.from_array(value, f"{name}_f"), numpy_helper.from_array(np.asarray(scale, np.float32), f"{name}_s"),
                   numpy_helper.from_array(np.asarray(zero, np.uint8), f"{name}_z")]


@pytest.mark.parametrize("opset", [13, 21])
def test_a_quantized_constant_bias_of_an_add_prunes_with_its_matmul(opset: int) -> None:
    """MatMul + Add(DQ(Q(b))), a bias quantized like an activation: the Q of a constant folds, the bias is sliced."""
    w1, w2 = zeroed(weights(6, 8), (0, 5, 6), axis=1), weights(8, 3, seed=1)
    b1 = zeroed(weights(8, seed=2), (0, 5, 6))
    n1, i1 = _dq_weight("w1", w1, np.int8, 1)
    n2, i2 = _dq_weight("w2", w2, np.int8, 1)
    nb, ib = _q_of_constant("b1", b1, 0.02, 128)
    p1, j1 = _qdq_pair("x", "xd", np.uint8)
    nodes = [n1, n2, *nb, *p1, helper.make_node("MatMul", ["xd", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = _model(nodes, [*i1, *i2, *ib, *j1], [2, 6], [2, 3], opset)
    assert [g.size for g in api.analyze(model).trace.groups if not g.is_frozen] == [8]  # was frozen: Add's bias not constant
    result = api.prune(model, "l1", 0.375, latency=False)
    out = _inits(result.model)
    assert out["w1_q"].shape == (6, 5) and out["w2_q"].shape == (5, 3)
    bias = next(v for k, v in out.items() if k.startswith("b1") and v.dtype == np.uint8 and v.ndim == 1)
    assert bias.shape == (5,)
    assert "QuantizeLinear" not in [n.op_type for n in result.model.graph.node if n.input[0] == "b1_f"]
    assert_same(model, result.model, [2, 6])  # the stored integers are Q(b) exactly: float32 tolerance


def test_shared_batchnorm_parameters_behind_identity_aliases_prune() -> None:
    """DenseNet in onnxruntime's QDQ form: BN parameters are Identity aliases of other BNs' dequantized ones, a
    gamma is re-quantized (Q of an alias), and an int32 beta has a [1] scale with a scalar zero point."""
    w1, w2, w3 = zeroed(weights(4, 3, 3, 3), (1, 2)), zeroed(weights(4, 4, 1, 1, seed=1), (1, 2)), weights(5, 4, 1, 1, seed=2)
    gamma = np.abs(weights(4, seed=3)) + 0.5
    beta = zeroed(weights(4, seed=4), (1, 2))
    nodes, inits = [], []
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        n, i = _dq_weight(name, w, np.int8, 0)
        nodes.append(n)
        inits += i
    g_q, g_s, g_z = _quantize(gamma, np.uint8, None)
    beta_scale = np.asarray([0.001], np.float32)
    inits += [numpy_helper.from_array(g_q, "g_q"), numpy_helper.from_array(g_s, "g_s"), numpy_helper.from_array(g_z, "g_z"),
              numpy_helper.from_array(np.rint(beta / beta_scale).astype(np.int32), "b_q"), numpy_helper.from_array(beta_scale, "b_s"),
              numpy_helper.from_array(np.asarray(0, np.int32), "b_z"),
              numpy_helper.from_array(np.asarray(0.01, np.float32), "g2_s"), numpy_helper.from_array(np.asarray(0, np.uint8), "g2_z")]
    nodes += [helper.make_node("DequantizeLinear", ["g_q", "g_s", "g_z"], ["gamma"]),
              helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["beta"]),
              helper.make_node("Identity", ["beta"], ["mean"]), helper.make_node("Identity", ["gamma"], ["var"]),
              helper.make_node("Identity", ["gamma"], ["gamma_alias"]),
              helper.make_node("QuantizeLinear", ["gamma_alias", "g2_s", "g2_z"], ["g2_q"]),
              helper.make_node("DequantizeLinear", ["g2_q", "g2_s", "g2_z"], ["gamma2"]),
              helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"]),
              helper.make_node("Relu", ["n1"], ["r1"]), helper.make_node("Conv", ["r1", "w2"], ["c2"]),
              helper.make_node("BatchNormalization", ["c2", "gamma2", "beta", "mean", "var"], ["n2"]),
              helper.make_node("Relu", ["n2"], ["r2"]), helper.make_node("Conv", ["r2", "w3"], ["y"])]
    model = _model(nodes, inits, [1, 3, 8, 8], [1, 5, 8, 8], 13)
    trace = api.analyze(model).trace
    assert not any("not constants" in r for g in trace.groups for r in g.reasons)
    result = api.prune(model, "l1", 0.5, latency=False)
    assert sorted(g.kept for g in result.plan.groups if g.size == 4) == [2, 2]
    shapes = [tuple(numpy_helper.to_array(t).shape) for t in result.model.graph.initializer]
    assert (2, 3, 3, 3) in shapes and (2, 2, 1, 1) in shapes and (5, 2, 1, 1) in shapes
    assert _ops(result.model).count("BatchNormalization") == 2
    assert_same(model, result.model, [1, 3, 8, 8])
