"""Least-squares reconstruction (`methods.reconstruct`): exactness oracles, bias handling, wiring.

Oracle: when a pruned channel is an exact affine combination of kept ones and nothing
nonlinear sits between it and its consumer, the refitted consumer reproduces the original
outputs (to float32 rounding). These exactness oracles test the least-squares maths, so they
run with the row-scaled ridge off (``exact_least_squares``: ``c = 0``, alpha = 1e-6): with the
default ``c`` a solve of a few rows per unknown is deliberately pulled toward plain pruning
and is no longer exact. On the trained LeNet the refit must reduce the output error of plain
pruning with the same selection.

Ridge oracles (`test_*ridge*`, a Gemm after a ReLU, held-out inputs from the same
distribution): with fewer calibration rows than unknowns the refit is no worse than plain
pruning while the old near-unregularised fit toward zero is much worse; with plenty of rows it
matches the exact least-squares solution; an infinite ridge is plain pruning (bias corrected
for the mean shift).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLE_FMNIST, SAMPLE_LENET
from onnxslim_prune import api
from onnxslim_prune.methods import base as methods
from onnxslim_prune.methods.base import Context, MethodSpec, MethodOutcome
from onnxslim_prune.methods import reconstruct
from onnxslim_prune.methods.budget import choose_plan
from onnxslim_prune.analysis.plan import GroupPlan, Plan
from onnxslim_prune.analysis.score import score_groups

OLD_FIT = reconstruct.fit
CNN_FOLDS = reconstruct.DEFAULT_CNN_RIDGE_FOLDS  # the default, before `_fixed_ridge` turns it off
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(autouse=True)
def _fixed_ridge(monkeypatch: pytest.MonkeyPatch) -> None:
    """These oracles test least squares and the row-scaled ridge: the CNN's cross-validated ridge is off (tested
    on its own in `test_a_cnn_refit_cross_validates_its_ridge`)."""
    monkeypatch.setattr(reconstruct, "DEFAULT_CNN_RIDGE_FOLDS", 0)


def _no_holdout(real: Callable[..., api.PruneResult]) -> Callable[..., api.PruneResult]:
    return lambda *a, **k: real(*a, **{"holdout": 0.0, "latency": False, **k})


@pytest.fixture(autouse=True)
def _fit_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """These oracles count rows and compare against their own held-out data: every calibration sample is fitted."""
    monkeypatch.setattr(api, "prune", _no_holdout(api.prune))


# ----------------------------------------------------------------------------- helpers


def make_model(nodes: list[onnx.NodeProto], x: tuple[str, list], y: tuple[str, list], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(x[0], TensorProto.FLOAT, x[1])],
        [helper.make_tensor_value_info(y[0], TensorProto.FLOAT, y[1])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x})[0]


def save_calib(path: Path, x: np.ndarray, name: str = "x") -> Path:
    np.savez(path, **{name: x})
    return path


@pytest.fixture
def exact_least_squares(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit without the row-scaled ridge (``c = 0``): the exactness oracles test least squares."""
    monkeypatch.setattr(reconstruct, "DEFAULT_RIDGE_ROWS", 0.0)


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, Callable[[Context], MethodOutcome]], str]]:
    """Register a temporary method (removed after the test)."""

    def add(name: str, fn: Callable[[Context], MethodOutcome]) -> str:
        monkeypatch.setitem(methods.METHODS, name, MethodSpec(name, "a test method", run=fn))
        return name

    yield add


def remove_channels(channels: tuple[int, ...], reconstructed: bool = True) -> Callable[[Context], MethodOutcome]:
    """A method removing `channels` (positions) of the first prunable group, refitted or not."""

    def method(ctx: Context) -> MethodOutcome:
        group = next(g for g in ctx.trace.groups if not g.is_frozen)
        plan = Plan((GroupPlan(group.index, group.size, tuple(group.classes[c] for c in channels)),))
        outcome = MethodOutcome(plan)
        return reconstruct.with_reconstruction(ctx, outcome) if reconstructed else outcome

    return method


# ----------------------------------------------------------------------------- exactness oracles


def conv_pair(bias2: bool = True, matching_bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,10,10] -> Conv1(6, 3x3, pad 1) -> Conv2(5, 3x3, stride 2); filter 3 = 0.5 f0 + 2 f1.

    With a matching bias channel 3 is exactly ``0.5 y0 + 2 y1``, so Conv2 may pad its input
    (padding zeros keep the relation). With a different bias it is that plus a constant,
    which a bias absorbs only where no padding replaces it: Conv2 then does not pad.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 3, 3, 3)) * 0.3
    b1 = rng.standard_normal(6) * 0.3
    w1[3] = 0.5 * w1[0] + 2.0 * w1[1]
    b1[3] = 0.5 * b1[0] + 2.0 * b1[1] + (0.0 if matching_bias else 0.7)
    weights = {"w1": w1, "b1": b1, "w2": rng.standard_normal((5, 6, 3, 3)) * 0.3}
    inputs2 = ["y1", "w2"]
    if bias2:
        weights["b2"] = rng.standard_normal(5) * 0.3
        inputs2.append("b2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", inputs2, ["y"], name="conv2", pads=[1, 1, 1, 1] if matching_bias else [0, 0, 0, 0],
                         strides=[2, 2]),
    ]
    side = 5 if matching_bias else 4
    return make_model(nodes, ("x", ["N", 3, 10, 10]), ("y", ["N", 5, side, side]), weights)


