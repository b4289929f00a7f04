"""Token weights of sequence models: padding rows left out, errors before a LayerNorm weighed as the norm weighs them.

Model: one post-LayerNorm encoder layer (BERT's, all-MiniLM's): two attention heads with a padding mask, a residual
sum and LayerNorm, an FFN of 12 neurons, a residual sum and LayerNorm as the graph output. Calibration: 300
sequences of 6 tokens, a random number of them padding, and a few tokens whose residual stream is 8x the others'
(BERT's outlier tokens), so that ``1 / sigma_t^2`` differs between tokens. Oracles: numpy on the onnxruntime
activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxslim_prune import api, ir, prune
from onnxslim_prune.judge import validate
from onnxslim_prune.calib import input_specs, load_calibration
from onnxslim_prune.calib.statistic import RowWeights, SampledGrams, collect
from onnxslim_prune.methods.base import Context, Options
from onnxslim_prune.ops.testing import parse, weights
from onnxslim_prune.methods import datadriven

TOKENS, WIDTH, FFN = 6, 8, 12


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path / "cache"))


def encoder(seed: int = 0) -> onnx.ModelProto:
    """A post-LayerNorm encoder layer, x0 [N, 6, 8] and attention_mask [N, 6] -> y [N, 6, 8] (module docstring); an
    input projection (the identity) gives the residual stream a traced hidden size, frozen by the graph output."""
    d, f = WIDTH, FFN
    w = {"we": np.eye(d), "wq": weights(d, d, seed=seed), "wk": weights(d, d, seed=seed + 1), "wv": weights(d, d, seed=seed + 2),
         "wo": 0.5 * weights(d, d, seed=seed + 3), "bo": 0.1 * weights(d, seed=seed + 4),
         "g1": 1.0 + 0.3 * weights(d, seed=seed + 5), "b1": 0.1 * weights(d, seed=seed + 6),
         "w1": 0.5 * weights(d, f, seed=seed + 7), "c1": 0.1 * weights(f, seed=seed + 8),
         "w2": 0.5 * weights(f, d, seed=seed + 9), "c2": 0.1 * weights(d, seed=seed + 10),
         "g2": 1.0 + 0.3 * weights(d, seed=seed + 11), "b2": 0.1 * weights(d, seed=seed + 12),
         "split": np.array([0, 0, 2, 4]), "merge": np.array([0, 0, 8]), "scale": np.array(0.5),
         "one": np.array(1.0), "big": np.array(-10000.0), "axes": np.array([1, 2])}
    return parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,6,8] x0, int64[N,6] attention_mask) => (float[N,6,8] y) {
      x = MatMul (x0, we)
      q = MatMul (x, wq)
      k = MatMul (x, wk)
      v = MatMul (x, wv)
      qh = Reshape (q, split)
      kh = Reshape (k, split)
      vh = Reshape (v, split)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      kt = Transpose <perm = [0, 2, 3, 1]> (kh)
      vt = Transpose <perm = [0, 2, 1, 3]> (vh)
      s = MatMul (qt, kt)
      sc = Mul (s, scale)
      mf = Cast <to = 1> (attention_mask)
      inv = Sub (one, mf)
      neg = Mul (inv, big)
      bias = Unsqueeze (neg, axes)
      sm = Add (sc, bias)
      p = Softmax <axis = -1> (sm)
      o = MatMul (p, vt)
      ot = Transpose <perm = [0, 2, 1, 3]> (o)
      om = Reshape (ot, merge)
      a0 = MatMul (om, wo)
      a = Add (a0, bo)
      h1 = Add (x, a)
      n1 = LayerNormalization <axis = -1> (h1, g1, b1)
      u0 = MatMul (n1, w1)
      u = Add (u0, c1)
      r = Relu (u)
      d0 = MatMul (r, w2)
      dd = Add (d0, c2)
      h2 = Add (n1, dd)
      y = LayerNormalization <axis = -1> (h2, g2, b2)
    }""", **w)


