"""`lowrank`: activation-aware low-rank decomposition (methods/lowrank.py).

Oracles: a layer of exact rank r is split into two layers through r channels with the outputs
unchanged (Gemm, MatMul with and without its bias Add, a strided 3x3 Conv); the MACs fall as
planned; a layer whose split would not save MACs stays whole; the closed-form damage (discarded
eigenvalue energy) is the measured output error; SVD-LLM's whitening form is the same matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import api
from onnxslim_prune.channels import Kind
from onnxslim_prune.methods import lowrank
from onnxslim_prune.methods import reconstruct as rc

pytestmark = pytest.mark.usefixtures("private_cache")


def make_model(nodes: list[onnx.NodeProto], x: list, y: list, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def low_rank(rows: int, cols: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rows * rank)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def prune(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path, target: float, round_to: int = 8, **params: object) -> api.PruneResult:
    np.savez(tmp_path / "calib.npz", x=x)
    return api.prune(model, "lowrank", calib=tmp_path / "calib.npz", round_to=round_to, latency=False, holdout=0.0,
                     params={"target_macs": target, **params})


def nodes_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ----------------------------------------------------------------------------- models of exact rank 8


def gemm_model() -> onnx.ModelProto:
    """x[N,64] -> Relu -> Gemm(48, alpha 0.5, transB, C) of rank 8."""
    w = low_rank(64, 48, 8, 1)
    weights = {"w": (w / 0.5).T, "c": np.random.default_rng(2).standard_normal(48)}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "w", "c"], ["y"], name="layer", alpha=0.5, beta=1.0, transB=1)]
    return make_model(nodes, ["N", 64], ["N", 48], weights)


def matmul_model(bias: bool) -> onnx.ModelProto:
    """x[N,5,64] -> Relu -> MatMul(48) of rank 8 (+ a bias Add)."""
    weights = {"w": low_rank(64, 48, 8, 3)}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w"], ["m" if bias else "y"], name="layer")]
    if bias:
        weights["b"] = np.random.default_rng(4).standard_normal(48)
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="bias"))
    return make_model(nodes, ["N", 5, 64], ["N", 5, 48], weights)


def conv_model() -> onnx.ModelProto:
    """x[N,8,12,12] -> Relu -> Conv(32, 3x3, stride 2, pad 1) of rank 8 (as a [72, 32] matrix) with bias."""
    w = low_rank(72, 32, 8, 5)  # rows: (input channel, tap)
    weights = {"w": w.T.reshape(32, 8, 3, 3), "b": np.random.default_rng(6).standard_normal(32)}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Conv", ["h", "w", "b"], ["y"], name="layer", pads=[1, 1, 1, 1], strides=[2, 2])]
    return make_model(nodes, ["N", 8, 12, 12], ["N", 32, 6, 6], weights)


CASES = {
    "gemm": (gemm_model, (256, 64), 64, 48),
    "matmul": (lambda: matmul_model(True), (64, 5, 64), 64, 48),
    "matmul-no-bias": (lambda: matmul_model(False), (64, 5, 64), 64, 48),
    "conv": (conv_model, (32, 8, 12, 12), 72, 32),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("refit", "metric"), [(True, "energy"), (False, "energy"), (False, "channel")])
def test_an_exactly_rank_r_layer_is_split_exactly(tmp_path: Path, case: str, refit: bool, metric: str) -> None:
    build, shape, d, o = CASES[case]
    model = build()
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32) + 0.5
    planned = 8 * (d + o) / (d * o)  # the rank-8 split's share of the layer's MACs (the model's only MACs)
    result = prune(model, x, tmp_path, target=planned + 0.01, reconstruct=refit, lowrank_metric=metric)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in model.graph.input]
    assert [(o_.name, o_.type) for o_ in out.graph.output] == [(o_.name, o_.type) for o_ in model.graph.output]
    nodes, weights = nodes_of(out), weights_of(out)
    first, second = nodes["layer_lowrank"], nodes["layer"]
    assert second.input[0] == first.output[0]  # the second layer reads the first's r channels
    a, b = weights[first.input[1]], weights[second.input[1]]
    if case == "conv":
        assert a.shape == (8, 8, 3, 3) and b.shape == (32, 8, 1, 1)
        attrs = {at.name: helper.get_attribute_value(at) for at in first.attribute}
        assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    elif case == "gemm":
        assert first.op_type == "MatMul" and a.shape == (64, 8) and b.shape == (48, 8)  # transB kept
    else:
        assert first.op_type == "MatMul" and a.shape == (64, 8) and b.shape == (8, 48)
    assert result.report.after.macs == pytest.approx(planned * result.report.before.macs)
    np.testing.assert_allclose(run(out, x), run(model, x), atol=1e-4)


def test_a_split_that_saves_no_macs_is_not_made(tmp_path: Path) -> None:
    """x[N,64] -> Relu -> Gemm(64) of rank 8 -> Gemm(4): the second could only save MACs below rank 3 (< the
    multiple 8), so it stays whole; the first takes the whole budget."""
    weights = {"w1": low_rank(64, 64, 8, 8), "b1": np.zeros(64), "w2": np.random.default_rng(9).standard_normal((64, 4))}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "w1", "b1"], ["z"], name="wide"),
             helper.make_node("Gemm", ["z", "w2"], ["y"], name="narrow")]
    model = make_model(nodes, ["N", 64], ["N", 4], weights)
    x = np.random.default_rng(10).standard_normal((128, 64)).astype(np.float32)
    result = prune(model, x, tmp_path, target=0.5)
    nodes_out, weights_out = nodes_of(result.model), weights_of(result.model)
    assert "narrow_lowrank" not in nodes_out and nodes_out["narrow"].input[0] == "z"
    np.testing.assert_array_equal(weights_out[nodes_out["narrow"].input[1]], weights["w2"].astype(np.float32))
    assert weights_out[nodes_out["wide_lowrank"].input[1]].shape == (64, 8)  # zero damage down to rank 8
    total = 64 * 64 + 64 * 4
    assert result.report.after.macs == 8 * 128 + 64 * 4 and result.report.after.macs <= 0.5 * total
    np.testing.assert_allclose(run(result.model, x), run(model, x), atol=1e-4)


def test_nothing_to_split_leaves_the_model_unchanged(tmp_path: Path) -> None:
    weights = {"w": np.random.default_rng(11).standard_normal((16, 4))}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    model = make_model(nodes, ["N", 16], ["N", 4], weights)
    x = np.random.default_rng(12).standard_normal((64, 16)).astype(np.float32)
    result = prune(model, x, tmp_path, target=0.5)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "MatMul"]
    assert result.report.after.macs == result.report.before.macs
    assert any("out of reach" in note for note in result.report.notes)


def test_predicted_damage_is_the_measured_error(tmp_path: Path) -> None:
    """Full-rank Gemm cut to rank 16 without refit: the output error's energy (about its mean) is the discarded
    eigenvalue share the allocation predicted, and its mean is zero (the bias correction)."""
    rng = np.random.default_rng(13)
    weights = {"w": rng.standard_normal((64, 48)) / 8, "b": rng.standard_normal(48)}
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("Gemm", ["h", "w", "b"], ["y"], name="layer")]
    model = make_model(nodes, ["N", 64], ["N", 48], weights)
    x = (rng.standard_normal((512, 64)) * rng.uniform(0.2, 3.0, 64)).astype(np.float32)
    result = prune(model, x, tmp_path, target=16 * 112 / (64 * 48) + 1e-3, round_to=16, reconstruct=False)
    y, y_low = run(model, x).astype(np.float64), run(result.model, x).astype(np.float64)
    assert weights_of(result.model)["layer_lowrank_weight"].shape == (64, 16)
    h = np.maximum(x.astype(np.float64), 0)
    c = np.cov((h @ weights["w"]).T, bias=True)
    values = np.sort(np.linalg.eigvalsh(c))[::-1]
    predicted = values[16:].sum() / values.sum()
    err = y_low - y
    assert np.abs(err.mean(axis=0)).max() < 1e-4
    measured = np.sum((err - err.mean(axis=0)) ** 2) / np.sum((y - y.mean(axis=0)) ** 2)
    assert 0.05 < predicted and measured == pytest.approx(predicted, rel=1e-3)


def test_whitening_form_is_the_projection_form() -> None:
    """SVD-LLM's ``L^-T [L^T W]_r`` (S = L L^T) equals ``W U_r U_r^T`` from the output covariance."""
    rng = np.random.default_rng(14)
    w, x = rng.standard_normal((20, 12)), rng.standard_normal((400, 20)) * rng.uniform(0.1, 2.0, 20)
    s = x.T @ x / 400
    values, vectors = np.linalg.eigh(w.T @ s @ w)
    order = np.argsort(values)[::-1]
    cand = lowrank.Candidate(rc.Layer("n", Kind.GEMM, "x", "y"), w, None, np.zeros(20), np.ones(12), values[order],
                             vectors[:, order], 1, 1, 1, 6)
    d = lowrank.decomposition(cand, 5)
    lower = np.linalg.cholesky(s)
    u, sv, vt = np.linalg.svd(lower.T @ w)
    whitened = np.linalg.solve(lower.T, (u[:, :5] * sv[:5]) @ vt[:5])
    np.testing.assert_allclose(d.a @ d.b, whitened, atol=1e-10)