@pytest.mark.parametrize(("bias2", "matching"), [(True, True), (False, True), (False, False), (True, False)])
@pytest.mark.usefixtures("exact_least_squares")
def test_conv_exact_combination_is_restored(tmp_path: Path, register, bias2: bool, matching: bool) -> None:
    model = conv_pair(bias2=bias2, matching_bias=matching)
    x = np.random.default_rng(1).standard_normal((48, 3, 10, 10)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    plain = api.prune(
        model, register("_plain", remove_channels((3,), False)), calib=calib, params={"reconstruct": False}
    )
    fitted = api.prune(model, register("_fit", remove_channels((3,))), calib=calib)
    reference = run(model, x)
    assert np.abs(run(plain.model, x) - reference).max() > 0.1  # pruning alone changes the output
    assert np.abs(run(fitted.model, x) - reference).max() < 1e-4
    conv2 = next(n for n in fitted.model.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3  # an intercept was added when the layer had no bias


@pytest.mark.usefixtures("exact_least_squares")
def test_conv_exact_with_sampled_positions_and_small_batches(tmp_path: Path, register) -> None:
    model = conv_pair()
    x = np.random.default_rng(2).standard_normal((24, 3, 10, 10)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    fitted = api.prune(
        model, register("_fit", remove_channels((3,))), calib=calib, batch_size=5, params={"calib_positions": 6}
    )
    assert np.abs(run(fitted.model, x) - run(model, x)).max() < 1e-4


def gemm_pair(alpha: float, trans_b: int, with_c: bool) -> onnx.ModelProto:
    """x[N,8] -> Gemm1(6) -> Gemm2(4, alpha, transB, C?); unit 2 of Gemm1 = u0 - 3 u1 + 0.25."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((6, 8))
    b1 = rng.standard_normal(6)
    w1[2] = w1[0] - 3.0 * w1[1]
    b1[2] = b1[0] - 3.0 * b1[1] + 0.25
    w2 = rng.standard_normal((4, 6)) * 0.5
    weights = {"w1": w1, "b1": b1, "w2": w2 if trans_b else w2.T}
    inputs = ["h", "w2"]
    if with_c:
        weights["c2"] = rng.standard_normal(4)
        inputs.append("c2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
        helper.make_node("Gemm", inputs, ["y"], name="g2", transB=trans_b, alpha=alpha, beta=0.5),
    ]
    return make_model(nodes, ("x", ["N", 8]), ("y", ["N", 4]), weights)


@pytest.mark.parametrize(("alpha", "trans_b", "with_c"), [(1.0, 1, True), (0.5, 0, True), (2.0, 1, False)])
@pytest.mark.usefixtures("exact_least_squares")
def test_gemm_exact_combination_is_restored(tmp_path: Path, register, alpha: float, trans_b: int, with_c: bool) -> None:
    model = gemm_pair(alpha, trans_b, with_c)
    x = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    fitted = api.prune(model, register("_fit", remove_channels((2,))), calib=calib)
    assert np.abs(run(fitted.model, x) - run(model, x)).max() < 1e-4


@pytest.mark.usefixtures("exact_least_squares")
def test_matmul_with_bias_add_is_restored(tmp_path: Path, register) -> None:
    """x[N,T,8] -> MatMul(6) + b -> MatMul(4) + c: the Add constant is the refitted bias."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 6))
    b1 = rng.standard_normal(6)
    w1[:, 5] = 2.0 * w1[:, 0] + w1[:, 3]
    b1[5] = 2.0 * b1[0] + b1[3] - 1.0
    weights = {"w1": w1, "b1": b1, "w2": rng.standard_normal((6, 4)), "b2": rng.standard_normal(4)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("MatMul", ["h", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    model = make_model(nodes, ("x", ["N", 5, 8]), ("y", ["N", 5, 4]), weights)
    x = rng.standard_normal((16, 5, 8)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    fitted = api.prune(model, register("_fit", remove_channels((5,))), calib=calib)
    assert np.abs(run(fitted.model, x) - run(model, x)).max() < 1e-4


@pytest.mark.usefixtures("exact_least_squares")
def test_residual_target_restores_an_add(tmp_path: Path, register) -> None:
    """conv0 -> relu -> a; conv1(a) -> b; Add(conv2(b), a): pruning b's channel 3 (= 0.5 c0 + 2 c1) is exact."""
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((6, 4, 3, 3)) * 0.3
    w1[3] = 0.5 * w1[0] + 2.0 * w1[1]
    weights = {
        "w0": rng.standard_normal((4, 2, 3, 3)) * 0.5, "w1": w1, "w2": rng.standard_normal((4, 6, 1, 1)) * 0.3,
        "b2": rng.standard_normal(4) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a"], name="relu0"),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "a"], ["y"], name="add"),
    ]
    model = make_model(nodes, ("x", ["N", 2, 6, 6]), ("y", ["N", 4, 6, 6]), weights)
    x = rng.standard_normal((32, 2, 6, 6)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)

    def method(ctx: Context) -> MethodOutcome:
        group = next(g for g in ctx.trace.groups if any(m.node == "conv1" and m.role == "out" for m in g.members))
        plan = Plan((GroupPlan(group.index, group.size, (group.classes[3],)),))
        return reconstruct.with_reconstruction(ctx, MethodOutcome(plan))

    fitted = api.prune(model, register("_fit", method), calib=calib)
    assert np.abs(run(fitted.model, x) - run(model, x)).max() < 1e-4


# ----------------------------------------------------------------------------- units


def test_fit_recovers_an_affine_map_and_ldrf_projection() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 6))
    w = rng.standard_normal((6, 3))
    y = x @ w + np.array([1.0, -2.0, 0.5])
    acc = reconstruct.GramAccumulator(6, 3, full_yty=True)
    for rows in np.array_split(np.arange(500), 7):
        acc.update(x[rows], y[rows])
    w_fit, b_fit = reconstruct.fit(acc, intercept=True, ridge=0.0, energy=None)
    np.testing.assert_allclose(w_fit, w, atol=1e-9)
    np.testing.assert_allclose(b_fit, [1.0, -2.0, 0.5], atol=1e-9)
    # a rank-1 output: the principal subspace keeps it whole
    y1 = np.outer(x @ rng.standard_normal(6), [1.0, 2.0, -1.0])
    acc1 = reconstruct.GramAccumulator(6, 3, full_yty=True)
    acc1.update(x, y1)
    w1, b1 = reconstruct.fit(acc1, intercept=True, ridge=0.0, energy=0.99)
    np.testing.assert_allclose(x @ w1 + b1, y1, atol=1e-8)
    assert np.linalg.matrix_rank(w1, tol=1e-8) == 1


def test_principal_projector_energy() -> None:
    cov = np.diag([10.0, 1.0, 0.01])
    p = reconstruct.principal_projector(cov, 0.9)
    np.testing.assert_allclose(p, np.diag([1.0, 0.0, 0.0]), atol=1e-12)
    np.testing.assert_allclose(reconstruct.principal_projector(cov, 0.9995), np.diag([1.0, 1.0, 1.0]), atol=1e-12)


def test_subgraph_model_keeps_only_the_needed_nodes() -> None:
    model = onnx.load(SAMPLE_LENET)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    sub = reconstruct.subgraph_model(model, [relu.output[0]])
    assert [o.name for o in sub.graph.output] == [relu.output[0]]
    assert not any(n.op_type == "Gemm" and "f2" in n.name for n in sub.graph.node)
    with np.load(SAMPLE_FMNIST) as data:
        x = data["input"][:4]
    (value,) = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert value.shape == (4, 300) and value.min() >= 0.0


# ----------------------------------------------------------------------------- the ridge toward plain pruning

MLP_REMOVED = tuple(range(0, 48, 2))  # 24 of the 48 hidden units: the refit of g2 has 24 + 1 unknowns
MLP_KEPT = np.setdiff1d(np.arange(48), MLP_REMOVED)


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N,12] -> Gemm g1(48) -> Relu -> Gemm g2(6): the refit of g2 is a real regression (ReLU features)."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((48, 12)) / np.sqrt(12), "b1": rng.standard_normal(48) * 0.5,
        "w2": rng.standard_normal((48, 6)) / np.sqrt(48), "b2": rng.standard_normal(6) * 0.1,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2"),
    ]
    return make_model(nodes, ("x", ["N", 12]), ("y", ["N", 6]), weights)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def hidden(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The kept ReLU features of `mlp` (the refit's input rows), float64."""
    w = initializers(model)
    return np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0.0)[:, MLP_KEPT]


def old_fit(
    acc: reconstruct.GramAccumulator, intercept: bool, ridge: float, energy: float | None,
    prior: np.ndarray | None = None, per_row: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The refit before the row-scaled ridge: alpha = `ridge` (1e-6), toward zero weights."""
    return OLD_FIT(acc, intercept, ridge, energy)


def held_out_mse(model: onnx.ModelProto, reference: onnx.ModelProto, x: np.ndarray) -> float:
    return float(np.mean((run(model, x) - run(reference, x)) ** 2))


def test_ridge_with_fewer_rows_than_unknowns_is_no_worse_than_plain_pruning(
    tmp_path: Path, register, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 calibration rows for 25 unknowns, five draws (seeds 0-4); 2,000 held-out inputs each.

    Near ``rows = unknowns`` the near-unregularised fit interpolates its sample. Measured (c = 0.3),
    held-out error / plain pruning's: new 0.39 to 0.59, old 3.9 to 62 (median 7.4) over these seeds
    (over seeds 0-14: new <= 0.59, old >= 1.55, median 17); ``max |W|`` / ``max |W0|``: new <= 1.18,
    old 3.6 to 31.
    """
    model = mlp()
    plain_method = register("_plain", remove_channels(MLP_REMOVED, False))
    fit_method = register("_fit", remove_channels(MLP_REMOVED))
    new_ratio, old_ratio, old_size = [], [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        calib = save_calib(tmp_path / f"c{seed}.npz", rng.standard_normal((24, 12)).astype(np.float32))
        held = rng.standard_normal((2000, 12)).astype(np.float32)
        plain = api.prune(model, plain_method, calib=calib, holdout=0.0, params={"reconstruct": False})
        fitted = api.prune(model, fit_method, calib=calib, holdout=0.0)
        with monkeypatch.context() as m:
            m.setattr(reconstruct, "DEFAULT_RIDGE_ROWS", 0.0)
            m.setattr(reconstruct, "fit", old_fit)
            old = api.prune(model, fit_method, calib=calib, holdout=0.0)
        e_plain, e_fit, e_old = (held_out_mse(r.model, model, held) for r in (plain, fitted, old))
        new_ratio.append(e_fit / e_plain)
        old_ratio.append(e_old / e_plain)
        w0 = np.abs(initializers(model)["w2"][MLP_KEPT]).max()
        assert np.abs(initializers(fitted.model)["w2"]).max() <= 1.5 * w0  # the weights stay bounded
        old_size.append(np.abs(initializers(old.model)["w2"]).max() / w0)
        assert any("fewer sampled rows than unknowns" in n and "24 rows for 25 unknowns at g2" in n
                   for n in fitted.report.notes)
    assert max(new_ratio) <= 0.8, new_ratio  # no worse than plain pruning, in every draw
    assert float(np.median(old_ratio)) >= 3.0, old_ratio  # the old fit: much worse than plain pruning
    assert float(np.median(old_size)) >= 3.0, old_size  # ... with exploding weights


def test_ridge_with_plenty_of_rows_is_the_least_squares_refit(tmp_path: Path, register) -> None:
    """4,000 rows for 25 unknowns: alpha = 1e-6 + c * 24 / 4000, within 5% of the exact least squares."""
    model = mlp()
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4000, 12)).astype(np.float32)
    held = rng.standard_normal((2000, 12)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    plain = api.prune(model, register("_plain", remove_channels(MLP_REMOVED, False)), calib=calib,
                      params={"reconstruct": False})
    fitted = api.prune(model, register("_fit", remove_channels(MLP_REMOVED)), calib=calib)
    assert not any("fewer sampled rows" in n for n in fitted.report.notes)
    design = np.hstack([hidden(model, x), np.ones((x.shape[0], 1))])
    solution = np.linalg.lstsq(design, run(model, x).astype(np.float64), rcond=None)[0]
    w_ls, b_ls = solution[:-1], solution[-1]
    got = initializers(fitted.model)
    # measured (c = 0.3): 0.55% of |W_ls| (1.7% with c = 1: the shrinkage scales as c * dim / rows)
    assert np.linalg.norm(got["w2"] - w_ls) <= 0.05 * np.linalg.norm(w_ls)
    ls_out = hidden(model, held) @ w_ls + b_ls
    e_ls = float(np.mean((ls_out - run(model, held)) ** 2))
    e_fit = held_out_mse(fitted.model, model, held)
    assert e_fit <= 1.01 * e_ls, (e_fit, e_ls)  # measured 1.00003
    assert e_fit <= 0.5 * held_out_mse(plain.model, model, held)  # measured 0.24


def test_infinite_ridge_is_plain_pruning_with_the_mean_shift_in_the_bias(tmp_path: Path, register) -> None:
    model = mlp()
    x = np.random.default_rng(13).standard_normal((20, 12)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    fitted = api.prune(model, register("_fit", remove_channels(MLP_REMOVED)), calib=calib, params={"ridge": 1e12})
    w, got = initializers(model), initializers(fitted.model)
    w0 = w["w2"][MLP_KEPT]
    np.testing.assert_array_equal(got["w2"], w0.astype(np.float32))  # the weights of plain pruning, exactly
    residual = run(model, x).astype(np.float64) - hidden(model, x) @ w0 - w["b2"]
    np.testing.assert_allclose(got["b2"], w["b2"] + residual.mean(axis=0), atol=1e-6)  # the intercept is free


def test_infinite_ridge_without_intercept_is_plain_pruning_exactly(tmp_path: Path, register) -> None:
    """A MatMul without a bias Add is fitted through the origin: lam -> inf leaves it as plain pruning."""
    rng = np.random.default_rng(14)
    weights = {"w1": rng.standard_normal((8, 10)), "w2": rng.standard_normal((10, 4))}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    model = make_model(nodes, ("x", ["N", 8]), ("y", ["N", 4]), weights)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    plain = api.prune(model, register("_plain", remove_channels((1, 4, 7), False)), calib=calib,
                      params={"reconstruct": False})
    fitted = api.prune(model, register("_fit", remove_channels((1, 4, 7))), calib=calib, params={"ridge": 1e12})
    held = rng.standard_normal((100, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(fitted.model, held), run(plain.model, held))


def moments(x: np.ndarray, y: np.ndarray, full_yty: bool = False) -> reconstruct.GramAccumulator:
    acc = reconstruct.GramAccumulator(x.shape[1], y.shape[1], full_yty=full_yty)
    acc.update(x, y)
    return acc


def test_fit_shrinks_toward_the_prior_by_the_row_scaled_ridge() -> None:
    """``W = (S_xx + lam I)^-1 (S_xy + lam W0)``, ``lam = (ridge + c dim / n) tr(S_xx) / dim``."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((30, 10)) * np.linspace(0.5, 2.0, 10)
    y = x @ rng.standard_normal((10, 3)) + rng.standard_normal((30, 3))
    prior = rng.standard_normal((10, 3))
    w, b = reconstruct.fit(moments(x, y), True, 1e-3, None, prior=prior, per_row=0.7)
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, sxy = xc.T @ xc / 30, xc.T @ yc / 30
    lam = (1e-3 + 0.7 * 10 / 30) * np.trace(sxx) / 10
    np.testing.assert_allclose(w, np.linalg.solve(sxx + lam * np.eye(10), sxy + lam * prior), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ w, atol=1e-12)
    assert reconstruct.ridge_lambda(sxx, 1e-3, 30, 0.7) == pytest.approx(lam)
    assert reconstruct.ridge_lambda(sxx, 1e-3) == pytest.approx(1e-3 * np.trace(sxx) / 10)  # rows unknown: base alpha
    w_inf, _ = reconstruct.fit(moments(x, y), True, np.inf, None, prior=prior)
    np.testing.assert_array_equal(w_inf, prior)


def test_ldrf_fit_projects_the_target_and_keeps_the_prior_whole() -> None:
    """LDRF: ``W = (S_xx + lam I)^-1 (S_xy U U^T + lam W0)``: lam -> 0 is ``W_ls U U^T``, lam -> inf is ``W0``."""
    rng = np.random.default_rng(16)
    x = rng.standard_normal((400, 6))
    y = x @ rng.standard_normal((6, 4)) * np.array([3.0, 2.0, 0.05, 0.01]) + 0.01 * rng.standard_normal((400, 4))
    prior = rng.standard_normal((6, 4))
    acc = moments(x, y, full_yty=True)
    sxx, sxy = reconstruct.centred(acc)
    assert sxy is not None
    cov_y = acc.yty / acc.count - np.outer(acc.mean_y, acc.mean_y)
    projector = reconstruct.principal_projector(cov_y, 0.99)
    assert 0 < np.trace(projector) < 4  # a proper subspace
    w0_, _ = reconstruct.fit(acc, True, 0.0, 0.99, prior=prior)
    np.testing.assert_allclose(w0_, np.linalg.solve(sxx, sxy) @ projector, atol=1e-9)  # as before the ridge
    w_inf, _ = reconstruct.fit(acc, True, np.inf, 0.99, prior=prior)
    np.testing.assert_array_equal(w_inf, prior)
    w_mid, _ = reconstruct.fit(acc, True, 0.5, 0.99, prior=prior)
    lam = reconstruct.ridge_lambda(sxx, 0.5)
    np.testing.assert_allclose(w_mid, np.linalg.solve(sxx + lam * np.eye(6), sxy @ projector + lam * prior), atol=1e-9)


def mlp3(seed: int = 0) -> onnx.ModelProto:
    """x[N,12] -> Gemm(48) -> Relu -> Gemm(32) -> Relu -> Gemm(6): two refitted layers at ratio 0.5."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((12, 48)), "w2": rng.standard_normal((48, 32)) / 7,
        "w3": rng.standard_normal((32, 6)) / 6, "b1": rng.standard_normal(48), "b2": rng.standard_normal(32),
        "b3": rng.standard_normal(6),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="g1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="g2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="g3"),
    ]
    return make_model(nodes, ("x", ["N", 12]), ("y", ["N", 6]), weights)


def test_short_of_rows_is_one_warning_per_reconstruction(tmp_path: Path, register, caplog: pytest.LogCaptureFixture) -> None:
    model = mlp3()

    def method(ctx: Context) -> MethodOutcome:
        return reconstruct.with_reconstruction(ctx, MethodOutcome(choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1"))))

    name = register("_m", method)
    x = np.random.default_rng(17).standard_normal((10, 12)).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnxslim_prune.methods.reconstruct"):
        result = api.prune(model, name, 0.5, calib=save_calib(tmp_path / "c.npz", x))
    warned = [r.getMessage() for r in caplog.records if "fewer sampled rows" in r.getMessage()]
    assert len(warned) == 1, warned  # two short layers, one warning
    assert warned[0].startswith("reconstruction: 2 of 2 layers have fewer sampled rows than unknowns (worst: 10 rows for 25")
    assert "plain pruning" in warned[0] and "--calib-positions" not in warned[0]  # a Gemm has one row per sample
    assert warned[0] in result.report.notes
    caplog.clear()
    x = np.random.default_rng(18).standard_normal((200, 12)).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnxslim_prune.methods.reconstruct"):
        result = api.prune(model, name, 0.5, calib=save_calib(tmp_path / "d.npz", x))
    assert not [r for r in caplog.records if "fewer sampled rows" in r.getMessage()]
    assert not any("fewer sampled rows" in n for n in result.report.notes)


def test_planned_rows_of_a_conv_are_the_rows_it_is_fitted_on(tmp_path: Path, register, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 images x 6 sampled positions = 24 rows for conv2's 5 x 9 + 1 unknowns: the note counts what the fit sees."""
    seen: list[int] = []

    def counting_fit(acc: reconstruct.GramAccumulator, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        seen.append(acc.count)
        return OLD_FIT(acc, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reconstruct, "fit", counting_fit)
    x = np.random.default_rng(19).standard_normal((4, 3, 10, 10)).astype(np.float32)
    result = api.prune(conv_pair(), register("_fit", remove_channels((3,))), calib=save_calib(tmp_path / "c.npz", x),
                       batch_size=3, params={"calib_positions": 6})
    assert seen == [24]
    note = next(n for n in result.report.notes if "fewer sampled rows" in n)
    assert "1 of 1 layers" in note and "(worst: 24 rows for 46 unknowns at conv2)" in note and "--calib-positions" in note


# ----------------------------------------------------------------------------- wiring and the trained LeNet


def test_lenet_reconstruction_beats_plain_pruning_on_the_same_selection(register) -> None:
    with np.load(SAMPLE_FMNIST) as data:
        x = data["input"]
    reference = run(onnx.load(SAMPLE_LENET), x)
    errors = {}
    for name, rebuilt in (("_plain", False), ("_fit", True)):

        def method(ctx: Context, rebuilt: bool = rebuilt) -> MethodOutcome:
            outcome = MethodOutcome(choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1")))
            return reconstruct.with_reconstruction(ctx, outcome) if rebuilt else outcome

        result = api.prune(SAMPLE_LENET, register(name, method), 0.7, calib=SAMPLE_FMNIST, params={"reconstruct": rebuilt})
        errors[name] = float(np.mean((run(result.model, x) - reference) ** 2))
        plan = result.plan
    assert errors["_fit"] < 0.5 * errors["_plain"], errors
    assert plan.groups  # same selection both times: the l1 plan


def test_reconstruction_respects_no_reconstruct_and_is_not_applied_twice(register) -> None:
    seen: list[MethodOutcome] = []

    def method(ctx: Context) -> MethodOutcome:
        outcome = MethodOutcome(choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1")))
        once = reconstruct.with_reconstruction(ctx, outcome)
        twice = reconstruct.with_reconstruction(ctx, once)
        seen.extend([outcome, once, twice])
        return once

    api.prune(SAMPLE_LENET, register("_m", method), 0.5, calib=SAMPLE_FMNIST, params={"reconstruct": False})
    assert seen[1] is seen[0]  # --no-reconstruct: untouched
    seen.clear()
    api.prune(SAMPLE_LENET, register("_m", method), 0.5, calib=SAMPLE_FMNIST)
    assert isinstance(seen[1].finish, reconstruct.Reconstructor)
    assert seen[2] is seen[1]


def test_a_method_finish_runs_before_the_refit(register) -> None:
    calls: list[str] = []

    def first(model: onnx.ModelProto) -> onnx.ModelProto:
        calls.append("first")
        return model

    def method(ctx: Context) -> MethodOutcome:
        plan = choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1"))
        return reconstruct.with_reconstruction(ctx, MethodOutcome(plan, finish=first))

    api.prune(SAMPLE_LENET, register("_m", method), 0.5, calib=SAMPLE_FMNIST)
    assert calls == ["first"]


def test_depthwise_consumers_are_noted_and_pointwise_refitted(tmp_path: Path, register) -> None:
    """conv1 -> depthwise -> pointwise: the depthwise conv is sliced, the pointwise one refitted."""
    rng = np.random.default_rng(8)
    weights = {
        "w1": rng.standard_normal((4, 2, 3, 3)) * 0.5, "wd": rng.standard_normal((4, 1, 3, 3)) * 0.5,
        "wp": rng.standard_normal((3, 4, 1, 1)) * 0.5,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Conv", ["d", "wp"], ["y"], name="pw"),
    ]
    model = make_model(nodes, ("x", ["N", 2, 6, 6]), ("y", ["N", 3, 6, 6]), weights)
    x = rng.standard_normal((16, 2, 6, 6)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    result = api.prune(model, register("_fit", remove_channels((1,))), calib=calib)
    assert any("dw" in note and "not refitted" in note for note in result.report.notes)
    pw = next(n for n in result.model.graph.node if n.name == "pw")
    assert len(pw.input) == 3  # refitted: it gained a bias


# ----------------------------------------------------------------------------- the ridge chosen by cross-validation


def fold_moments(x: np.ndarray, y: np.ndarray, folds: int) -> list[reconstruct.Moments]:
    """Row ``i`` in fold ``i mod folds``, as `reconstruct.FoldedGrams` puts sample ``i``."""
    out = []
    for k in range(folds):
        acc = reconstruct.GramAccumulator(x.shape[1], y.shape[1])
        acc.update(x[k::folds], y[k::folds])
        assert acc.sum_y is not None and acc.xty is not None
        out.append(reconstruct.Moments(acc.count, acc.sum_x, acc.sum_y, acc.xtx, acc.xty))
    return out


def regression(seed: int, noise: float, good_prior: bool) -> tuple[np.ndarray, ...]:
    """120 rows of 40 inputs -> 10 outputs, ``Y = X W + 1 + noise``; the prior near ``W`` or unrelated to it;
    5,000 noise-free held-out rows."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((40, 10)) / np.sqrt(40)
    prior = w + rng.standard_normal(w.shape) * 0.3 / np.sqrt(40) if good_prior else rng.standard_normal(w.shape) / np.sqrt(40)
    x = rng.standard_normal((120, 40)) + 0.5
    y = x @ w + 1.0 + noise * rng.standard_normal((120, 10))
    held = rng.standard_normal((5000, 40)) + 0.5
    return x, y, prior, held, held @ w + 1.0


def test_cross_validated_ridge_is_the_brute_force_choice() -> None:
    """`cv_fit`'s closed-form fold errors pick the alpha that refits on the rows themselves pick, and its weights
    are the ridge refit of every row at that alpha."""
    x, y, prior, _, _ = regression(0, 1.5, True)
    w, b, alpha = reconstruct.cv_fit(fold_moments(x, y, 4), True, 1e-6, 0.3, prior)
    base = reconstruct.ridge_alpha(1e-6, 40, 120, 0.3)
    errors = []
    for a in [*(base * reconstruct.CV_GRID), np.inf]:
        total = 0.0
        for k in range(4):
            keep = np.arange(120) % 4 != k
            xt, yt = x[keep], y[keep]
            sxx, sxy = np.cov(xt.T, bias=True), (xt - xt.mean(0)).T @ (yt - yt.mean(0)) / xt.shape[0]
            lam = a * np.trace(sxx) / 40
            wk = prior if not np.isfinite(a) else np.linalg.solve(sxx + lam * np.eye(40), sxy + lam * prior)
            total += float(np.sum((x[~keep] @ wk + yt.mean(0) - xt.mean(0) @ wk - y[~keep]) ** 2))
        errors.append(total)
    assert alpha == [*(base * reconstruct.CV_GRID), np.inf][int(np.argmin(errors))]
    assert base < alpha < np.inf  # noisy targets, a good prior: more ridge than the fixed rule, not plain pruning
    sxx, sxy = np.cov(x.T, bias=True), (x - x.mean(0)).T @ (y - y.mean(0)) / 120
    lam = alpha * np.trace(sxx) / 40
    expected = np.linalg.solve(sxx + lam * np.eye(40), sxy + lam * prior)
    np.testing.assert_allclose(w, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ expected, atol=1e-9)


@pytest.mark.parametrize(("noise", "good_prior", "most"), [(0.0, False, 0.01), (1.5, True, 0.3)])
def test_cross_validated_ridge_beats_the_fixed_one_on_held_out_rows(noise: float, good_prior: bool, most: float) -> None:
    """Three draws each. Exact targets and an unrelated prior: the folds choose less ridge than the fixed rule
    (measured held-out error / the fixed rule's: 4e-4); noisy targets and a prior near the truth: more (0.13 to 0.15)."""
    for seed in range(3):
        x, y, prior, held, target = regression(seed, noise, good_prior)
        w, b, alpha = reconstruct.cv_fit(fold_moments(x, y, 5), True, 1e-6, 0.3, prior)
        fixed_w, fixed_b, fixed_alpha = reconstruct.cv_fit(fold_moments(x, y, 1), True, 1e-6, 0.3, prior)
        assert fixed_alpha == reconstruct.ridge_alpha(1e-6, 40, 120, 0.3)  # one fold: the fixed rule
        assert (alpha < fixed_alpha) == (noise == 0.0)
        error = float(np.mean((held @ w + b - target) ** 2))
        fixed = float(np.mean((held @ fixed_w + fixed_b - target) ** 2))
        assert error <= most * fixed, (seed, error, fixed)


def test_cross_validated_ridge_in_a_refit(tmp_path: Path, register, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `api.prune` with ``DEFAULT_RIDGE_FOLDS = 5`` (an MLP: the CNN default does not apply) (70 samples in batches of 32): calibration sample ``i``
    goes to fold ``i mod 5`` across batches, so the refitted layer is `cv_fit` of those folds of its rows; the
    pruned model keeps the fixed rule's structure and runs."""
    model = mlp()
    fit_method = register("_fit", remove_channels(MLP_REMOVED))
    x = np.random.default_rng(3).standard_normal((70, 12)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    fixed = api.prune(model, fit_method, calib=calib)
    monkeypatch.setattr(reconstruct, "DEFAULT_RIDGE_FOLDS", 5)
    chosen = api.prune(model, fit_method, calib=calib)
    got = initializers(chosen.model)
    assert got["w2"].shape == initializers(fixed.model)["w2"].shape == (24, 6)
    w0 = initializers(model)["w2"][MLP_KEPT]
    w, b, alpha = reconstruct.cv_fit(fold_moments(hidden(model, x), run(model, x).astype(np.float64), 5), True, 1e-6,
                                     reconstruct.DEFAULT_RIDGE_ROWS, w0)
    np.testing.assert_allclose(got["w2"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["b2"], b, rtol=1e-4, atol=1e-5)
    held = np.random.default_rng(4).standard_normal((500, 12)).astype(np.float32)
    np.testing.assert_allclose(run(chosen.model, held), hidden(model, held) @ w + b, rtol=1e-4, atol=1e-4)


def conv_mlp() -> onnx.ModelProto:
    """`mlp` as 1x1 convolutions on ``x[N,12,1,1]``: the same function, a convolutional network."""
    w = initializers(mlp())
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2"),
    ]
    weights = {"w1": w["w1"][:, :, None, None], "b1": w["b1"], "w2": w["w2"].T[:, :, None, None], "b2": w["b2"]}
    return make_model(nodes, ("x", ["N", 12, 1, 1]), ("y", ["N", 6, 1, 1]), weights)


def test_a_cnn_refit_cross_validates_its_ridge(tmp_path: Path, register, monkeypatch: pytest.MonkeyPatch) -> None:
    """A convolutional network is refitted with the ridge chosen by `DEFAULT_CNN_RIDGE_FOLDS` (5) folds unless the
    run sets ``ridge``; the same layers as Gemms (an MLP) keep the fixed rule. The written weights are `cv_fit` of
    the kept ReLU features' folds, or `fit` at the fixed rule (float32 rounding)."""
    monkeypatch.setattr(reconstruct, "DEFAULT_CNN_RIDGE_FOLDS", CNN_FOLDS)  # the module's fixture turned it off
    assert CNN_FOLDS == 5
    fit_method = register("_fit", remove_channels(MLP_REMOVED))
    x = np.random.default_rng(3).standard_normal((70, 12)).astype(np.float32)
    features, target = hidden(mlp(), x), run(mlp(), x).astype(np.float64)
    w0 = initializers(mlp())["w2"][MLP_KEPT]
    acc = reconstruct.GramAccumulator(24, 6)
    acc.update(features, target)
    w_cv, b_cv, alpha = reconstruct.cv_fit(fold_moments(features, target, 5), True, reconstruct.DEFAULT_RIDGE,
                                           reconstruct.DEFAULT_RIDGE_ROWS, w0)
    fixed = reconstruct.ridge_alpha(reconstruct.DEFAULT_RIDGE, 24, 70, reconstruct.DEFAULT_RIDGE_ROWS)
    assert alpha != fixed
    for model, data, params, expected in (
        (conv_mlp(), x[:, :, None, None], {}, (w_cv, b_cv)),
        (conv_mlp(), x[:, :, None, None], {"ridge": 1e-3},
         reconstruct.fit(acc, True, 1e-3, None, prior=w0, per_row=reconstruct.DEFAULT_RIDGE_ROWS)),
        (mlp(), x, {}, reconstruct.fit(acc, True, reconstruct.DEFAULT_RIDGE, None, prior=w0,
                                       per_row=reconstruct.DEFAULT_RIDGE_ROWS)),
    ):
        got = initializers(api.prune(model, fit_method, calib=save_calib(tmp_path / "c.npz", data), params=params).model)
        w2 = got["w2"].reshape(6, 24).T if model.graph.node[0].op_type == "Conv" else got["w2"]
        np.testing.assert_allclose(w2, expected[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["b2"], expected[1], rtol=1e-4, atol=1e-5)
