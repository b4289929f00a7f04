"""Memory bounded at any calibration size: the verdict streams, its batches fit the budget.

Each test proves the bounded behaviour structurally (how many of the original's output batches
are held, how many samples one batch holds, how many float64 rows are converted at once) and
that the numbers equal the unstreamed computation (numpy on both models' outputs over the same
samples, float64) within the stated tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxslim_prune.pipeline import judging
from onnxslim_prune import api
from onnxslim_prune.judge import validate, verdict
from onnxslim_prune.calib.memory import SampleCost, sample_cost
from tests.models import run

#: the verdict's float64 sums against numpy's on the same outputs
TOLERANCE = 1e-9

CLASSIFIER = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 10] y) {
  h = Gemm <transB: int = 1> (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB: int = 1> (r, w2, b2)
}"""


def classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> Gemm(16->24) -> Relu -> Gemm(24->10): a dynamic-batch classifier."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(CLASSIFIER)
    for name, shape in (("w1", (24, 16)), ("b1", (24,)), ("w2", (10, 24)), ("b2", (10,))):
        value = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def direct_figures(original: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray) -> dict[str, float]:
    """The verdict's definitions computed at once on all samples (module docstring of `verdict`)."""
    a = run(original, {"x": x})[0].astype(np.float64)
    b = run(pruned, {"x": x})[0].astype(np.float64)
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
    return {
        "cosine": float(np.vdot(a, b) / np.sqrt(np.vdot(a, a) * np.vdot(b, b))),
        "correlation": float(np.vdot(ca, cb) / np.sqrt(np.vdot(ca, ca) * np.vdot(cb, cb))),
        "top1": float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1))),
        "max_abs": float(np.max(np.abs(a - b))),
    }