@pytest.mark.parametrize("metric", list(lowrank.OutputMetric))
def test_a_wide_layer_gets_its_spectrum_without_the_outputs_covariance(metric: lowrank.OutputMetric) -> None:
    """More outputs than inputs (a language model's logits): the spectrum from the ``D x D`` side equals the one of
    the ``O x O`` output covariance (eigenvalues; the span of the first eigenvectors), a dead input included."""
    rng = np.random.default_rng(15)
    w, x = rng.standard_normal((12, 40)), rng.standard_normal((300, 12)) * rng.uniform(0.1, 2.0, 12)
    x[:, 3] = 0.0  # a dead input channel: S is singular
    s = x.T @ x / 300
    scale, values, vectors = lowrank.output_spectrum(s, w, metric, 6)
    c = w.T @ s @ w
    want_scale = lowrank.output_scale(np.diag(c), metric)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-10)
    want, basis = np.linalg.eigh(c / np.outer(want_scale, want_scale))
    want, basis = want[::-1].clip(min=0.0), basis[:, ::-1]
    assert values.shape == (12,) and vectors.shape == (40, 6)
    np.testing.assert_allclose(values, want[:12], rtol=1e-8, atol=1e-8)
    assert np.allclose(want[12:], 0.0, atol=1e-8)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(vectors @ vectors.T, basis[:, :6] @ basis[:, :6].T, atol=1e-8)


