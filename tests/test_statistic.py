"""Statistics as units (`calib.statistic`): one pass for statistics that share it, one cache key, merging by sums.

Oracles: a covariance collected by the engine equals numpy's on the same activations; two
statistics over different tensors cost one pass; a second collect is a cache hit that runs no
pass, and another batch size is a miss; totals collected on two halves of the data and merged
equal the totals over all of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune.calib import load_calibration
from onnxslim_prune.calib import statistic as st
from onnxslim_prune.calib.specs import input_specs


def _mlp() -> onnx.ModelProto:
    """x[N,6] -> Gemm(8) -> Relu -> Gemm(4): two hidden tensors to gather statistics of."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calibration(model: onnx.ModelProto, path: Path, data: np.ndarray):  # type: ignore[no-untyped-def]
    np.savez(path, x=data)
    return load_calibration(path, input_specs(model))


def _activations(model: onnx.ModelProto, data: np.ndarray, name: str) -> np.ndarray:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run([name], {"x": data})[0], dtype=np.float64)


@pytest.fixture
def counted_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = st.stream_tensors

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "stream_tensors", counting)
    return calls


def test_statistics_sharing_a_pass_cost_one_and_equal_numpy(tmp_path: Path, counted_passes: list[int]) -> None:
    model = _mlp()
    data = np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32)
    calib = _calibration(model, tmp_path / "c.npz", data)
    h, r = st.PooledCovariance("h", 1, 8), st.PooledCovariance("r", 1, 8)
    moments = st.ActivationMoments({"r": (1, 2, 8)})
    st.collect(model, calib, [h, r, moments], 8, cache_dir=None)
    assert len(counted_passes) == 2  # the two covariances share one pass; moments reduce in a graph of their own
    for stat, name in ((h, "h"), (r, "r")):
        np.testing.assert_allclose(stat.covariance(), np.cov(_activations(model, data, name).T, bias=True), atol=1e-9)
    act = _activations(model, data, "r")
    m = moments.result()["r"]
    np.testing.assert_allclose(m.mean_abs, np.abs(act).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(m.apoz, (act <= 0).mean(axis=0))


def test_a_second_collect_is_a_cache_hit_and_another_batch_size_a_miss(tmp_path: Path, counted_passes: list[int]) -> None:
    model = _mlp()
    calib = _calibration(model, tmp_path / "c.npz", np.random.default_rng(2).standard_normal((24, 6)).astype(np.float32))
    first = st.PooledCovariance("h", 1, 8)
    st.collect(model, calib, [first], 8, cache_dir=tmp_path / "cache")
    again = st.PooledCovariance("h", 1, 8)
    st.collect(model, calib, [again], 8, cache_dir=tmp_path / "cache")
    assert len(counted_passes) == 1
    np.testing.assert_array_equal(again.covariance(), first.covariance())
    st.collect(model, calib, [st.PooledCovariance("h", 1, 8)], 6, cache_dir=tmp_path / "cache")
    assert len(counted_passes) == 2
    assert st.cache_key("m", calib, 8, first) != st.cache_key("m", calib, 6, first)


def test_totals_of_two_halves_merge_into_the_totals_of_the_whole(tmp_path: Path) -> None:
    model = _mlp()
    data = np.random.default_rng(3).standard_normal((32, 6)).astype(np.float32)
    parts = {}
    for name, rows in (("whole", data), ("a", data[:16]), ("b", data[16:])):
        calib = _calibration(model, tmp_path / f"{name}.npz", rows)
        rows_of: st.RowSampler = lambda x, rng: x  # noqa: E731 - a MatMul's rows are its input's rows
        stats = [st.PooledCovariance("r", 1, 8), st.ActivationMoments({"r": (1, 2, 8)}),
                 st.SampledGrams([("mm2", "r", 8, rows_of)], seed=0, chunk=0, settings="all rows")]
        st.collect(model, calib, stats, 8, cache_dir=None)
        for stat in stats:
            stat.finish()
        parts[name] = stats
    for whole, a, b in zip(parts["whole"], parts["a"], parts["b"]):
        a.merge(b)
        merged, total = a.state(), whole.state()
        assert merged.keys() == total.keys()
        for key in total:
            np.testing.assert_allclose(merged[key], total[key], rtol=1e-6, atol=1e-6, err_msg=f"{whole.kind}: {key}")
    cov, mean = parts["whole"][2].take_covariances()["mm2"]
    act = _activations(model, data, "r")
    np.testing.assert_allclose(cov, np.cov(act.T, bias=True), atol=1e-5)
    np.testing.assert_allclose(mean, act.mean(axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="cannot merge"):
        parts["whole"][0].merge(st.PooledCovariance("h", 1, 8))


def test_staged_statistics_run_each_node_once_equal_numpy_and_are_cached(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`collect_staged`: a statistic per stage of one pass. The covariances of h (after mm1) and r (after relu) equal
    numpy's; the sessions built run mm1, relu and nothing else (`collect` would run mm1 twice, once per pass); a
    second call is a cache hit that builds no session; `done` sees the statistics in order, each once."""
    from onnxslim_prune.calib.engine import StagedPasses

    model = _mlp()
    data = np.random.default_rng(4).standard_normal((40, 6)).astype(np.float32)
    calib = _calibration(model, tmp_path / "c.npz", data)
    staged: list[list[str]] = []
    real = StagedPasses._session

    def recording(self, model, stage, *args, **kwargs):  # type: ignore[no-untyped-def]
        staged.append([self._model.graph.node[i].name for i in stage])
        return real(self, model, stage, *args, **kwargs)

    monkeypatch.setattr(StagedPasses, "_session", recording)
    seen: list[str] = []
    h, r = st.PooledCovariance("h", 1, 8), st.PooledCovariance("r", 1, 8)
    st.collect_staged(model, calib, [h, r], 8, done=lambda s: seen.append(s.tensors[0]), cache_dir=tmp_path / "cache")
    assert staged == [["mm1"], ["relu"]] and seen == ["h", "r"]
    for stat, name in ((h, "h"), (r, "r")):
        np.testing.assert_allclose(stat.covariance(), np.cov(_activations(model, data, name).T, bias=True), atol=1e-9)
    again = st.PooledCovariance("r", 1, 8)
    st.collect_staged(model, calib, [st.PooledCovariance("h", 1, 8), again], 8, done=lambda s: seen.append(s.tensors[0]),
                      cache_dir=tmp_path / "cache")
    assert len(staged) == 2 and seen == ["h", "r", "h", "r"]
    np.testing.assert_array_equal(again.covariance(), r.covariance())
    with pytest.raises(ValueError, match="graph of its own"):
        st.collect_staged(model, calib, [st.ActivationMoments({"r": (1, 2, 8)})], 8, done=lambda s: None, cache_dir=None)