def capture_measure(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the `_Measure` every verdict is computed from."""
    seen: list[Any] = []
    real = judging.verdict_of

    def recording(original: Any, pruned: Any, m: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(m)
        return real(original, pruned, m, *args, **kwargs)

    monkeypatch.setattr(judging, "verdict_of", recording)
    return seen


@pytest.mark.parametrize("labelled", [False, True], ids=["calib-holdout", "eval"])
def test_a_tiny_budget_holds_no_reference_batch_and_splits_the_verdict_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labelled: bool
) -> None:
    model = classifier()
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((200, 16)).astype(np.float32))
    eval_path = None
    if labelled:
        eval_path = tmp_path / "eval.npz"
        x_eval = rng.standard_normal((90, 16)).astype(np.float32)
        np.savez(eval_path, x=x_eval, labels=np.argmax(run(model, {"x": x_eval})[0], axis=1) % 10)
    seen = capture_measure(monkeypatch)
    kwargs: dict[str, Any] = dict(method="l1", ratio=0.5, calib=calib, eval_data=eval_path, latency=False)
    tiny = api.prune(model, calib_memory=4096, **kwargs)
    roomy = api.prune(model, **kwargs)
    streamed, whole = seen
    # structure: with 4096 bytes a batch holds at most 2048 / (working 192: the Relu reads and writes 24 floats,
    # + outputs 40 bytes a sample) = 8 samples, and of the reference outputs ([8, 10] float32: 320 bytes a batch)
    # one full batch fits 1/8 of the budget (512 bytes): the others (the fitted samples' too) wait on disk
    assert max(validate.feed_samples([f]) for f in streamed.feeds) == 8
    # the companion figures' 32 fitted samples, in batches of 8, follow the verdict's batches
    assert len(streamed.fitted_feeds) == 4 and len(streamed.reference) == len(streamed.feeds) + 4 > 8
    assert 320 <= streamed.reference.nbytes <= 512 and streamed.reference.kept <= 2
    assert streamed.reference.spilled_bytes > 0 and streamed.reference.folder is None  # removed after the verdict
    assert whole.reference.kept == len(whole.reference) and max(validate.feed_samples([f]) for f in whole.feeds) > 8
    assert whole.reference.spilled_bytes == 0
    # the same samples in the same order, the same figures
    x = np.concatenate([f["x"] for f in streamed.feeds])
    np.testing.assert_array_equal(x, np.concatenate([f["x"] for f in whole.feeds]))
    expected = direct_figures(model, tiny.model, x)
    for result in (tiny, roomy):
        v = result.report.verdict
        assert v.samples == len(x) == (90 if labelled else 40)
        assert v.cosine == pytest.approx(expected["cosine"], abs=TOLERANCE)
        assert v.correlation == pytest.approx(expected["correlation"], abs=TOLERANCE)
        assert v.top1_agreement == pytest.approx(expected["top1"], abs=TOLERANCE)
        assert v.max_abs == pytest.approx(expected["max_abs"], abs=1e-6)
    # the companion figures on fitted samples (streamed in batches of 8 under the tiny budget) are the same too
    for a, b in zip(tiny.report.verdict.fitted, roomy.report.verdict.fitted, strict=True):
        assert (a.samples, a.top1) == (b.samples, b.top1) and a.cosine == pytest.approx(b.cosine, abs=TOLERANCE)
        assert a.correlation == pytest.approx(b.correlation, abs=TOLERANCE)
    assert len(tiny.report.verdict.fitted) == 1
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tiny.model.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(roomy.model.graph.initializer[0]))
    if labelled:
        assert tiny.report.verdict.accuracy_before == roomy.report.verdict.accuracy_before == 1.0
        assert tiny.report.verdict.accuracy_after == roomy.report.verdict.accuracy_after == pytest.approx(
            float(np.mean(np.argmax(run(tiny.model, {"x": x})[0], axis=1) == np.argmax(run(model, {"x": x})[0], axis=1)))
        )


def test_held_outputs_keep_what_fits_and_spill_the_rest_bit_for_bit() -> None:
    model = classifier()
    feeds = [{"x": np.random.default_rng(i).standard_normal((8, 16)).astype(np.float32)} for i in range(5)]
    sess = validate.session(model)
    held = validate.HeldOutputs(budget=2 * 8 * 10 * 4)  # room for two batches of [8, 10] float32
    for feed in feeds:
        held.add(sess.run(None, feed))
    assert (len(held), held.kept, held.nbytes, held.spilled_bytes) == (5, 2, 640, 3 * 320)
    folder = held.folder
    assert folder is not None and len(list(folder.glob("*.npy"))) == 3  # one file per output of each spilled batch
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(held.get(i)[0], run(model, feed)[0])  # read back: the same bits
    held.close()
    assert held.folder is None and not folder.exists()


def test_held_outputs_leave_nothing_on_disk_when_dropped() -> None:
    held = validate.HeldOutputs(budget=0)
    held.add([np.arange(6, dtype=np.float32)])
    folder = held.folder
    assert folder is not None and folder.exists() and held.kept == 0
    del held  # collected (as on Ctrl-C, at exit): the folder goes with it
    import gc

    gc.collect()
    assert not folder.exists()


def test_the_accumulator_converts_a_few_rows_at_a_time_with_the_same_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((12, 3, 7)).astype(np.float32) for _ in range(3)]
    b = [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32) for x in a]

    def figures() -> verdict.OutputAgreement:
        acc = verdict.AgreementAccumulator(["y"])
        for x, y in zip(a, b):
            acc.add([x], [y], len(x))
        return acc.results()[0]

    whole = figures()
    converted: list[int] = []
    real = verdict._OutputSums._add_rows

    def counting(self: Any, rows_a: np.ndarray, rows_b: np.ndarray, cols: slice) -> None:
        converted.append(rows_a.shape[0])
        real(self, rows_a, rows_b, cols)

    monkeypatch.setattr(verdict, "CHUNK_BYTES", 8 * 21 * 5)  # five rows of 21 float64 values
    monkeypatch.setattr(verdict._OutputSums, "_add_rows", counting)
    chunked = figures()
    assert max(converted) == 5 and sum(converted) == 36
    for field in ("cosine", "correlation", "spread", "max_abs", "max_rel"):
        assert getattr(chunked, field) == pytest.approx(getattr(whole, field), abs=TOLERANCE)
    ra, rb = (np.concatenate(v).reshape(36, -1).astype(np.float64) for v in (a, b))
    ca, cb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    assert chunked.correlation == pytest.approx(np.vdot(ca, cb) / np.sqrt(np.vdot(ca, ca) * np.vdot(cb, cb)), abs=TOLERANCE)


def test_wide_rows_are_summed_a_block_of_columns_at_a_time_with_the_same_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample wider than `WIDE_ROW_BYTES` (a language model's logits) goes through float64 a block at a time: the
    cosine, correlation, spread and max difference are those of the whole rows (to rounding), and a non-finite
    value where the original is finite is still found."""
    from onnxslim_prune.errors import ValidationError

    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 5, 301)).astype(np.float32) + 2.0
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)

    def figures() -> tuple[float, ...]:
        acc = verdict.AgreementAccumulator(["y"])
        acc.add([a[:4]], [b[:4]], 4)
        acc.add([a[4:]], [b[4:]], 2)
        (out,) = acc.results()
        assert out.correlation is not None and out.spread is not None
        return out.cosine, out.correlation, out.spread, out.max_abs

    whole = figures()
    monkeypatch.setattr(verdict, "WIDE_ROW_BYTES", 8 * 97)  # blocks of 97 columns of the 1,505 of a sample
    blocked = figures()
    np.testing.assert_allclose(blocked, whole, rtol=1e-12)
    broken = b.copy()
    broken[5, 4, 300] = np.inf
    with pytest.raises(ValidationError, match="non-finite"):
        verdict.AgreementAccumulator(["y"]).add([a], [broken], 6)


