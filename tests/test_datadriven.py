"""Data-driven selection (`methods.datadriven`, `methods.nisp`, `methods.activation`): ThiNet, CP, LDRF, NISP, mean_act, APoZ.

Oracles: selection rules on hand-made Gram statistics (a channel carrying no output energy
goes first; of two identical channels LDRF keeps one); NISP and the activation criteria
find channels that cannot matter (no outgoing weight, dead after the ReLU); every method
yields a valid model of the bundled LeNet, and ThiNet / CP / LDRF at ratio 0.8 beat l1
without reconstruction in accuracy on the 500 bundled test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLE_FMNIST, SAMPLE_LENET
from onnxslim_prune import api
from onnxslim_prune.errors import CalibrationError
from onnxslim_prune.methods import activation, datadriven, nisp
from onnxslim_prune.methods.base import get_method

METHODS = ("thinet", "cp", "ldrf", "nisp", "mean_act", "apoz")

pytestmark = pytest.mark.usefixtures("private_cache")


def accuracy(model: onnx.ModelProto) -> float:
    with np.load(SAMPLE_FMNIST) as data:
        x, labels = data["input"], data["labels"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(axis=1) == labels).mean())


def mlp(dead_out: int | None = None, dead_relu: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """x[N,6] -> Gemm(8) -> Relu -> Gemm(5) -> Relu -> Gemm(3) -> y.

    `dead_out`: hidden unit of the first layer with no outgoing weight (cannot matter).
    `dead_relu`: hidden unit of the first layer whose pre-activation is always negative.
    """
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((8, 6)), rng.standard_normal(8) * 0.1
    w2, b2 = rng.standard_normal((5, 8)), rng.standard_normal(5) * 0.1
    w3, b3 = rng.standard_normal((3, 5)), np.zeros(3)
    if dead_out is not None:
        w2[:, dead_out] = 0.0
    if dead_relu is not None:
        w1[dead_relu] *= 1e-3
        b1[dead_relu] = -100.0
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def mlp_calib(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((256, 6)).astype(np.float32))
    return path


def first_group_pruned(result: api.PruneResult) -> set[int]:
    """Positions removed from fc1's outputs."""
    group = next(g for g in result.trace.groups if any(m.node == "fc1" and m.role == "out" for m in g.members))
    plan = result.plan.for_group(group.index)
    assert plan is not None
    return {group.classes.index(c) for c in plan.pruned}


# ----------------------------------------------------------------------------- selection rules


def test_thinet_removes_the_channel_without_output_energy_first() -> None:
    rng = np.random.default_rng(2)
    z = rng.standard_normal((200, 4))
    z[:, 2] *= 1e-3
    m = z.T @ z / 200
    scores = datadriven.thinet_scores(m, np.ones(4, dtype=bool))
    assert int(np.argmin(scores)) == 2
    # two contributions that cancel are removed together: their joint energy is zero
    z = rng.standard_normal((200, 4))
    z[:, 3] = -z[:, 1]
    m = z.T @ z / 200
    order = np.argsort(datadriven.thinet_scores(m, np.ones(4, dtype=bool)))
    assert set(order[2:].tolist()) == {0, 2}


def test_thinet_never_ranks_frozen_classes_first() -> None:
    m = np.diag([1.0, 0.0, 2.0])
    scores = datadriven.thinet_scores(m, np.array([True, False, True]))
    assert scores[1] > scores[0] and scores[1] > scores[2]


def test_lasso_keeps_the_requested_count_of_useful_channels() -> None:
    rng = np.random.default_rng(3)
    z = rng.standard_normal((400, 6)) * np.array([3.0, 0.01, 2.0, 0.02, 1.5, 0.01])
    m = z.T @ z / 400
    scores = datadriven.lasso_scores(m, np.ones(6, dtype=bool), n_remove=3)
    assert set(np.argsort(scores)[:3].tolist()) == {1, 3, 5}


