"""Error correction and bias correction of the refit (`methods.reconstruct`).

Error correction refits every linear layer downstream of a cut (not only the consumers) on the
pruned network's inputs against the original's outputs; bias correction restores the output
mean of the layers the refit cannot solve (grouped, depthwise convs) through their bias.
Oracles: on the trained LeNet-300-100 (held-out images) error correction leaves a smaller output
error than the consumer-only refit of the same selection; the corrected bias makes the output
mean on the calibration data equal to the original's; layers upstream of every cut, off every
path from one, or with nothing pruned before them keep their weights exactly.
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
from onnxslim_prune.channels import Role
from onnxslim_prune.methods import base as methods
from onnxslim_prune.methods.base import Context, MethodSpec, MethodOutcome
from onnxslim_prune.methods import reconstruct
from onnxslim_prune.analysis.plan import GroupPlan, Plan
from onnxslim_prune.analysis.score import score_groups

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(autouse=True)
def _fixed_ridge(monkeypatch: pytest.MonkeyPatch) -> None:
    """These test which layers are refitted, at the fixed ridge rule: the CNN's cross-validated ridge (which may
    leave a layer at plain pruning) is off."""
    monkeypatch.setattr(reconstruct, "DEFAULT_CNN_RIDGE_FOLDS", 0)


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, Callable[[Context], MethodOutcome]], str]]:
    def add(name: str, fn: Callable[[Context], MethodOutcome]) -> str:
        monkeypatch.setitem(methods.METHODS, name, MethodSpec(name, "a test method", run=fn))
        return name

    yield add


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


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def prune(model: onnx.ModelProto | Path, method: str, calib: Path, **params: object) -> api.PruneResult:
    """Every calibration sample fitted (the oracles hold out their own data), no timing."""
    return api.prune(model, method, calib=calib, params=params, holdout=0.0, latency=False)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_input(model: onnx.ModelProto, node: str, index: int) -> np.ndarray:
    name = next(n for n in model.graph.node if n.name == node).input[index]
    return initializers(model)[name]


def cut(node: str, channels: tuple[int, ...]) -> Callable[[Context], MethodOutcome]:
    """A method removing `channels` of the group `node` produces, refitted (the same selection every run)."""

    def method(ctx: Context) -> MethodOutcome:
        group = next(g for g in ctx.trace.groups if any(m.node == node and m.role == Role.OUT for m in g.members))
        plan = Plan((GroupPlan(group.index, group.size, tuple(group.classes[c] for c in channels)),))
        return reconstruct.with_reconstruction(ctx, MethodOutcome(plan))

    return method


def conv(name: str, x: str, w: str, y: str, **attrs: object) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, **attrs)


def chain_with_a_side_branch(seed: int = 0) -> onnx.ModelProto:
    """x -> c1 -> Relu -> c2 -> Relu -> c3 -> Relu -> c4 -> Add(., s1(x)) -> y: s1 is off every path from a cut."""
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((6, 3, 3, 3)) * 0.4, "w2": rng.standard_normal((6, 6, 3, 3)) * 0.3,
         "w3": rng.standard_normal((6, 6, 1, 1)) * 0.5, "w4": rng.standard_normal((5, 6, 1, 1)) * 0.5,
         "ws": rng.standard_normal((5, 3, 1, 1)) * 0.5}
    nodes = [
        conv("c1", "x", "w1", "a1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        conv("c2", "r1", "w2", "a2", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        conv("c3", "r2", "w3", "a3"), helper.make_node("Relu", ["a3"], ["r3"], name="relu3"),
        conv("c4", "r3", "w4", "a4"), conv("s1", "x", "ws", "s"), helper.make_node("Add", ["a4", "s"], ["y"], name="add"),
    ]
    return make_model(nodes, ("x", ["N", 3, 8, 8]), ("y", ["N", 5, 8, 8]), w)


# ----------------------------------------------------------------------------- which layers


def test_downstream_layers_follow_the_cut_up_to_the_horizon(tmp_path: Path, register) -> None:
    """Cut c1's channels: c2 is the consumer; c3 and c4 are downstream (depth 1 and 2); s1 never is."""
    seen: dict[int | None, list[str]] = {}

    def method(ctx: Context) -> MethodOutcome:
        outcome = cut("c1", (1, 4))(ctx)
        consumers, _ = reconstruct.plan_consumers(ctx.trace, ctx.graph, outcome.plan)
        assert consumers == ["c2"]
        for horizon in (None, 2, 1, 0):
            seen[horizon] = reconstruct.downstream_layers(ctx.trace, ctx.graph, outcome.plan, consumers, horizon)[0]
        return outcome

    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    prune(chain_with_a_side_branch(), register("_seen", method), tmp_path / "c.npz")
    assert seen == {None: ["c3", "c4"], 2: ["c3", "c4"], 1: ["c3"], 0: []}