def test_sample_cost_is_the_largest_node_and_the_outputs() -> None:
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
      h = Conv <pads: ints = [1, 1, 1, 1]> (x, w)
      y = Relu (h)
    }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"))
    cost = sample_cost(model, {"x": (1, 3, 8, 8)})
    # the Conv reads 3x8x8 and writes 4x8x8 float32 (its weight is not an activation), the Relu reads and writes
    # 4x8x8: the larger node decides; the output is 4x8x8
    assert cost == SampleCost(working=max(3 + 4, 4 + 4) * 64 * 4, outputs=4 * 64 * 4)
    assert cost.samples_within(10 * (2048 + 1024)) == 10 and cost.samples_within(1) == 1


def test_each_stage_runs_as_many_samples_as_its_own_activations_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_prune.calib import load_calibration, stream_tensors
    from onnxslim_prune.calib import collect as collect_module
    from onnxslim_prune.calib.engine import StagedPasses
    from onnxslim_prune.calib.memory import RUN_SHARE, limited
    from onnxslim_prune.calib.specs import input_specs
    from tests import models as M

    model = M.residual_projection()
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    spec = input_specs(model)[0]
    np.savez(tmp_path / "c.npz", **{spec.name: np.random.default_rng(0).standard_normal((20, *spec.sample_shape)).astype(np.float32)})
    calib = load_calibration(tmp_path / "c.npz", input_specs(model))
    outs = [n.output[0] for n in model.graph.node]
    schedule = [[outs[1]], [outs[-2], model.graph.output[0].name]]
    full = list(stream_tensors(model, calib, [t for w in schedule for t in w], batch_size=8))
    fed: list[int] = []
    real = collect_module.run_chunked

    def recording(session: Any, names: Any, feed: dict[str, np.ndarray], most: int | None, samples: int) -> Any:
        class Counting:
            def run(self, n: Any, f: dict[str, np.ndarray]) -> Any:
                fed.append(len(next(iter(f.values()))))
                return session.run(n, f)

        return real(Counting(), names, feed, most, samples)  # type: ignore[arg-type]

    import onnxslim_prune.calib.engine as engine_module

    monkeypatch.setattr(engine_module, "run_chunked", recording)
    # one sample's activations: stage 1 (stem Conv, Relu: 2 x [4, 8, 8]) 2048 bytes; stage 2 (conv_a, Relu, conv_b,
    # proj, Add, Relu: 6 x [8, 8, 8] float32, GAP and Flatten 8 floats each, fc 5) 12,372 bytes. A run's share of
    # 25,000 bytes takes stage 1 whole (12 samples fit) and stage 2 two samples at a time
    with limited(25_000 * RUN_SHARE):
        passes = StagedPasses(model, calib, 8, schedule, budget=1 << 20)
        got = []
        for wanted in schedule:
            got.append(list(passes.advance(wanted)))
            fed.append(0)  # a stage boundary
        passes.close()
    first, second = " ".join(map(str, fed)).split(" 0")[:2]
    assert first.split() == ["8", "8", "4"]  # whole batches: 8, 8 and the remainder 4
    assert second.split() == ["2"] * 10  # 20 samples, two at a time
    for wanted, batches in zip(schedule, got):
        assert [len(b[wanted[0]]) for b in batches] == [8, 8, 4]  # the batching the statistics see is unchanged
        for batch, values in enumerate(batches):
            for name in wanted:
                np.testing.assert_allclose(values[name], full[batch][name], rtol=1e-6, atol=1e-6)


