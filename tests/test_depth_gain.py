"""Depth gains (`methods.depthgain`): a layer's damage weighed by how much its error grows on the way to the outputs.

Model: two residual FFN layers on x [N, 8], each 16 neurons wide, both reading x (so that an error passes to the
output linearly), and an output that counts the first sum ``1 + c`` times::

    s1 = x + fc1b(relu(fc1a(x)))      s2 = s1 + fc2b(relu(fc2a(x)))      y = s2 + c * s1

An error ``e1`` in s1 reaches y as ``(1 + c) e1``, an error ``e2`` in s2 as ``e2``. Oracle: with ``E_i`` the centred
energy of ``s_i`` (the damage's unit) and ``Y`` y's energy, the gains are ``(1 + c)^2 E1 / Y`` and ``E2 / Y`` up to one
common factor, whatever the perturbation (numpy on the onnxruntime activations).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import api
from onnxslim_prune.calib import input_specs, load_calibration
from onnxslim_prune.methods.base import Context, DepthGain, Options
from onnxslim_prune.methods import datadriven, depthgain

WIDTH, FFN, AMPLIFY = 8, 16, 2.0


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path / "cache"))


def amplified(c: float = AMPLIFY, seed: int = 0) -> onnx.ModelProto:
    """The model of the module docstring, ``y = s2 + c s1``; an input projection (the identity) gives the residual
    stream a traced hidden size, frozen by the graph output."""
    rng = np.random.default_rng(seed)
    w = {"w1a": rng.standard_normal((WIDTH, FFN)) / np.sqrt(WIDTH), "b1a": 0.1 * rng.standard_normal(FFN),
         "w1b": rng.standard_normal((FFN, WIDTH)) * rng.uniform(0.2, 1.0, (FFN, 1)) / np.sqrt(FFN),
         "w2a": rng.standard_normal((WIDTH, FFN)) / np.sqrt(WIDTH), "b2a": 0.1 * rng.standard_normal(FFN),
         "w2b": rng.standard_normal((FFN, WIDTH)) * rng.uniform(0.2, 1.0, (FFN, 1)) / np.sqrt(FFN),
         "c": np.array(c), "we": np.eye(WIDTH)}
    nodes = [
        helper.make_node("MatMul", ["x0", "we"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1a"], ["h1"], name="fc1a"),
        helper.make_node("Add", ["h1", "b1a"], ["h1b"], name="bias1"),
        helper.make_node("Relu", ["h1b"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w1b"], ["a1"], name="fc1b"),
        helper.make_node("Add", ["x", "a1"], ["s1"], name="sum1"),
        helper.make_node("MatMul", ["x", "w2a"], ["h2"], name="fc2a"),
        helper.make_node("Add", ["h2", "b2a"], ["h2b"], name="bias2"),
        helper.make_node("Relu", ["h2b"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w2b"], ["a2"], name="fc2b"),
        helper.make_node("Add", ["s1", "a2"], ["s2"], name="sum2"),
        helper.make_node("Mul", ["s1", "c"], ["amp"], name="amplify"),
        helper.make_node("Add", ["s2", "amp"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "amplified", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "x.npz"
    np.savez(path, x0=np.random.default_rng(1).standard_normal((400, WIDTH)).astype(np.float32))
    return path


def activations(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n != "y")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v, dtype=np.float64) for v in session.run(names, {"x0": x})]


def context(model: onnx.ModelProto, path: Path, gain: str | None) -> Context:
    analysis = api.analyze(model)
    data = load_calibration(str(path), input_specs(analysis.model, analysis.input_shapes))
    params = {"target_macs": 0.6, "budget_allocation": "damage", "depth_gain": gain}
    return Context(analysis.model, analysis.graph, analysis.trace, Options(method="obs", params=params),
                   analysis.input_shapes, analysis.opset, data)


def test_the_gains_are_the_output_error_per_unit_of_damage(calib: Path) -> None:
    """Measured gains of fc1b and fc2b: mean 1 and in the ratio ``(1 + c)^2 E1 / E2`` of the oracle to 1e-5 (the
    model is linear in each error: only float32 rounding is left); without --depth-gain on a model with no
    LayerNorm, none are measured."""
    model = amplified()
    ctx = context(model, calib, DepthGain.TOKENS.value)
    consumers = datadriven.group_consumers(ctx)
    layers = [c.layer for cs in consumers.values() for c in cs]
    assert sorted(layer.node for layer in layers) == ["fc1b", "fc2b"]
    cov = datadriven.input_covariances(ctx, layers)
    gains = datadriven.depth_gains(ctx, layers, cov)

    with np.load(calib) as data:
        x = data["x0"][: depthgain.GAIN_SAMPLES]
    s1, s2 = activations(model, x, ["s1", "s2"])
    e1, e2 = (float(np.sum(np.square(s - s.mean(axis=0)))) for s in (s1, s2))
    assert set(gains) == {"fc1b", "fc2b"}
    assert gains["fc1b"] + gains["fc2b"] == pytest.approx(2.0, rel=1e-9)
    assert gains["fc1b"] / gains["fc2b"] == pytest.approx((1 + AMPLIFY) ** 2 * e1 / e2, rel=1e-5)
    assert gains["fc1b"] > 3 * gains["fc2b"]

    assert datadriven.depth_gain_output(context(model, calib, None)) is DepthGain.OFF
    assert datadriven.depth_gains(context(model, calib, None), layers, cov) == {}


def test_the_damage_of_each_consumer_is_multiplied_by_its_gain(calib: Path) -> None:
    """The damage table with gains is the table without them, each group's curve times its consumer's gain."""
    model = amplified()
    ctx = context(model, calib, DepthGain.TOKENS.value)
    consumers = datadriven.group_consumers(ctx)
    layers = [c.layer for cs in consumers.values() for c in cs]
    cov = datadriven.input_covariances(ctx, layers)
    gains = datadriven.depth_gains(ctx, layers, cov)
    scales = datadriven.sink_scales(ctx, layers)
    scores = {g: np.arange(FFN, dtype=np.float64) for g in consumers}
    plain = datadriven.damage_table(ctx, scores, consumers, cov, scales)
    weighed = datadriven.damage_table(ctx, scores, consumers, cov, scales, gains=gains)
    for index, (consumer,) in consumers.items():
        np.testing.assert_allclose(weighed[index].damage, plain[index].damage * gains[consumer.layer.node], rtol=1e-12)


def kept_widths(result: api.PruneResult) -> dict[str, int]:
    groups = {g.index: g for g in result.trace.groups}
    kept = {"fc1a": FFN, "fc2a": FFN}
    for gp in result.plan.groups:
        kept[next(m.node for m in groups[gp.group].members if m.role == "out")] = gp.kept
    return kept


def test_the_allocation_moves_the_budget_toward_the_amplified_layer(calib: Path) -> None:
    """At 60% of the MACs by damage, the gains keep more of the layer whose error is amplified (fc1) and fewer of
    the other than the plain damage does, and the written model's output error on 256 unseen samples is lower."""
    model = amplified(seed=1)
    results = {gain: api.prune(model, "obs", calib=str(calib), seed=0, latency=False,
                               params={"target_macs": 0.6, "budget_allocation": "damage", "depth_gain": gain})
               for gain in ("off", "tokens")}
    off, on = kept_widths(results["off"]), kept_widths(results["tokens"])
    assert on["fc1a"] > off["fc1a"] and on["fc2a"] < off["fc2a"], (off, on)
    x = np.random.default_rng(7).standard_normal((256, WIDTH)).astype(np.float32)
    (want,) = activations(model, x, ["y"])
    error = {gain: float(np.sum(np.square(activations(r.model, x, ["y"])[0] - want))) for gain, r in results.items()}
    assert error["tokens"] < error["off"], error


