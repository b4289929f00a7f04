"""Least-squares reconstruction (`passes.reconstruct`): exactness oracles, bias handling, wiring.

Oracle: when a pruned channel is an exact affine combination of kept ones and nothing
nonlinear sits between it and its consumer, the refitted consumer reproduces the original
outputs (to float32 rounding). On the trained LeNet the refit must reduce the output error
of plain pruning with the same selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import api
from onnxslim_prune.passes import methods, reconstruct
from onnxslim_prune.passes.methods import Context, Outcome
from onnxslim_prune.passes.plan import GroupPlan, Plan
from onnxslim_prune.passes.score import score_groups

SAMPLE = Path(api.__file__).resolve().parent / "sample"
LENET = SAMPLE / "lenet300.onnx"
FMNIST = SAMPLE / "fmnist_test500.npz"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path / "cache"))


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
def register(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, Callable[[Context], Outcome]], str]]:
    """Register a temporary method (removed after the test)."""

    def add(name: str, fn: Callable[[Context], Outcome]) -> str:
        monkeypatch.setitem(methods.METHODS, name, fn)
        return name

    yield add


def remove_channels(channels: tuple[int, ...], reconstructed: bool = True) -> Callable[[Context], Outcome]:
    """A method removing `channels` (positions) of the first prunable group, refitted or not."""

    def method(ctx: Context) -> Outcome:
        group = next(g for g in ctx.trace.groups if not g.is_frozen)
        plan = Plan((GroupPlan(group.index, group.size, tuple(group.classes[c] for c in channels)),))
        outcome = Outcome(plan)
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
def test_gemm_exact_combination_is_restored(tmp_path: Path, register, alpha: float, trans_b: int, with_c: bool) -> None:
    model = gemm_pair(alpha, trans_b, with_c)
    x = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float32)
    calib = save_calib(tmp_path / "c.npz", x)
    fitted = api.prune(model, register("_fit", remove_channels((2,))), calib=calib)
    assert np.abs(run(fitted.model, x) - run(model, x)).max() < 1e-4


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

    def method(ctx: Context) -> Outcome:
        group = next(g for g in ctx.trace.groups if any(m.node == "conv1" and m.role == "out" for m in g.members))
        plan = Plan((GroupPlan(group.index, group.size, (group.classes[3],)),))
        return reconstruct.with_reconstruction(ctx, Outcome(plan))

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
    model = onnx.load(LENET)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    sub = reconstruct.subgraph_model(model, [relu.output[0]])
    assert [o.name for o in sub.graph.output] == [relu.output[0]]
    assert not any(n.op_type == "Gemm" and "f2" in n.name for n in sub.graph.node)
    with np.load(FMNIST) as data:
        x = data["input"][:4]
    (value,) = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert value.shape == (4, 300) and value.min() >= 0.0


# ----------------------------------------------------------------------------- wiring and the trained LeNet


def test_lenet_reconstruction_beats_plain_pruning_on_the_same_selection(register) -> None:
    with np.load(FMNIST) as data:
        x = data["input"]
    reference = run(onnx.load(LENET), x)
    errors = {}
    for name, rebuilt in (("_plain", False), ("_fit", True)):

        def method(ctx: Context, rebuilt: bool = rebuilt) -> Outcome:
            outcome = Outcome(methods.choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1")))
            return reconstruct.with_reconstruction(ctx, outcome) if rebuilt else outcome

        result = api.prune(LENET, register(name, method), 0.7, calib=FMNIST, params={"reconstruct": rebuilt})
        errors[name] = float(np.mean((run(result.model, x) - reference) ** 2))
        plan = result.plan
    assert errors["_fit"] < 0.5 * errors["_plain"], errors
    assert plan.groups  # same selection both times: the l1 plan


def test_reconstruction_respects_no_reconstruct_and_is_not_applied_twice(register) -> None:
    seen: list[Outcome] = []

    def method(ctx: Context) -> Outcome:
        outcome = Outcome(methods.choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1")))
        once = reconstruct.with_reconstruction(ctx, outcome)
        twice = reconstruct.with_reconstruction(ctx, once)
        seen.extend([outcome, once, twice])
        return once

    api.prune(LENET, register("_m", method), 0.5, calib=FMNIST, params={"reconstruct": False})
    assert seen[1] is seen[0]  # --no-reconstruct: untouched
    seen.clear()
    api.prune(LENET, register("_m", method), 0.5, calib=FMNIST)
    assert isinstance(seen[1].finish, reconstruct.Reconstructor)
    assert seen[2] is seen[1]


def test_a_method_finish_runs_before_the_refit(register) -> None:
    calls: list[str] = []

    def first(model: onnx.ModelProto) -> onnx.ModelProto:
        calls.append("first")
        return model

    def method(ctx: Context) -> Outcome:
        plan = methods.choose_plan(ctx, score_groups(ctx.trace, ctx.graph, "l1"))
        return reconstruct.with_reconstruction(ctx, Outcome(plan, finish=first))

    api.prune(LENET, register("_m", method), 0.5, calib=FMNIST)
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