def _mapped_rss_kib(path: Path) -> int | None:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps; None elsewhere)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        if "-" in line.split(" ")[0] and len(line.split()) >= 5:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_batch_run_in_parts_is_joined_without_holding_it_twice() -> None:
    """`run_chunked` copies each part into outputs of the batch's size as it comes: the values are those of one run
    and numpy's peak stays near one batch's outputs plus a part (parts gathered and then concatenated were held
    twice: SmolLM2's logits for 32 windows, 805 MB, peaked at 1.6 GB). A part whose outputs have no samples first,
    or change shape beyond them, sends the batch back to one whole run."""
    import tracemalloc
    from collections.abc import Callable

    from onnxslim_prune.calib.collect import run_chunked

    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)

    class Session:
        def __init__(self, outputs: Callable[[np.ndarray, int], list[np.ndarray]]) -> None:
            self.outputs, self.calls = outputs, []  # type: list[int]

        def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            self.calls.append(len(feed["x"]))
            return self.outputs(feed["x"], len(self.calls))

    wide = Session(lambda rows, call: [np.tile(rows, (1, 256))])  # 16 KiB a sample
    tracemalloc.start()
    (y,) = run_chunked(wide, ["y"], {"x": x}, 4, 40)  # type: ignore[arg-type]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert wide.calls == [4] * 10 and np.array_equal(y, np.tile(x, (1, 256)))
    assert peak < 1.3 * y.nbytes, (peak, y.nbytes)  # 2x before

    scalar = Session(lambda rows, call: [rows * 2, np.float32(rows.sum())])
    doubled, total = run_chunked(scalar, ["y", "t"], {"x": x}, 4, 40)  # type: ignore[arg-type]
    assert scalar.calls == [4, 40] and np.array_equal(doubled, x * 2) and total == np.float32(x.sum())
    ragged = Session(lambda rows, call: [np.tile(rows, (1, 1 + call % 2))])  # the second part is narrower
    (z,) = run_chunked(ragged, ["y"], {"x": x}, 4, 40)  # type: ignore[arg-type]
    assert ragged.calls == [4, 4, 40] and z.shape == (40, 32)  # the whole run's (its third call: twice as wide)


@pytest.mark.parametrize("compressed", [False, True])
def test_eval_images_are_read_from_the_file_batch_by_batch(tmp_path: Path, compressed: bool) -> None:
    from onnxslim_prune.judge.evaluation import eval_feeds, load_eval, release_pages

    model = classifier()
    x = np.random.default_rng(3).standard_normal((600, 16)).astype(np.float32)
    path = tmp_path / "eval.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, labels=np.arange(600) % 10)
    data = load_eval(path, model)
    # an uncompressed member is mapped, not loaded (a compressed one cannot be: it is read whole, as before)
    assert isinstance(data.images, np.memmap) is (not compressed)
    np.testing.assert_array_equal(np.asarray(data.images), x)
    feeds, labels = eval_feeds(data, model)
    assert [len(f["x"]) for f in feeds] == [256, 256, 88]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    if not compressed:
        np.testing.assert_array_equal(run(model, feeds[0])[0], run(model, {"x": x[:256]})[0])
        release_pages(feeds[0]["x"])
        resident = _mapped_rss_kib(path)
        assert resident is None or resident == 0  # no page of the images stays resident after a batch