@pytest.mark.parametrize(("d", "o", "multiple", "first"), [(384, 384, 16, 176), (384, 1536, 16, 304), (64, 4, 8, 0), (72, 32, 1, 22)])
def test_first_rank_is_the_largest_aligned_rank_that_saves_macs(d: int, o: int, multiple: int, first: int) -> None:
    assert lowrank.first_rank(d, o, multiple) == first
    if first:
        assert first * (d + o) < d * o <= (first + multiple) * (d + o)


def candidate(values: list[float], d: int, o: int, macs: int, multiple: int = 8) -> lowrank.Candidate:
    spectrum = np.asarray(values + [0.0] * (o - len(values)))
    return lowrank.Candidate(rc.Layer("n", Kind.GEMM, "x", "y"), np.zeros((d, o)), None, np.zeros(d), np.ones(o), spectrum,
                             np.eye(o), macs, multiple, multiple, lowrank.first_rank(d, o, multiple))


def test_allocation_takes_the_least_damage_per_mac_first() -> None:
    """Two 64x64 layers (first rank 24): a flat spectrum (every step costs) and one of rank 8 (free down to 8).
    The free layer is cut first; past its least rank, the flat one."""
    flat = candidate([1.0] * 64, 64, 64, 64 * 64)
    sharp = candidate([1.0] * 8, 64, 64, 64 * 64)
    cands = [flat, sharp]
    ranks = lowrank.allocate(cands, needed=sharp.macs - sharp.macs_at(8))
    assert ranks == {1: 8}  # the free layer alone meets it, the flat one is untouched
    ranks = lowrank.allocate(cands, needed=sharp.macs - sharp.macs_at(8) + 1)
    assert ranks == {1: 8, 0: 24}  # one more MAC: the sharp layer is at its least rank, the flat one takes its first step
    assert flat.damage(24) == pytest.approx(40 / 64) and sharp.damage(8) == 0.0