def sequences(count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` sequences: 2 to 6 real tokens then padding; one token in five with an 8x stream."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, TOKENS, WIDTH)).astype(np.float32)
    x *= np.where(rng.random((count, TOKENS, 1)) < 0.2, 8.0, 1.0).astype(np.float32)
    lengths = rng.integers(2, TOKENS + 1, count)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x0": x, "attention_mask": mask}


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **sequences(300, 1))
    return path


def activations(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v, dtype=np.float64) for v in session.run(names, feed)]


def context(model: onnx.ModelProto, path: Path, allocation: str = "damage") -> Context:
    analysis = api.analyze(model)
    data = load_calibration(str(path), input_specs(analysis.model, analysis.input_shapes))
    params = {"target_macs": 0.6, "budget_allocation": allocation}
    return Context(analysis.model, analysis.graph, analysis.trace, Options(method="obs", params=params),
                   analysis.input_shapes, analysis.opset, data)


def test_the_token_mask_is_the_attention_mask_input() -> None:
    assert ir.token_mask_input(encoder()) == "attention_mask"
    without = onnx.ModelProto.FromString(encoder().SerializeToString())
    without.graph.input[1].name = "segments"
    assert ir.token_mask_input(without) is None


def test_weighted_grams_leave_padding_out_and_weigh_each_token_by_its_norm(calib: Path) -> None:
    """The FFN-down input's covariance with RowWeights(mask, h2): numpy's weighted covariance of the real tokens'
    rows with weights ``1 / var_t(h2)``, to 1e-6 relative (float32 products); rows = real tokens; the norm energy is
    the mean of ``z^2`` per channel over them."""
    model = encoder()
    ctx = context(model, calib)
    with np.load(calib) as data:
        feed = {k: data[k] for k in data.files}
    r, h2 = activations(model, feed, ["r", "h2"])
    real = feed["attention_mask"].reshape(-1) != 0
    rows, stream = r.reshape(-1, FFN)[real], h2.reshape(-1, WIDTH)[real]
    w = 1.0 / stream.var(axis=1)
    mean = w @ rows / w.sum()
    want = (rows - mean).T @ ((rows - mean) * w[:, None]) / w.sum()
    z = (stream - stream.mean(axis=1, keepdims=True)) / stream.std(axis=1, keepdims=True)

    stat = SampledGrams([("down", "r", FFN, lambda x, _rng: x.reshape(-1, FFN))], seed=0, chunk=0, settings="t",
                        weights={"down": RowWeights("attention_mask", "h2")})
    collect(ctx.model, ctx.calibration, [stat], 32)
    (cov, got_mean), = stat.take_covariances().values()
    np.testing.assert_allclose(cov, want, rtol=1e-6, atol=1e-7 * float(np.trace(want)))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-7)
    assert stat.rows["down"] == int(real.sum()) < real.size
    assert stat.mean_weight["down"] == pytest.approx(float(w.mean()), rel=1e-9)
    np.testing.assert_allclose(stat.norm_energy["down"], np.mean(z**2, axis=0), rtol=1e-6)


def layer_norm(h: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mu, var = h.mean(axis=-1, keepdims=True), h.var(axis=-1, keepdims=True)
    return gamma * (h - mu) / np.sqrt(var + 1e-5) + beta


def test_the_ln_weighted_damage_is_the_error_after_the_layernorm(calib: Path) -> None:
    """For the FFN group removed in a fixed order, the damage at every width is the relative error after the output
    LayerNorm of refitting `down` (least squares weighted by ``1 / sigma_t^2``, real tokens only) from the kept
    neurons: ``mean_t ||gamma (e_t - mean e_t)||^2 / sigma_t^2`` over the norm's output energy, to 2% (the refit's
    ridge); the LayerNorm computed exactly on the refitted stream loses between 70% and 100% of it (it also removes
    the error's component along each token's own normalised vector, one of 8 directions here, 1 of 384 in MiniLM)."""
    model = encoder()
    ctx = context(model, calib)
    consumers = datadriven.group_consumers(ctx)
    group = next(g for g in ctx.trace.groups if any(m.node == "MatMul_25" and m.role == "out" for m in g.members))
    (down,) = consumers[group.index]
    info = datadriven.RowInfo({}, {}, {}, {})
    cov = datadriven.input_covariances(ctx, [down.layer], info=info)
    assert list(info.weights.values()) == [RowWeights("attention_mask", "h2")]
    scales = datadriven.norm_scales(ctx, [down.layer], info)
    scores = {group.index: np.arange(FFN, dtype=np.float64)}
    table = datadriven.damage_table(ctx, scores, consumers, cov, scales, info.rows)[group.index]

    with np.load(calib) as data:
        feed = {k: data[k] for k in data.files}
    r, n1, h2 = activations(model, feed, ["r", "n1", "h2"])
    real = feed["attention_mask"].reshape(-1) != 0
    r, n1, h2 = r.reshape(-1, FFN)[real], n1.reshape(-1, WIDTH)[real], h2.reshape(-1, WIDTH)[real]
    gamma = ir.to_array(next(t for t in model.graph.initializer if t.name == "g2")).astype(np.float64)
    beta = ir.to_array(next(t for t in model.graph.initializer if t.name == "b2")).astype(np.float64)
    sigma2 = h2.var(axis=1)
    w = 1.0 / sigma2
    z = (h2 - h2.mean(axis=1, keepdims=True)) / np.sqrt(sigma2)[:, None]
    energy = float(np.sum(gamma**2 * np.mean(z**2, axis=0)))
    target = h2 - n1  # the residual target: what `down` (and its bias) must add
    original = layer_norm(h2, gamma, beta)
    exact_energy = float(np.mean(np.sum((original - beta) ** 2, axis=1)))
    for k in range(1, FFN - 2):
        kept = r[:, k:]
        design = np.concatenate([kept, np.ones((kept.shape[0], 1))], axis=1)
        coef = np.linalg.solve(design.T @ (design * w[:, None]), design.T @ (target * w[:, None]))
        e = design @ coef - target
        centred = e - e.mean(axis=1, keepdims=True)
        predicted = float(np.mean(np.sum((gamma * centred) ** 2, axis=1) / sigma2)) / energy
        assert table.damage[k] == pytest.approx(predicted, rel=0.02), k
        after = layer_norm(n1 + design @ coef, gamma, beta)
        measured = float(np.mean(np.sum((after - original) ** 2, axis=1))) / exact_energy
        assert 0.7 * table.damage[k] <= measured <= table.damage[k], k
    assert table.damage[FFN - 1] > table.damage[1] > 0


def test_a_ranking_weighs_the_rows_of_its_selection_by_the_mask_alone(calib: Path) -> None:
    """With the budget shared by the ranking, the statistics leave padding out but weigh every real token alike."""
    ctx = context(encoder(), calib, "ranking")
    (down,) = datadriven.group_consumers(ctx)[next(g.index for g in ctx.trace.groups if g.size == FFN)]
    info = datadriven.RowInfo({}, {}, {}, {})
    datadriven.input_covariances(ctx, [down.layer], info=info)
    assert list(info.weights.values()) == [RowWeights("attention_mask", None)] and not info.norm_energy


def test_a_post_layernorm_transformer_shares_its_budget_by_damage(calib: Path) -> None:
    """Heads and FFN write into sums read by LayerNorms: damage is the default allocation, with token weights (the
    damage after the norms) or without them; the ranking when asked; and the plan by damage meets the budget."""
    model = encoder()
    analysis = api.analyze(model)
    data = load_calibration(str(calib), input_specs(analysis.model, analysis.input_shapes))

    def ctx(**params: object) -> Context:
        return Context(analysis.model, analysis.graph, analysis.trace,
                       Options(method="obs", params={"target_macs": 0.6, **params}), analysis.input_shapes,
                       analysis.opset, data)

    assert datadriven.by_damage(ctx()) and datadriven.damage_after_norms(ctx())
    assert datadriven.by_damage(ctx(token_weights=False)) and not datadriven.damage_after_norms(ctx(token_weights=False))
    assert not datadriven.by_damage(ctx(budget_allocation="ranking"))
    result = prune(model, "obs", calib=str(calib), params={"target_macs": 0.6}, seed=0, latency=False)
    assert any("by predicted damage" in note for note in result.report.notes)
    assert result.report.after.macs / result.report.before.macs == pytest.approx(0.6, abs=0.01)


def test_without_token_weights_the_damage_counts_every_row_alike(calib: Path) -> None:
    """``--no-token-weights``: no row weights, and the damage is the plain residual over the sum's variance."""
    model = encoder()
    analysis = api.analyze(model)
    data = load_calibration(str(calib), input_specs(analysis.model, analysis.input_shapes))
    ctx = Context(analysis.model, analysis.graph, analysis.trace,
                  Options(method="obs", params={"target_macs": 0.6, "token_weights": False}),
                  analysis.input_shapes, analysis.opset, data)
    (down,) = datadriven.group_consumers(ctx)[next(g.index for g in ctx.trace.groups if g.size == FFN)]
    assert datadriven.row_weights(ctx, down.layer) is None


def test_the_verdict_and_the_refit_leave_padding_out(calib: Path) -> None:
    """obs at 60% of the MACs: the verdict's cosine is numpy's over the real tokens only, and the model refitted on
    real tokens has a lower error there than the one refitted on every row (``--no-token-weights``), on unseen data."""
    model = encoder()
    weighted = prune(model, "obs", calib=str(calib), params={"target_macs": 0.6}, seed=0, latency=False)
    plain = prune(model, "obs", calib=str(calib), params={"target_macs": 0.6, "token_weights": False}, seed=0,
                  latency=False)
    feed = sequences(200, 7)
    keep = feed["attention_mask"] != 0
    (a,) = activations(model, feed, ["y"])

    def real_error(pruned: onnx.ModelProto) -> float:
        (b,) = activations(pruned, feed, ["y"])
        return float(np.sum((a - b)[keep] ** 2) / np.sum(a[keep] ** 2))

    assert real_error(weighted.model) < real_error(plain.model)
    (b,) = activations(weighted.model, feed, ["y"])
    (agreement,) = validate.compare(model, weighted.model, [feed])
    cosine = float(np.sum(a[keep] * b[keep]) / np.sqrt(np.sum(a[keep] ** 2) * np.sum(b[keep] ** 2)))
    assert agreement.cosine == pytest.approx(cosine, rel=1e-6)
    assert agreement.cosine != pytest.approx(float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))), rel=1e-6)


def test_a_batch_without_padding_is_not_weighed() -> None:
    """A language model's full windows (mask all 1) take the unweighted path: the same numbers as without a mask."""
    spec = RowWeights("attention_mask")
    assert spec.of({"attention_mask": np.ones((2, 3), dtype=np.int64)}, 6) is None
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(spec.of({"attention_mask": mask}, 6), [1, 1, 0, 1, 0, 0])
    assert spec.of({"attention_mask": mask}, 5) is None  # rows that are not the mask's tokens: no weights