def test_a_cut_model_is_streamed_without_another_copy_of_its_weights() -> None:
    from onnxslim_prune.calib import expose_tensors
    from onnxslim_prune.methods.reconstruct import subgraph_model

    model = classifier()
    before = model.SerializeToString()
    cut = subgraph_model(model, ["h"])  # a copy holding only what computes h (w1, b1)
    assert [o.name for o in cut.graph.output] == ["h"] and {t.name for t in cut.graph.initializer} == {"w1", "b1"}
    assert expose_tensors(cut, ["h"]) is cut  # its outputs are the names already: no copy for the session
    assert subgraph_model(model, ["y"]) is not model and model.SerializeToString() == before  # never cut in place
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    expected = x @ onnx.numpy_helper.to_array(model.graph.initializer[0]).T + onnx.numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(run(cut, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)



def test_a_weightless_cut_streams_its_weights_from_the_model_it_was_cut_from(tmp_path: Path) -> None:
    from onnxslim_prune.calib import load_calibration, stream_tensors
    from onnxslim_prune.calib.specs import input_specs
    from onnxslim_prune.methods.reconstruct import subgraph_model, weightless_cut

    model = classifier()
    cut = weightless_cut(model, ["h"])
    assert len(cut.graph.initializer) == 0 and [o.name for o in cut.graph.output] == ["h"]
    x = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = load_calibration(tmp_path / "c.npz", input_specs(model))
    light = [b["h"] for b in stream_tensors(cut, calib, ["h"], batch_size=4, weights=model)]
    full = [b["h"] for b in stream_tensors(subgraph_model(model, ["h"]), calib, ["h"], batch_size=4)]
    assert len(light) == 2
    for a, b in zip(light, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_calibration_sessions_keep_no_memory_pattern_and_give_an_ordinary_sessions_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's memory pattern keeps one block for every activation of a run at each input shape (a statistics
    pass over SmolLM2-135M's residual sums: 1.2 GB more at its peak, no faster). The sessions that only compute
    calibration values (`ir.calibration_options`) are built without it, and stream what an ordinary session computes."""
    import onnxruntime as ort

    from onnxslim_prune.calib import load_calibration, stream_tensors
    from onnxslim_prune.calib.specs import input_specs

    patterns: list[bool] = []

    class Recording(ort.InferenceSession):  # type: ignore[misc]
        def __init__(self, model: Any, options: Any = None, *args: Any, **kwargs: Any) -> None:
            patterns.append(options.enable_mem_pattern)
            super().__init__(model, options, *args, **kwargs)

    model = classifier()
    x = np.random.default_rng(2).standard_normal((6, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = load_calibration(tmp_path / "c.npz", input_specs(model))
    monkeypatch.setattr(ort, "InferenceSession", Recording)
    streamed = np.concatenate([b["h"] for b in stream_tensors(model, calib, ["h"], batch_size=4)])
    assert patterns == [False]
    monkeypatch.undo()
    ordinary = onnx.ModelProto()
    ordinary.CopyFrom(model)
    ordinary.graph.output.extend([onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None)])
    np.testing.assert_array_equal(streamed, run(ordinary, {"x": x})[-1])


FFN_BLOCK = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6] x) => (float[N, 5] y) {
  h = MatMul (x, w1)
  n = LayerNormalization <axis = -1> (h, gamma, beta)
  u = MatMul (n, w2)
  a = Relu (u)
  d = MatMul (a, w3)
  r = Add (d, n)
  y = MatMul (r, w4)
}"""


def test_groups_kept_whole_are_not_streamed_and_the_model_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_prune.ops.testing import parse, weights
    from onnxslim_prune.methods import datadriven

    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", "off")
    # hidden 8 (w1 out, the LayerNorm, w2 and w4 read it, w3 writes into it), FFN 12 (w2 out, w3 reads it)
    model = parse(FFN_BLOCK, w1=weights(6, 8), gamma=weights(8, seed=1) + 1.0, beta=weights(8, seed=2), w2=weights(8, 12, seed=3),
                  w3=weights(12, 8, seed=4), w4=weights(8, 5, seed=5))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((96, 6)).astype(np.float32))
    streamed: list[list[str]] = []
    real = datadriven.input_covariances

    def recording(ctx: Any, layers: Any, budget: Any = None, info: Any = None) -> Any:
        streamed.append(sorted(layer.x for layer in layers))
        return real(ctx, layers, budget, info)

    monkeypatch.setattr(datadriven, "input_covariances", recording)
    settings: dict[str, Any] = dict(calib=calib, latency=False, params={"ffn": 0.5, "hidden": 0.0})
    lean = api.prune(model, "contrib", 0.5, **settings)
    monkeypatch.setattr(datadriven, "kept_whole", lambda ctx, group: False)  # as before: every group's consumers
    every = api.prune(model, "contrib", 0.5, **settings)
    # structure: with --hidden 0 only the FFN's consumer (w3, reading a) is streamed; before, w2 and w4 too
    assert streamed == [["a"], ["a", "n", "r"]]
    widths = {t.name: tuple(t.dims) for t in lean.model.graph.initializer}
    assert widths["w2"] == (8, 6) and widths["w3"] == (6, 8) and widths["w4"] == (8, 5)  # FFN halved, hidden whole
    # numbers: the same plan and the same refitted weights, bit for bit, and the same verdict
    assert lean.model.SerializeToString() == every.model.SerializeToString()
    assert lean.report.verdict.cosine == every.report.verdict.cosine
    x = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)
    assert float(np.corrcoef(run(lean.model, {"x": x})[0].ravel(), run(model, {"x": x})[0].ravel())[0, 1]) > 0.5