def test_the_residual_map_is_the_error_the_refit_leaves() -> None:
    """``(X - mu) M`` of `residual_map` is the pruned-and-refitted layer's output minus the original's: columns 1 and
    4 removed, the others refitted by least squares (numpy's lstsq on the centred rows), to 1e-9 relative."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + rng.standard_normal(6)
    w = rng.standard_normal((6, 3))
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / len(x)
    removed, kept = np.array([1, 4]), np.array([0, 2, 3, 5])
    d = np.linalg.lstsq(xc[:, kept], xc[:, removed] @ w[removed], rcond=None)[0]
    want = xc[:, kept] @ (w[kept] + d) - xc @ w
    got = xc @ depthgain.residual_map(s, w, removed, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * float(np.abs(want).max()))


def test_probed_by_their_refit_residuals_the_gains_keep_the_oracle(calib: Path) -> None:
    """With the selection's scores, each layer is probed by its refit's error at the budget's share removed (40% at
    --target-macs 0.6): the model is linear in each error, so the gains are those of the oracle, to 1e-5."""
    model = amplified()
    ctx = context(model, calib, DepthGain.TOKENS.value)
    consumers = datadriven.group_consumers(ctx)
    layers = [c.layer for cs in consumers.values() for c in cs]
    cov = datadriven.input_covariances(ctx, layers)
    scores = {g: np.random.default_rng(g).permutation(FFN).astype(np.float64) for g in consumers}
    residuals = datadriven.probe_residuals(ctx, scores, consumers, cov, {})
    assert {node: int(np.count_nonzero(np.abs(m).sum(axis=1) > 0)) for node, m in residuals.items()} == \
        {"fc1b": FFN, "fc2b": FFN}  # the removed rows and the refitted ones
    gains = datadriven.depth_gains(ctx, layers, cov, scores, consumers, {})
    with np.load(calib) as data:
        x = data["x0"][: depthgain.GAIN_SAMPLES]
    s1, s2 = activations(model, x, ["s1", "s2"])
    e1, e2 = (float(np.sum(np.square(s - s.mean(axis=0)))) for s in (s1, s2))
    assert gains["fc1b"] / gains["fc2b"] == pytest.approx((1 + AMPLIFY) ** 2 * e1 / e2, rel=1e-5)


def test_a_post_layernorm_transformer_takes_pooled_gains_by_default(tmp_path: Path) -> None:
    """On a post-LN encoder layer (`test_token_weights.encoder`: heads and FFN neurons add into sums read by
    LayerNorms) the default is POOLED, and OFF with --no-token-weights; a default budgeted run measures one gain per
    consumer (attention output, FFN down), notes them (mean 1), and writes a model whose outputs stay within 0.3
    relative squared error of the original's on the real tokens of 64 unseen sequences (0.19: 74% of the MACs kept by
    this one-layer model's coarse steps)."""
    from test_token_weights import context as encoder_context
    from test_token_weights import encoder, sequences

    path = tmp_path / "calib.npz"
    np.savez(path, **sequences(300, 1))
    model = encoder()
    assert datadriven.depth_gain_output(encoder_context(model, path)) is DepthGain.POOLED
    off = encoder_context(model, path)
    off = Context(off.model, off.graph, off.trace, Options(method="obs", params={"target_macs": 0.6, "token_weights": False}),
                  off.input_shapes, off.opset, off.calibration)
    assert datadriven.depth_gain_output(off) is DepthGain.OFF

    result = api.prune(model, "obs", calib=str(path), seed=0, latency=False, params={"target_macs": 0.7})
    notes = [n for n in result.report.notes if n.startswith("depth gains (pooled) of 2 layers")]
    assert len(notes) == 1, result.report.notes
    gains = [float(v) for v in notes[0].split(":")[1].split()]
    assert sum(gains) == pytest.approx(2.0, abs=0.01) and all(g > 0 for g in gains)
    feed = sequences(64, 9)
    want, got = (np.asarray(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                            .run(["y"], feed)[0], dtype=np.float64) for m in (model, result.model))
    real = feed["attention_mask"] != 0
    assert float(np.sum((got - want)[real] ** 2) / np.sum(want[real] ** 2)) < 0.3