def test_layers_off_the_paths_of_a_cut_keep_their_weights(tmp_path: Path, register) -> None:
    """Error correction on: c1 (upstream: kept filters) and s1 (off every path) are untouched, c3 and c4 refitted;
    cutting c3's channels leaves nothing downstream of c4, so the model is the consumer-only refit's, byte for byte;
    horizon 0 is the consumer-only refit."""
    model = chain_with_a_side_branch()
    x = np.random.default_rng(2).standard_normal((64, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = tmp_path / "c.npz"
    on = prune(model, register("_c1", cut("c1", (1, 4))), calib, error_correction=True).model
    off = prune(model, register("_c1", cut("c1", (1, 4))), calib, error_correction=False).model
    kept = [0, 2, 3, 5]
    for result in (on, off):
        np.testing.assert_array_equal(node_input(result, "c1", 1), node_input(model, "c1", 1)[kept])
        np.testing.assert_array_equal(node_input(result, "s1", 1), node_input(model, "s1", 1))
    for layer in ("c3", "c4"):
        np.testing.assert_array_equal(node_input(off, layer, 1), node_input(model, layer, 1))  # consumer-only: untouched
        assert np.abs(node_input(on, layer, 1) - node_input(model, layer, 1)).max() > 1e-3  # refitted
    horizon0 = prune(model, register("_c1", cut("c1", (1, 4))), calib, error_correction=True, correction_horizon=0).model
    assert horizon0.SerializeToString() == off.SerializeToString()
    last_on = prune(model, register("_c3", cut("c3", (0, 3))), calib, error_correction=True).model
    last_off = prune(model, register("_c3", cut("c3", (0, 3))), calib, error_correction=False).model
    assert last_on.SerializeToString() == last_off.SerializeToString()
    np.testing.assert_array_equal(node_input(last_on, "c2", 1), node_input(model, "c2", 1))


# ----------------------------------------------------------------------------- error correction


def test_error_correction_beats_the_consumer_only_refit_on_lenet(tmp_path: Path, register) -> None:
    """LeNet-300-100, 90% of the first layer's neurons cut (l1), 250 images fitted, 250 held out: refitting f3 too
    (downstream of the consumer f2) leaves at most 85% of the consumer-only refit's output error (measured: 79%)."""
    with np.load(SAMPLE_FMNIST) as data:
        images = data["input"]
    np.savez(tmp_path / "c.npz", input=images[:250])
    held = images[250:]
    reference = run(SAMPLE_LENET, held)

    def method(ctx: Context) -> MethodOutcome:
        group = next(g for g in ctx.trace.groups if any(m.node == "/f1/Gemm" and m.role == Role.OUT for m in g.members))
        drop = np.argsort(score_groups(ctx.trace, ctx.graph, "l1")[group.index], kind="stable")[: int(0.9 * group.size)]
        plan = Plan((GroupPlan(group.index, group.size, tuple(group.classes[int(i)] for i in drop)),))
        return reconstruct.with_reconstruction(ctx, MethodOutcome(plan))

    original = onnx.load(SAMPLE_LENET)
    errors, models = {}, {}
    for corrected in (False, True):
        result = prune(SAMPLE_LENET, register("_lenet", method), tmp_path / "c.npz", error_correction=corrected)
        errors[corrected] = float(np.mean((run(result.model, held) - reference) ** 2))
        models[corrected] = result.model
    assert errors[True] < 0.85 * errors[False], errors
    f3 = {k: node_input(m, "/f3/Gemm", 1) for k, m in models.items()}
    np.testing.assert_array_equal(f3[False], node_input(original, "/f3/Gemm", 1))  # consumer only: f3 untouched
    assert np.abs(f3[True] - f3[False]).max() > 1e-3
    assert node_input(models[True], "/f1/Gemm", 1).shape[0] == 30  # the same selection: 30 of 300 kept


# ----------------------------------------------------------------------------- bias correction


def _channel_means(y: np.ndarray) -> np.ndarray:
    return y.transpose(1, 0, 2, 3).reshape(y.shape[1], -1).mean(axis=1)


def test_bias_correction_restores_the_output_mean_of_a_grouped_consumer(tmp_path: Path, register) -> None:
    """x -> c1 (8) -> Relu -> grouped conv (2 groups, 8 -> 4, no bias) -> y; one input of each group cut.

    The grouped conv cannot be refitted; with bias correction it gains a bias and its output mean on the
    calibration data equals the original's (to 1e-5 of the output's scale); without, it is off by more
    than 5% of the scale. On held-out inputs from the same distribution the mean error is 10x smaller.
    """
    rng = np.random.default_rng(5)
    w = {"w1": rng.standard_normal((8, 3, 3, 3)) * 0.4 + 0.05, "wg": rng.standard_normal((4, 4, 3, 3)) * 0.3 + 0.1}
    nodes = [conv("c1", "x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("g", "r", "wg", "y", pads=[1, 1, 1, 1], group=2)]
    model = make_model(nodes, ("x", ["N", 3, 8, 8]), ("y", ["N", 4, 8, 8]), w)
    x = rng.standard_normal((48, 3, 8, 8)).astype(np.float32)
    held = rng.standard_normal((48, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    scale = float(np.abs(run(model, x)).mean())
    gaps, held_gaps = {}, {}
    for corrected in (False, True):
        result = prune(model, register("_g", cut("c1", (1, 6))), tmp_path / "c.npz", bias_correction=corrected)
        g = next(n for n in result.model.graph.node if n.name == "g")
        assert len(g.input) == (3 if corrected else 2)  # a bias only where corrected
        assert any("output mean is restored" in note for note in result.report.notes) == corrected
        gaps[corrected] = np.abs(_channel_means(run(result.model, x)) - _channel_means(run(model, x))).max()
        held_gaps[corrected] = np.abs(_channel_means(run(result.model, held)) - _channel_means(run(model, held))).max()
    assert gaps[True] < 1e-5 * scale, gaps
    assert gaps[False] > 0.05 * scale, gaps
    assert held_gaps[True] < 0.1 * held_gaps[False], held_gaps


def test_error_correction_refits_a_depthwise_layer_downstream_channel_by_channel(tmp_path: Path, register) -> None:
    """x -> c1 (6) -> Relu -> c2 (4) -> Relu -> depthwise (4) -> y, two of c1's channels cut.

    c2 is the consumer; what its refit cannot restore passes the Relu into the depthwise conv. Error
    correction refits the depthwise conv channel by channel (its 9 taps and bias per channel, every output
    position sampled): its output mean on the calibration data is the original's (to 1e-5 of the scale;
    without error correction it is off by more than 3%, measured 4.6%), and the held-out squared error is
    at most 97% of the consumer-only refit's (measured 94%: a depthwise conv cannot mix channels back in).
    With ``--refit mean`` the taps stay and the bias alone restores the mean.
    """
    rng = np.random.default_rng(6)
    w = {"w1": rng.standard_normal((6, 3, 3, 3)) * 0.4 + 0.05, "w2": rng.standard_normal((4, 6, 1, 1)) * 0.5 + 0.2,
         "wd": rng.standard_normal((4, 1, 3, 3)) * 0.5, "bd": rng.standard_normal(4) * 0.1}
    nodes = [conv("c1", "x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("c2", "r", "w2", "b"), helper.make_node("Relu", ["b"], ["s"], name="relu2"),
             helper.make_node("Conv", ["s", "wd", "bd"], ["y"], name="dw", pads=[1, 1, 1, 1], group=4)]
    model = make_model(nodes, ("x", ["N", 3, 8, 8]), ("y", ["N", 4, 8, 8]), w)
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    held = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    scale = float(np.abs(run(model, x)).mean())
    gaps, errors = {}, {}
    for label, params in (("consumers", {"error_correction": False}), ("corrected", {"error_correction": True}),
                          ("mean", {"error_correction": True, "refit": "mean"})):
        result = prune(model, register("_dw", cut("c1", (0, 3))), tmp_path / "c.npz", calib_positions=64,
                       **params)
        taps, bias = node_input(result.model, "dw", 1), node_input(result.model, "dw", 2)
        assert (np.abs(taps - w["wd"]).max() > 1e-3) == (label == "corrected")
        assert (np.abs(bias - w["bd"]).max() > 1e-3) == (label != "consumers")
        gaps[label] = np.abs(_channel_means(run(result.model, x)) - _channel_means(run(model, x))).max()
        errors[label] = float(np.mean((run(result.model, held) - run(model, held)) ** 2))
    assert gaps["corrected"] < 1e-5 * scale and gaps["mean"] < 1e-5 * scale, gaps
    assert gaps["consumers"] > 0.03 * scale, gaps
    assert errors["corrected"] < 0.97 * errors["consumers"], errors


def test_mean_refit_keeps_the_weights_and_restores_the_output_mean(tmp_path: Path, register) -> None:
    """``refit="mean"`` (a data-free selection compensated with calibration data): LeNet's f3 keeps plain pruning's
    weights exactly, and its output (the logits) keeps the original's mean per class on the calibration data to
    1e-4 of their scale; plain pruning is off by more than 1% of it."""
    with np.load(SAMPLE_FMNIST) as data:
        images = data["input"][:200]
    np.savez(tmp_path / "c.npz", input=images)
    original = onnx.load(SAMPLE_LENET)
    reference = run(original, images)
    scale = float(np.abs(reference).mean())
    channels = tuple(range(0, 100, 2))  # half of f2's neurons
    result = prune(SAMPLE_LENET, register("_mean", cut("/f2/Gemm", channels)), tmp_path / "c.npz", refit="mean")
    kept = [c for c in range(100) if c not in channels]
    f3 = node_input(original, "/f3/Gemm", 1)  # [10, 100] (transB)
    np.testing.assert_array_equal(node_input(result.model, "/f3/Gemm", 1), f3[:, kept])
    gap = np.abs(run(result.model, images).mean(axis=0) - reference.mean(axis=0)).max()
    plain = prune(SAMPLE_LENET, register("_mean", cut("/f2/Gemm", channels)), tmp_path / "c.npz", reconstruct=False)
    plain_gap = np.abs(run(plain.model, images).mean(axis=0) - reference.mean(axis=0)).max()
    assert gap < 1e-4 * scale, (gap, scale)
    assert plain_gap > 0.01 * scale, (plain_gap, scale)


def test_error_correction_through_residual_blocks_takes_the_residual_targets(tmp_path: Path, register) -> None:
    """Two residual MLP blocks without normalisation, ``h = e + MLP_a(e)``, ``g = h + MLP_b(h)``, ``y = g Wo``; half of
    MLP_a's hidden neurons cut. The consumer-only refit leaves h off; error correction refits MLP_b and Wo, and
    MLP_b's second MatMul (bias Add into the residual Add) fits ``g_original - h_pruned``, absorbing h's error.
    Held-out squared error (measured 2.79 / 1.89 / 1.39): error correction at most 75% of the consumer-only
    refit's, the residual target at most 90% of error correction without it. The embedding m0 is untouched."""
    rng = np.random.default_rng(0)
    d, hidden = 8, 16
    w = {"w0": rng.standard_normal((d, d)) * 0.5, "b0": rng.standard_normal(d) * 0.2, "wo": rng.standard_normal((d, 5)) * 0.5,
         "wa": rng.standard_normal((d, 12)) * 0.5, "ba": rng.standard_normal(12) * 0.2,
         "wb": rng.standard_normal((12, d)) * 0.4, "bb": rng.standard_normal(d) * 0.1,
         "wc": rng.standard_normal((d, hidden)) * 0.5, "bc": rng.standard_normal(hidden) * 0.2,
         "wd": rng.standard_normal((hidden, d)) * 0.4, "bd": rng.standard_normal(d) * 0.1}

    def node(op: str, inputs: list[str], output: str, name: str) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=name)

    nodes = [node("MatMul", ["x", "w0"], "e0", "m0"), node("Add", ["e0", "b0"], "e", "a0"),
             node("MatMul", ["e", "wa"], "a", "ma"), node("Add", ["a", "ba"], "a1", "aa"), node("Relu", ["a1"], "ar", "ra"),
             node("MatMul", ["ar", "wb"], "b", "mb"), node("Add", ["b", "bb"], "b1", "ab"), node("Add", ["b1", "e"], "h", "res1"),
             node("MatMul", ["h", "wc"], "c", "mc"), node("Add", ["c", "bc"], "c1", "ac"), node("Relu", ["c1"], "cr", "rc"),
             node("MatMul", ["cr", "wd"], "dd", "md"), node("Add", ["dd", "bd"], "d1", "ad"), node("Add", ["d1", "h"], "g", "res2"),
             node("MatMul", ["g", "wo"], "y", "mo")]
    model = make_model(nodes, ("x", ["N", 4, d]), ("y", ["N", 4, 5]), w)
    x = rng.standard_normal((256, 4, d)).astype(np.float32)
    held = rng.standard_normal((256, 4, d)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    reference = run(model, held)
    errors, models = {}, {}
    for label, params in (("consumers", {"error_correction": False}),
                          ("no residual", {"error_correction": True, "residual_targets": False}),
                          ("corrected", {"error_correction": True})):
        result = prune(model, register("_res", cut("ma", tuple(range(0, 12, 2)))), tmp_path / "c.npz", **params)
        errors[label] = float(np.mean((run(result.model, held) - reference) ** 2))
        models[label] = result.model
    assert errors["corrected"] < 0.75 * errors["consumers"], errors
    assert errors["corrected"] < 0.9 * errors["no residual"], errors
    for label, result in models.items():
        np.testing.assert_array_equal(node_input(result, "m0", 1), w["w0"].astype(np.float32))
        changed = np.abs(node_input(result, "md", 1) - w["wd"]).max() > 1e-3
        assert changed == (label != "consumers")


def test_channel_lines_recover_a_per_channel_affine_map_of_a_normalisation() -> None:
    """A LayerNorm refit: the pruned output ``y' = gamma z + beta`` and a target ``y = a z + b`` per channel give back
    ``(a, b)`` (plenty of rows: the ridge is negligible); a channel with ``gamma = 0`` keeps its parameters; RMSNorm
    (no beta) fits the scale through the origin."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4000, 5))
    gamma, beta = np.array([1.0, 0.5, 0.0, 2.0, -1.0]), np.array([0.1, 0.0, 0.3, -0.2, 0.5])
    a, b = np.array([1.2, 0.4, 7.0, 1.9, -0.8]), np.array([0.0, 0.2, 9.0, -0.1, 0.4])
    lines = reconstruct.ChannelLines(gamma, beta)
    for rows in np.array_split(np.arange(4000), 3):  # streamed in batches
        lines.add((a * z[rows] + b)[:, None, :], (gamma * z[rows] + beta)[:, None, :])
    fitted_a, fitted_b = lines.fit(1e-6, reconstruct.DEFAULT_RIDGE_ROWS)
    assert fitted_b is not None
    live = gamma != 0
    np.testing.assert_allclose(fitted_a[live], a[live], rtol=1e-3)
    np.testing.assert_allclose(fitted_b[live], b[live], atol=1e-3)
    assert fitted_a[2] == gamma[2] and fitted_b[2] == beta[2]
    rms = reconstruct.ChannelLines(gamma, None)
    rms.add(a * z, gamma * z)
    scale, none = rms.fit(1e-6, reconstruct.DEFAULT_RIDGE_ROWS)
    assert none is None
    np.testing.assert_allclose(scale[live], a[live], rtol=1e-3)


def test_recovery_turns_error_correction_off_on_transformers_unless_asked() -> None:
    """``--recover`` after a refit with error correction undoes what the downstream refits corrected on a
    transformer (the module's `default_error_correction`): its default refit there is the consumers' only, and
    ``--error-correction`` still asks for it; a CNN keeps error correction (it measured better on Lite1)."""
    from onnxslim_prune.methods.defaults import ModelKind

    def corrected(values: dict[str, object], kind: ModelKind = ModelKind.TRANSFORMER) -> bool:
        return reconstruct.Settings.from_params(methods.CommonParams.parse(values), 32, 0, kind=kind).error_correction

    assert corrected({}) is True and corrected({"recover": True}) is False
    assert corrected({"recover": True, "error_correction": True}) is True
    assert corrected({"error_correction": False}) is False
    assert corrected({"recover": True}, ModelKind.OTHER) is True