def test_a_large_model_reads_its_missing_shapes_from_a_run_without_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from onnxslim_prune.graph import shapes

    # NonZero's output length is known only by running; the MatMul's weight (64 x 96 float32) is the "large" part
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x) => (float[N, 96] y, int64[2, M] nz) {
      y = MatMul (x, w)
      nz = NonZero (y)
    }""")
    weight = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    built: list[int] = []
    real = ort.InferenceSession

    def recording(source: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(len(source) if isinstance(source, bytes) else -1)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    whole = shapes.static_shapes(model, {"x": (3, 64)})
    monkeypatch.setattr(shapes, "ZERO_WEIGHTS_RUN_BYTES", weight.nbytes - 1)  # the weight now counts as large
    lean = shapes.static_shapes(model, {"x": (3, 64)})
    # the same shapes (NonZero of zero inputs: no element), from a session of the skeleton: no byte of the weight
    assert lean == whole and lean["nz"] == (2, 0) and lean["y"] == (3, 96)
    assert built[0] > weight.nbytes and 0 < built[1] < weight.nbytes // 10


def test_a_large_pruned_model_is_not_held_as_bytes_and_is_written_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_prune import ir

    model = classifier()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((120, 16)).astype(np.float32))
    kept = api.prune(model, "ldrf", 0.5, calib=calib, latency=True)
    monkeypatch.setattr(judging, "KEEP_BYTES_UP_TO", 0)  # every model counts as large
    dropped = api.prune(model, "ldrf", 0.5, calib=calib, latency=True)
    assert kept.serialized is not None and dropped.serialized is None  # not held through the verdict and latency
    assert dropped.report.after.file_bytes == kept.report.after.file_bytes == len(kept.serialized)
    ir.save_model(dropped.model, tmp_path / "a.onnx", serialized=dropped.serialized)  # the writer serializes again
    assert (tmp_path / "a.onnx").read_bytes() == kept.serialized
    assert dropped.report.verdict.cosine == kept.report.verdict.cosine and dropped.report.verdict.cosine > 0.5


def test_the_refit_frontiers_hold_what_the_budget_leaves_and_spill_past_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each frontier's budget is the budget less both runs, `BATCH_COPIES` batches and the headroom, halved; no
    frontier ever holds more than its budget, it spills exactly when the unbounded run held more, and the model is
    the same bytes (and outputs) as with the default budget."""
    from onnxslim_prune import prune
    from onnxslim_prune.calib import engine, memory
    from onnxslim_prune.calib.statistic import STATISTICS_LABEL
    from onnxslim_prune.methods import datadriven, reconstruct
    from tests import models as M

    model = M.residual_projection(dead_res=(1, 5))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    x = np.random.default_rng(3).standard_normal((96, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    seen: list[tuple[int, int]] = []  # (budget, batch bytes) of each refit
    stores: list[tuple[int, int, bool]] = []  # (budget, most held, spilled) of each frontier

    def recording(budget: int, batch_bytes: int) -> int:
        seen.append((budget, batch_bytes))
        return memory.frontier_budget(budget, batch_bytes)

    def closing(self: engine.FrontierStore) -> None:
        if self.label not in (datadriven.COVARIANCE_LABEL, STATISTICS_LABEL):  # the refit's frontiers only
            stores.append((self.budget, self.peak_bytes, self.spilled))
        real_close(self)

    real_close = engine.FrontierStore.close
    monkeypatch.setattr(reconstruct, "frontier_budget", recording)
    monkeypatch.setattr(engine.FrontierStore, "close", closing)
    runs = {}
    for name, budget in (("default", None), ("bounded", 1 << 20)):
        seen.clear()
        stores.clear()
        result = prune(model, "ldrf", 0.25, calib=str(tmp_path / "c.npz"), calib_memory=budget, holdout=0.0,
                       round_to=1, latency=False, batch_size=16)
        runs[name] = (result.model.SerializeToString(), list(seen), list(stores))
    (default, _, unbounded), (bounded, refits, held) = runs["default"], runs["bounded"]
    assert len(refits) == 1 and len(held) == 2 == len(unbounded)
    budget, batch = refits[0]
    # the largest level's tensors of both networks (the pruned relu_1 and conv_b outputs, the original's Add: 5,120
    # bytes a sample) for a batch of 16
    assert budget == 1 << 20 and batch == 16 * 5120
    frontier = memory.frontier_budget(budget, batch)
    counted = 2 * (budget // memory.RUN_SHARE) + memory.BATCH_COPIES * batch + budget // memory.HEADROOM_SHARE
    assert 0 < frontier and 2 * frontier + counted <= budget
    assert memory.frontier_budget(budget, batch + 2048) < frontier  # a larger batch leaves less to the frontiers
    for (store_budget, most, spilled), (_, most_unbounded, _) in zip(held, unbounded):
        assert store_budget == frontier and most <= frontier
        assert spilled == (most_unbounded > frontier)
    assert any(spilled for _, _, spilled in held)  # the bound binds here: something went to disk
    assert bounded == default
    np.testing.assert_array_equal(run(onnx.load_from_string(bounded), {"x": x[:8]})[0],
                                  run(onnx.load_from_string(default), {"x": x[:8]})[0])


def test_a_refit_batch_takes_fewer_samples_when_its_tensors_would_pass_their_share(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`BATCH_COPIES` of a refit batch stay within 1 / `BATCH_SHARE` of the budget: a level whose tensors are large
    for the budget (a language model's logits) runs fewer samples a batch. On an MLP (every sample one row, so the
    least squares are the same whatever the batching) the refitted model gives the same outputs to float rounding."""
    import logging

    from onnxslim_prune import prune
    from onnxslim_prune.calib import memory
    from tests import models as M

    assert memory.refit_batch(32, 25 << 20, 6 << 30) == 20  # SmolLM2's logits: 25 MiB a window, the 6 GiB default
    assert memory.refit_batch(32, 4 << 20, 6 << 30) == 32  # EfficientNet-Lite1's stem level: unchanged
    assert memory.refit_batch(32, 1 << 30, 1 << 30) == 1 and memory.refit_batch(32, 0, 1) == 32
    # without --calib-memory the rule takes a fixed 4 GiB, not a share of this machine's RAM (the same bytes anywhere)
    assert memory.explicit_budget() is None and memory.refit_batch(32, 25 << 20) == 13

    model = M.mlp()
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(3).standard_normal((96, 16)).astype(np.float32))
    outputs = {}
    for name, budget in (("default", None), ("tight", 6_000)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onnxslim_prune.methods.reconstruct"):
            result = prune(model, "ldrf", 0.5, calib=str(tmp_path / "c.npz"), calib_memory=budget, holdout=0.0,
                           round_to=1, latency=False, batch_size=16)
        rebatched = [r.getMessage() for r in caplog.records if "batches of" in r.getMessage()]
        # the level's tensors: the pruned hidden layer (6 of 12 floats) and the original's output (5), 44 bytes a
        # sample: 6,000 // 4 // (3 x 44) = 11 samples a batch instead of 16
        assert rebatched == ([] if name == "default" else ["reconstruct: batches of 11 samples, not 16: a level's "
                                                           "tensors take 44 B a sample"]), rebatched
        outputs[name] = run(result.model)[0]
    np.testing.assert_allclose(outputs["tight"], outputs["default"], rtol=1e-4, atol=1e-5)


def test_selection_covariances_past_their_share_wait_in_files_and_give_the_same_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`input_covariances` keeps a quarter of the budget of covariances in memory and the rest in files (SmolLM2-135M:
    0.8 GB of them under a 1G ``--calib-memory``): with none held in memory, ``obs`` by predicted damage writes the
    same bytes; the store reads back every matrix bit for bit, iterates in network order, and its folder is gone
    once it is dropped."""
    from onnxslim_prune.methods import datadriven

    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", "off")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((96, 16)).astype(np.float32))
    stores: list[datadriven.CovarianceStore] = []
    real = datadriven.input_covariances

    def recording(*args: Any, **kwargs: Any) -> Any:
        stores.append(real(*args, **kwargs))
        return stores[-1]

    monkeypatch.setattr(datadriven, "input_covariances", recording)
    kwargs: dict[str, Any] = dict(calib=str(tmp_path / "c.npz"), latency=False, round_to=1, params={"target_macs": 0.7})
    held = api.prune(classifier(), "obs", 0.5, **kwargs)
    assert not stores[-1].spilled  # the default budget holds both layers' covariances
    monkeypatch.setattr(datadriven, "COVARIANCE_SHARE", 1 << 40)  # nothing in memory
    spilled = api.prune(classifier(), "obs", 0.5, **kwargs)
    store = stores[-1]
    assert not store._store._memory and len(store._store._files) == 2 * len(store) >= 2  # S and mean of each
    assert spilled.model.SerializeToString() == held.model.SerializeToString()

    mine = datadriven.CovarianceStore(0, ["b", "a"])
    values = {k: (np.random.default_rng(i).standard_normal((3, 3)), np.arange(3.0) + i) for i, k in enumerate("ab")}
    for key in ("a", "b"):
        mine.put(key, values[key])
    assert list(mine) == ["b", "a"] and "a" in mine and "c" not in mine
    assert all(np.array_equal(mine[k][j], values[k][j]) for k in "ab" for j in (0, 1))
    folder = mine._store._folder
    assert folder is not None
    assert folder.is_dir()
    del mine
    assert not folder.exists()


def test_shapes_read_by_running_are_fetched_a_part_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run that reads shapes inference cannot give returns every output it fetches at once (SmolLM2-135M: 816
    tensors of one window, 0.6 GB, the peak of its run): it fetches them a part at a time, within
    `SHAPE_FETCH_BYTES`, and reads the same shapes."""
    import onnxruntime as ort

    from onnxslim_prune.graph import shapes

    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x) => (int64[2, A] n1, int64[2, B] n2, int64[2, C] n3, int64[2, D] n4) {
      r = Relu (x)
      n1 = NonZero (r)
      a = Abs (x)
      n2 = NonZero (a)
      s = Sigmoid (x)
      n3 = NonZero (s)
      e = Exp (x)
      n4 = NonZero (e)
    }""")
    fetched: list[int] = []

    class Recording(ort.InferenceSession):  # type: ignore[misc]
        def run(self, names: Any, feeds: Any, *args: Any) -> Any:
            fetched.append(len(names))
            return super().run(names, feeds, *args)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    whole = shapes.static_shapes(model, {"x": (3, 64)})
    assert fetched == [4]
    fetched.clear()
    monkeypatch.setattr(shapes, "FIRST_SHAPE_FETCH", 1)
    monkeypatch.setattr(shapes, "SHAPE_FETCH_BYTES", 1)
    parts = shapes.static_shapes(model, {"x": (3, 64)})
    assert len(fetched) > 1 and sum(fetched) == 4 and parts == whole  # each output fetched once, in parts
    assert whole["n1"] == (2, 0) and whole["n2"] == (2, 0) and whole["n3"] == (2, 192) and whole["n4"] == (2, 192)
