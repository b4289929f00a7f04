"""Tests for onnxslim_prune.calib: sources, collection, streaming statistics and cache."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune.calib import (
    CalibrationSet,
    ChannelMoments,
    GramAccumulator,
    InputSpec,
    Preprocess,
    cache_path,
    cached,
    conv_output_size,
    conv_patches,
    expose_tensors,
    exposed_session,
    input_specs,
    linear_rows,
    load_calibration,
    model_digest,
    output_rows,
    parse_input_shape,
    resolve_cache_dir,
    sample_positions,
    stream_tensors,
)
from onnxslim_prune.errors import CalibrationError, ModelError, UsageError

OPSET = [helper.make_opsetid("", 17)]


# ----------------------------------------------------------------------------- model helpers


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:  # type: ignore[assignment]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_relu_gemm(batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(4, 3x3, s1, p1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(2)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"]),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["pool_out"]),
        helper.make_node("Flatten", ["pool_out"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])
    return make_model(nodes, [x], [y], inits)


def single_conv(weight: np.ndarray, bias: np.ndarray, **attrs: Any) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)]
    spatial = ["S"] * (weight.ndim - 2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K", *spatial])
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    return make_model(nodes, [x], [y], inits)


def two_input_model() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 2])
    return make_model([helper.make_node("Add", ["a", "b"], ["s"])], [a, b], [s])


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def spec(name: str, shape: tuple[int, ...], dtype: Any = np.float32, dynamic: tuple[int, ...] = (0,)) -> InputSpec:
    return InputSpec(name, shape, np.dtype(dtype), dynamic)


def collect(calib: CalibrationSet, batch_size: int) -> dict[str, np.ndarray]:
    batches = list(calib.iter_batches(batch_size))
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


# ----------------------------------------------------------------------------- ChannelMoments


def numpy_moments(x: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    xd = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    return {
        "mean": xd.mean(0), "mean_abs": np.abs(xd).mean(0),
        "sq_mean": (xd**2).mean(0), "apoz": (xd <= 0).mean(0),
    }


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((30, 5), 1), ((30, 4, 7), 1), ((30, 4, 5, 6), 1), ((30, 5, 6, 4), -1), ((30, 5, 6, 4), 3)],
)
def test_channel_moments_match_numpy_for_any_batch_size(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    x = np.maximum(x, 0) if axis == 1 else x  # exercise exact zeros (ReLU output)
    x[:, ..., 0] = 0  # a channel / position that is always zero
    expected = numpy_moments(x, axis)
    for batch in (1, 7, 30):
        moments = ChannelMoments(axis)
        for start in range(0, shape[0], batch):
            moments.update(x[start : start + batch])
        assert moments.count == x.size // x.shape[axis]
        for name, value in expected.items():
            np.testing.assert_allclose(getattr(moments, name), value, rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(moments.var, x.astype(np.float64).var(axis=tuple(
            i for i in range(x.ndim) if i != axis % x.ndim)), atol=1e-10)


def test_channel_moments_state_roundtrip_and_errors() -> None:
    moments = ChannelMoments(1)
    with pytest.raises(ValueError):
        _ = moments.mean
    moments.update(np.arange(12, dtype=np.float32).reshape(3, 4) - 5)
    restored = ChannelMoments.from_state(moments.state())
    np.testing.assert_array_equal(restored.apoz, moments.apoz)
    np.testing.assert_array_equal(restored.apoz, [2 / 3, 2 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="channel count"):
        moments.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="out of range"):
        moments.update(np.zeros(4))


# ----------------------------------------------------------------------------- GramAccumulator


def test_gram_recovers_known_weights_and_batches_match() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6))
    w = rng.standard_normal((6, 3))
    y = x @ w
    whole, batched = GramAccumulator(6, 3), GramAccumulator(6, 3)
    whole.update(x, y)
    for start in range(0, 500, 37):
        batched.update(x[start : start + 37], y[start : start + 37])
    np.testing.assert_allclose(batched.solve_ridge(0.0), w, rtol=0, atol=1e-8)
    np.testing.assert_allclose(whole.solve_ridge(0.0), w, rtol=0, atol=1e-8)
    for attr in ("xtx", "xty", "yty", "sum_x", "sum_y"):
        np.testing.assert_allclose(getattr(batched, attr), getattr(whole, attr), rtol=1e-12, atol=1e-9)
    assert batched.count == whole.count == 500
    np.testing.assert_allclose(whole.mean_x, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(whole.sse(w), 0.0, atol=1e-8)


def test_gram_ridge_keep_and_sse_match_closed_form() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((200, 5)), rng.standard_normal((200, 2))
    acc = GramAccumulator(5, 2, full_yty=True)
    acc.update(x, y)
    keep = [0, 2, 4]
    xs = x[:, keep]
    expected = np.linalg.solve(xs.T @ xs + 0.1 * 200 * np.eye(3), xs.T @ y)
    got = acc.solve_ridge(0.1, keep=keep)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    np.testing.assert_allclose(acc.sse(got, keep), ((xs @ got - y) ** 2).sum(0), rtol=1e-9)
    assert acc.yty is not None
    np.testing.assert_allclose(acc.yty, y.T @ y, atol=1e-9)


def test_gram_singular_falls_back_to_lstsq() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3))
    x = np.concatenate([x, x[:, :1]], axis=1)  # duplicated column: XtX is singular
    y = x @ np.array([[1.0], [2.0], [3.0], [4.0]])
    acc = GramAccumulator(4, 1)
    acc.update(x, y)
    w = acc.solve_ridge(0.0)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(x @ w, y, atol=1e-8)


# ----------------------------------------------------------------------------- conv patches


@pytest.mark.parametrize(
    ("kernel", "attrs", "group"),
    [
        (3, {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1]}, 1),
        (1, {}, 1),
        (1, {"strides": [2, 2]}, 1),
        (3, {"strides": [1, 2], "pads": [0, 2, 1, 0], "dilations": [2, 1]}, 1),
        (3, {"strides": [2, 2], "pads": [1, 1, 1, 1], "group": 2}, 2),
    ],
)
def test_conv_patches_match_onnxruntime(kernel: int, attrs: dict[str, Any], group: int) -> None:
    rng = np.random.default_rng(5)
    cin, cout = 4, 6
    x = rng.standard_normal((2, cin, 9, 10)).astype(np.float32)
    weight = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    (y,) = run(single_conv(weight, bias, **attrs), {"x": x})
    geometry = dict(
        kernel=(kernel, kernel), strides=attrs.get("strides", [1, 1]),
        pads=attrs.get("pads", [0, 0, 0, 0]), dilations=attrs.get("dilations", [1, 1]),
    )
    ho, wo = conv_output_size(x.shape[2:], **geometry)
    assert y.shape[2:] == (ho, wo)
    cin_g, cout_g = cin // group, cout // group
    for positions in (None, sample_positions(2, ho * wo, 7, np.random.default_rng(0))):
        for g in range(group):
            patches = conv_patches(x, **geometry, group_slice=slice(g * cin_g, (g + 1) * cin_g), positions=positions)
            w_g = weight[g * cout_g : (g + 1) * cout_g].reshape(cout_g, -1)
            expected = output_rows(y[:, g * cout_g : (g + 1) * cout_g], positions)
            assert patches.shape == (expected.shape[0], cin_g * kernel * kernel)
            np.testing.assert_allclose(patches @ w_g.T + bias[g * cout_g : (g + 1) * cout_g], expected, atol=1e-4)


def test_conv_patches_sampling_is_seeded_and_pointwise_is_a_view() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    idx = sample_positions(3, 25, 6, np.random.default_rng(42))
    assert idx.shape == (3, 6) and np.all(np.diff(idx, axis=1) > 0)
    np.testing.assert_array_equal(idx, sample_positions(3, 25, 6, np.random.default_rng(42)))
    by_int = conv_patches(x, (3, 3), pads=(1, 1, 1, 1), positions=6, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(by_int, conv_patches(x, (3, 3), pads=(1, 1, 1, 1), positions=idx))
    assert conv_patches(x, (3, 3), pads=(1, 1, 1, 1), positions=100).shape == (75, 36)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    rows = linear_rows(nhwc)
    assert np.shares_memory(rows, nhwc) and rows.shape == (75, 4)
    np.testing.assert_array_equal(conv_patches(x, (1, 1)), rows)
    with pytest.raises(ValueError, match="positions"):
        conv_patches(x, (3, 3), positions=np.zeros((2, 4), np.int64))


def test_conv_patches_1d_conv() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 11)).astype(np.float32)
    weight = rng.standard_normal((5, 3, 3)).astype(np.float32)
    bias = np.zeros(5, np.float32)
    (y,) = run(single_conv(weight, bias, strides=[2], pads=[1, 0]), {"x": x})
    patches = conv_patches(x, (3,), strides=(2,), pads=(1, 0), dilations=(1,))
    np.testing.assert_allclose(patches @ weight.reshape(5, -1).T, output_rows(y), atol=1e-4)


# ----------------------------------------------------------------------------- collection


def test_expose_tensors_keeps_outputs_and_types() -> None:
    model = conv_relu_gemm()
    exposed = expose_tensors(model, ["relu_out", "logits", "relu_out"])
    names = [o.name for o in exposed.graph.output]
    assert names == ["logits", "relu_out"]
    assert exposed.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == ["logits"]  # the original is untouched
    with pytest.raises(ModelError, match="nope"):
        expose_tensors(model, ["nope"])


def test_exposed_session_returns_the_added_tensors_and_leaves_the_model_alone() -> None:
    model = conv_relu_gemm()
    before = model.SerializeToString()
    sess = exposed_session(model, ["relu_out", "logits", "relu_out"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "relu_out"]
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    logits, relu = sess.run(None, {"x": x})
    plain = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(logits, plain)
    assert relu.shape[0] == 2 and relu.min() >= 0.0 and not np.all(relu == 0)
    assert model.SerializeToString() == before  # the outputs went on a weightless copy
    with pytest.raises(ModelError, match="nope"):
        exposed_session(model, ["nope"])


def test_stream_tensors_matches_direct_run_and_reports_progress(tmp_path: Path) -> None:
    model = conv_relu_gemm()
    x = np.random.default_rng(8).standard_normal((10, 3, 8, 8))
    np.savez(tmp_path / "calib.npz", x=x)
    calib = load_calibration(tmp_path / "calib.npz", input_specs(model))
    calls: list[tuple[int, int]] = []
    batches = list(stream_tensors(model, calib, ["relu_out", "x"], batch_size=4,
                                  progress=lambda done, total: calls.append((done, total))))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [b["relu_out"].shape[0] for b in batches] == [4, 4, 2]
    assert all(set(b) == {"relu_out", "x"} for b in batches)
    streamed = np.concatenate([b["relu_out"] for b in batches])

    truncated = onnx.ModelProto()
    truncated.CopyFrom(model)
    del truncated.graph.node[2:]
    del truncated.graph.output[:]
    truncated.graph.output.append(helper.make_tensor_value_info("relu_out", TensorProto.FLOAT, None))
    (direct,) = run(truncated, {"x": x.astype(np.float32)})
    np.testing.assert_allclose(streamed, direct, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x.astype(np.float32))


def test_stream_tensors_static_batch_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = conv_relu_gemm(batch=2)
    np.save(tmp_path / "x.npy", np.ones((5, 3, 8, 8), np.float32))
    calib = load_calibration(tmp_path / "x.npy", input_specs(model))
    with caplog.at_level(logging.WARNING):
        batches = list(stream_tensors(model, calib, ["logits"], batch_size=32))
    assert [b["logits"].shape for b in batches] == [(2, 2), (2, 2)]
    assert "skipping the last 1" in caplog.text


# ----------------------------------------------------------------------------- input specs


def test_input_specs_defaults_overrides_and_errors() -> None:
    model = conv_relu_gemm()
    (only,) = input_specs(model)
    assert only == InputSpec("x", (1, 3, 8, 8), np.dtype(np.float32), (0,))
    assert input_specs(model, {"x": (4, 3, 8, 8)})[0].shape == (4, 3, 8, 8)
    with pytest.raises(UsageError, match="nope"):
        input_specs(model, {"nope": (1, 3, 8, 8)})
    with pytest.raises(UsageError, match="rank"):
        input_specs(model, {"x": (1, 3, 8)})
    assert parse_input_shape("input:0:1x3x224x224") == ("input:0", (1, 3, 224, 224))
    with pytest.raises(UsageError):
        parse_input_shape("x:1xax3")


def test_input_specs_skip_initializer_inputs_and_need_a_type() -> None:
    model = conv_relu_gemm()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    assert [s.name for s in input_specs(model)] == ["x"]
    model.graph.input.append(onnx.ValueInfoProto(name="untyped"))
    with pytest.raises(ModelError, match="untyped"):
        input_specs(model)


# ----------------------------------------------------------------------------- array sources


def test_npz_multi_input_labels_samples_and_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((7, 2)), rng.standard_normal((7, 2))
    labels = np.arange(7)
    np.savez(tmp_path / "d.npz", a=a, b=b, labels=labels)
    specs = input_specs(two_input_model())
    calib = load_calibration(tmp_path / "d.npz", specs)
    assert calib.names == ("a", "b") and calib.num_samples == 7 and not calib.is_random
    batches = list(calib.iter_batches(3))
    assert [len(x["a"]) for x in batches] == [3, 3, 1]
    assert all(set(x) == {"a", "b"} and x["a"].dtype == np.float32 for x in batches)
    np.testing.assert_array_equal(collect(calib, 3)["b"], b.astype(np.float32))
    np.testing.assert_array_equal(calib.labels, labels)
    assert calib.num_batches(3) == 3 and calib.num_batches(3, drop_last=True) == 2

    limited = load_calibration(tmp_path / "d.npz", specs, samples=4)
    assert limited.num_samples == 4
    np.testing.assert_array_equal(collect(limited, 3)["a"], a[:4].astype(np.float32))
    np.testing.assert_array_equal(limited.labels, labels[:4])
    assert limited.fingerprint != calib.fingerprint
    assert load_calibration(tmp_path / "d.npz", specs, samples=4).fingerprint == limited.fingerprint
    np.savez(tmp_path / "e.npz", a=a[:4], b=b[:4])  # same data actually used -> same fingerprint
    assert load_calibration(tmp_path / "e.npz", specs).fingerprint == limited.fingerprint


def test_npz_single_array_any_key_and_npy(tmp_path: Path) -> None:
    specs = input_specs(conv_relu_gemm())
    x = np.random.default_rng(10).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "one.npz", images=x, labels=np.array([1, 2, 3]))
    np.testing.assert_array_equal(collect(load_calibration(tmp_path / "one.npz", specs), 2)["x"], x)
    np.save(tmp_path / "one.npy", x)
    calib = load_calibration(str(tmp_path / "one.npy"), specs)
    assert calib.labels is None and calib.sample_shapes == {"x": (3, 8, 8)}
    np.testing.assert_array_equal(collect(calib, 2)["x"], x)


def test_uint8_arrays_cast_to_float_and_int_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "u8.npy", np.full((2, 3), 200, np.uint8))
    batch = next(load_calibration(tmp_path / "u8.npy", [spec("x", (1, 3))]).iter_batches(2))
    assert batch["x"].dtype == np.float32 and batch["x"][0, 0] == 200.0
    np.save(tmp_path / "i32.npy", np.array([[1, 2]], np.int32))
    batch = next(load_calibration(tmp_path / "i32.npy", [spec("ids", (1, 2), np.int64)]).iter_batches(1))
    assert batch["ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("data", "input_spec", "match"),
    [
        (np.zeros((2, 3, 8)), spec("x", (1, 3, 8, 8)), r"has shape \(2, 3, 8\), expected \(N, 3, 8, 8\)"),
        (np.zeros((2, 3, 8, 9)), spec("x", (1, 3, 8, 8)), r"has shape \(2, 3, 8, 9\), expected \(N, 3, 8, 8\)"),
        (np.zeros((2, 4), np.float32), spec("ids", (1, 4), np.int64), "cannot be cast safely"),
        (np.full((2, 4), 300, np.int64), spec("ids", (1, 4), np.uint8), "outside the range"),
    ],
)
def test_array_errors_name_the_file(tmp_path: Path, data: np.ndarray, input_spec: InputSpec, match: str) -> None:
    path = tmp_path / "bad_data.npy"
    np.save(path, data)
    with pytest.raises(CalibrationError, match=match) as info:
        load_calibration(path, [input_spec])
    assert "bad_data.npy" in str(info.value) and "\n" not in str(info.value)


def test_missing_input_and_missing_path_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", a=np.zeros((2, 2)), c=np.zeros((2, 2)))
    with pytest.raises(CalibrationError, match=r"keys\.npz: no array for input 'b'; keys: a, c"):
        load_calibration(tmp_path / "keys.npz", input_specs(two_input_model()))
    with pytest.raises(UsageError, match="nothere.npz: no such"):  # a path that is not there: usage, like the model's
        load_calibration(tmp_path / "nothere.npz", [spec("x", (1, 2))])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="garbage.npz"):
        load_calibration(tmp_path / "garbage.npz", [spec("x", (1, 2))])
    np.savez(tmp_path / "count.npz", a=np.zeros((2, 2)), b=np.zeros((3, 2)))
    with pytest.raises(CalibrationError, match="count.npz"):
        load_calibration(tmp_path / "count.npz", input_specs(two_input_model()))
    with pytest.raises(UsageError):
        load_calibration("random", [spec("x", (1, 2))], samples=0)


# ----------------------------------------------------------------------------- random source


def test_random_source_is_flagged_seeded_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    specs = [spec("x", (1, 3, 4, 4)), spec("ids", (1, 5), np.int64)]
    with caplog.at_level(logging.WARNING):
        calib = load_calibration("random", specs, samples=6, seed=3)
    assert calib.is_random and calib.num_samples == 6 and calib.labels is None
    assert "meaningless" in caplog.text
    data = collect(calib, 4)
    assert data["x"].shape == (6, 3, 4, 4) and data["x"].dtype == np.float32
    assert data["ids"].dtype == np.int64 and not data["ids"].any()
    assert 0.5 < data["x"].std() < 1.5
    again = load_calibration("random", specs, samples=6, seed=3)
    np.testing.assert_array_equal(collect(again, 1)["x"], data["x"])  # batch size does not matter
    assert again.fingerprint == calib.fingerprint
    other = load_calibration("random", specs, samples=6, seed=4)
    assert not np.array_equal(collect(other, 6)["x"], data["x"]) and other.fingerprint != calib.fingerprint


# ----------------------------------------------------------------------------- image folders


def _write_png(path: Path, pixels: np.ndarray) -> None:
    image_module = pytest.importorskip("PIL.Image")
    image_module.fromarray(pixels).save(path)


def _solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def test_image_folder_preprocess_values(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    for i, rgb in enumerate([(255, 128, 0), (10, 20, 30), (0, 0, 0)]):
        _write_png(tmp_path / f"img{2 - i}.png", _solid(10, 12, rgb))  # names sort in reverse order
    (tmp_path / "notes.txt").write_text("ignored")
    pre = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    calib = load_calibration(tmp_path, [spec("x", (1, 3, 8, 8))], preprocess=pre)
    assert calib.num_samples == 3 and calib.sample_shapes == {"x": (3, 8, 8)}
    data = collect(calib, 2)["x"]
    assert data.shape == (3, 3, 8, 8) and data.dtype == np.float32
    # img0.png is (0,0,0), img1.png is (10,20,30), img2.png is (255,128,0)
    np.testing.assert_allclose(data[2, 1, 3, 4], (128 / 255 - 0.25) / 0.25, atol=1e-6)
    np.testing.assert_allclose(data[2, :, 0, 0], [1.0, (128 / 255 - 0.25) / 0.25, 0.0], atol=1e-6)
    np.testing.assert_allclose(data[0, 0, 5, 5], -1.0, atol=1e-6)
    assert load_calibration(tmp_path, [spec("x", (1, 3, 8, 8))], preprocess=pre).fingerprint == calib.fingerprint
    other = load_calibration(tmp_path, [spec("x", (1, 3, 8, 8))], preprocess=Preprocess())
    assert other.fingerprint != calib.fingerprint

    bgr = Preprocess(layout="NHWC", channel_order="BGR", scale=1.0)
    nhwc = collect(load_calibration(tmp_path, [spec("x", (1, 6, 5, 3))], preprocess=bgr, samples=1), 1)["x"]
    assert nhwc.shape == (1, 6, 5, 3)
    np.testing.assert_allclose(nhwc[0, 2, 2], [0.0, 0.0, 0.0])
    nhwc = collect(load_calibration(tmp_path, [spec("x", (1, 6, 5, 3))], preprocess=bgr), 3)["x"]
    np.testing.assert_allclose(nhwc[1, 2, 2], [30.0, 20.0, 10.0])


def test_image_folder_center_crop_grayscale_and_uint8(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:12] = (100, 100, 100)
    pixels[:, 12:] = (0, 0, 255)
    _write_png(tmp_path / "wide.png", pixels)
    crop = Preprocess(size=(8, 8), resize="shorter", scale=1.0)
    gray = collect(load_calibration(tmp_path, [spec("x", (1, 1, 8, 8), dynamic=(0, 2, 3))], preprocess=crop), 1)["x"]
    assert gray.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(gray, 100.0)  # the grey middle survives the center crop
    raw = collect(load_calibration(tmp_path, [spec("x", (1, 3, 8, 16), np.uint8)]), 1)["x"]
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw[0, :, 0, 0], [255, 0, 0])
    with pytest.raises(UsageError, match="does not match"):
        load_calibration(tmp_path, [spec("x", (1, 3, 8, 8))], preprocess=Preprocess(size=(4, 4)))
    with pytest.raises(CalibrationError, match="channels"):
        load_calibration(tmp_path, [spec("x", (1, 8, 8, 3))])
    with pytest.raises(UsageError, match="mean has 2 values"):
        load_calibration(tmp_path, [spec("x", (1, 3, 8, 16))], preprocess=Preprocess(mean=(0.1, 0.2)))
    with pytest.raises(UsageError):
        Preprocess(layout="CHW")  # type: ignore[arg-type]


def test_image_folder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="empty: no JPEG/PNG"):
        load_calibration(empty, [spec("x", (1, 3, 8, 8))])
    broken = tmp_path / "broken"
    broken.mkdir()
    _write_png(broken / "a_good.png", _solid(8, 8, (1, 2, 3)))
    (broken / "b_bad.png").write_bytes(b"\x89PNG definitely not an image")
    with pytest.raises(CalibrationError, match=r"1 of 2 images are unreadable \(first: b_bad\.png: Unidentified"):
        load_calibration(broken, [spec("x", (1, 3, 8, 8))])  # skipped, but one image is too few
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    _write_png(truncated / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = (truncated / "t.png").read_bytes()
    (truncated / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match=r"1 of 1 images are unreadable \(first: t\.png: OSError: image file is truncated"):
        load_calibration(truncated, [spec("x", (1, 3, 8, 8))])  # the header is fine: the body is decoded at load time

    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(CalibrationError, match=r"pip install onnxslim-prune\[images\]"):
        load_calibration(broken, [spec("x", (1, 3, 8, 8))])


# ----------------------------------------------------------------------------- cache


def test_cache_hits_misses_and_corruption(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"mean": np.arange(3.0), "conv1/out:0": np.eye(2)}

    key = (model_digest(conv_relu_gemm()), "fp-a", "moments")
    first = cached(key, compute, cache_dir=tmp_path)
    second = cached(key, compute, cache_dir=tmp_path)
    assert len(calls) == 1
    assert set(second) == {"mean", "conv1/out:0"}
    np.testing.assert_array_equal(second["mean"], first["mean"])
    cached((key[0], "fp-b", "moments"), compute, cache_dir=tmp_path)
    assert len(calls) == 2
    cache_path(key, tmp_path).write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING):
        again = cached(key, compute, cache_dir=tmp_path)
    assert len(calls) == 3 and "corrupt" in caplog.text
    np.testing.assert_array_equal(again["conv1/out:0"], np.eye(2))
    cached(key, compute, cache_dir=tmp_path)
    assert len(calls) == 3  # the corrupt file was replaced
    assert not list(tmp_path.glob("*.tmp"))
    cached(key, compute, cache_dir=None)
    cached(key, compute, cache_dir=None)
    assert len(calls) == 5


def test_cache_directory_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir(None) is None
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", "off")
    assert resolve_cache_dir() is None
    monkeypatch.delenv("ONNXSLIM_PRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "onnxslim-prune"
    assert model_digest(conv_relu_gemm()) == model_digest(conv_relu_gemm().SerializeToString())
    assert model_digest(conv_relu_gemm(seed=1)) != model_digest(conv_relu_gemm())