def test_ldrf_forward_selection_keeps_one_of_two_duplicates() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 3))
    x = np.c_[x, x[:, 0]]  # column 3 duplicates column 0
    s = np.cov(x.T, bias=True)
    c = s @ np.array([[1.0], [0.5], [0.2], [1.0]])
    scores = datadriven.ls_forward_scores([(s, c, np.arange(4))], 4, np.ones(4, dtype=bool), ridge=1e-9)
    assert int(np.argmin(scores)) in (0, 3)  # the duplicate adds nothing once its twin is kept
    assert scores[1] > scores[2]


def test_inf_fs_prefers_spread_out_uncorrelated_features() -> None:
    std = np.array([1.0, 1.0, 1.0, 0.5])
    corr = np.eye(4)
    corr[0, 1] = corr[1, 0] = 0.99  # 0 and 1 are redundant
    scores = nisp.inf_fs(std, corr)
    assert int(np.argmax(scores)) == 2
    assert scores[0] < scores[2] and scores[1] < scores[2]
    # the paper's pairwise term max(std_i, std_j): a low-variance feature still pairs strongly
    np.testing.assert_allclose(scores[0], scores[1])


# ----------------------------------------------------------------------------- criteria on small models


@pytest.mark.parametrize("method", ["thinet", "cp", "ldrf", "nisp"])
def test_a_unit_without_outgoing_weight_goes_first(method: str, mlp_calib: Path) -> None:
    result = api.prune(mlp(dead_out=5), method, 0.125, calib=mlp_calib)
    assert first_group_pruned(result) == {5}


@pytest.mark.parametrize("method", ["mean_act", "apoz"])
def test_a_dead_relu_unit_goes_first(method: str, mlp_calib: Path) -> None:
    result = api.prune(mlp(dead_relu=4), method, 0.125, calib=mlp_calib)
    assert first_group_pruned(result) == {4}


def test_nisp_propagates_through_batchnorm_and_flatten(tmp_path: Path) -> None:
    """Conv -> BN (channel 1 scaled to ~0) -> Relu -> Flatten -> Gemm: channel 1 matters least."""
    rng = np.random.default_rng(5)
    gamma = np.ones(4)
    gamma[1] = 1e-6
    weights = {
        "w": rng.standard_normal((4, 2, 3, 3)), "g": gamma, "beta": np.zeros(4), "mean": np.zeros(4),
        "var": np.ones(4), "fc": rng.standard_normal((3, 4 * 5 * 5)), "fb": np.zeros(3),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((64, 2, 5, 5)).astype(np.float32))
    result = api.prune(model, "nisp", 0.25, calib=calib)
    group = next(g for g in result.trace.groups if not g.is_frozen)
    plan = result.plan.for_group(group.index)
    assert plan is not None and [group.classes.index(c) for c in plan.pruned] == [1]


# ----------------------------------------------------------------------------- the trained LeNet


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_lenet_into_a_valid_model(method: str) -> None:
    assert get_method(method).needs_data
    result = api.prune(SAMPLE_LENET, method, 0.5, calib=SAMPLE_FMNIST)  # validated by api.prune
    assert result.report.after.params < 0.6 * result.report.before.params
    assert accuracy(result.model) > 0.7


def test_reconstruction_methods_beat_plain_l1_at_ratio_08() -> None:
    baseline = accuracy(api.prune(SAMPLE_LENET, "l1", 0.8).model)
    found = {m: accuracy(api.prune(SAMPLE_LENET, m, 0.8, calib=SAMPLE_FMNIST).model) for m in ("thinet", "cp", "ldrf")}
    assert all(acc > baseline + 0.05 for acc in found.values()), (baseline, found)


def test_selection_only_when_reconstruction_is_off() -> None:
    result = api.prune(SAMPLE_LENET, "thinet", 0.5, calib=SAMPLE_FMNIST, params={"reconstruct": False})
    refit = api.prune(SAMPLE_LENET, "thinet", 0.5, calib=SAMPLE_FMNIST)
    assert result.plan == refit.plan
    assert accuracy(refit.model) > accuracy(result.model)


def test_missing_calibration_names_the_flag() -> None:
    for method in METHODS:
        with pytest.raises(CalibrationError, match="--calib"):
            api.prune(SAMPLE_LENET, method, 0.5)


def test_statistics_are_cached(private_cache: Path) -> None:
    first = api.prune(SAMPLE_LENET, "mean_act", 0.5, calib=SAMPLE_FMNIST)
    files = sorted(private_cache.glob("*.npz"))
    assert files
    second = api.prune(SAMPLE_LENET, "mean_act", 0.5, calib=SAMPLE_FMNIST)
    assert sorted(private_cache.glob("*.npz")) == files
    assert first.plan == second.plan


# ----------------------------------------------------------------------------- streamed statistics


def test_in_graph_moments_match_numpy_channel_moments() -> None:
    from onnxslim_prune.calib import ChannelMoments, input_specs, load_calibration, stream_tensors
    from onnxslim_prune.methods.base import Context, Options

    analysis = api.analyze(SAMPLE_LENET)
    calib = load_calibration(str(SAMPLE_FMNIST), input_specs(analysis.model, analysis.input_shapes), samples=100)
    ctx = Context(analysis.model, analysis.graph, analysis.trace, Options(batch_size=32), analysis.input_shapes,
                  analysis.opset, calib)
    tensors = [t for g in analysis.trace.groups if not g.is_frozen for t in activation.activation_tensors(ctx, g)]
    assert tensors
    got = activation.activation_moments(ctx, tensors)
    want = {t: ChannelMoments(1) for t in tensors}
    for batch in stream_tensors(analysis.model, calib, tensors, batch_size=32):
        for t in tensors:
            want[t].update(batch[t])
    for t in tensors:
        assert got[t].count == want[t].count
        np.testing.assert_allclose(got[t].mean_abs, want[t].mean_abs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[t].sq_mean, want[t].sq_mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[t].apoz, want[t].apoz, atol=1e-12)


def test_buffered_float32_gram_matches_float64() -> None:
    from onnxslim_prune.calib import GramAccumulator
    from onnxslim_prune.methods.reconstruct import RowBuffer

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1000, 12)).astype(np.float32) + 3.0
    exact = GramAccumulator(12)
    exact.update(x)
    buffered = RowBuffer(GramAccumulator(12, product_dtype=np.float32), rows=96)
    for rows in np.array_split(x, 37):
        buffered.add(rows)
    acc = buffered.flush()
    assert acc.count == exact.count == 1000
    np.testing.assert_allclose(acc.xtx, exact.xtx, rtol=1e-5)
    np.testing.assert_allclose(acc.sum_x, exact.sum_x, rtol=1e-9)


def test_selection_statistics_split_over_stages_when_a_batch_of_inputs_exceeds_the_budget(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """LeNet's three Gemm inputs at batch 32 take 100.4 KB, 38.4 KB and 12.8 KB; an exposure budget of 110 KB
    splits them over two stages of one pass. Gemm rows are every row (no sampled positions), so the covariances equal the
    one-pass ones to 1e-9."""
    import logging

    from onnxslim_prune.calib import input_specs, load_calibration
    from onnxslim_prune.methods.base import Context, Options
    from onnxslim_prune.methods import reconstruct as rc

    analysis = api.analyze(SAMPLE_LENET)
    calib = load_calibration(str(SAMPLE_FMNIST), input_specs(analysis.model, analysis.input_shapes), samples=64)
    ctx = Context(analysis.model, analysis.graph, analysis.trace, Options(batch_size=32), analysis.input_shapes,
                  analysis.opset, calib)
    nodes = {n.name: n for n in analysis.graph.nodes}
    layers = [layer for name, kind in analysis.trace.node_kind.items()
              if (layer := rc.layer_of(nodes[name], kind)) is not None]
    assert len(layers) == 3
    one_pass = datadriven.input_covariances(ctx, layers)
    monkeypatch.setattr(rc, "DEFAULT_EXPOSED_BUDGET", 110_000)
    with caplog.at_level(logging.INFO, logger="onnxslim_prune.methods.datadriven"):
        split = datadriven.input_covariances(ctx, layers)
    assert "3 layers in 2 stages of one pass" in caplog.text
    assert split.keys() == one_pass.keys()
    for key, (cov, mean) in one_pass.items():
        np.testing.assert_allclose(split[key][0], cov, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(split[key][1], mean, rtol=1e-9, atol=1e-9)
