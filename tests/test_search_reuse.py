"""A search that reuses and runs probes side by side (`api.prepare`, `planning.workers`), and its plain candidates.

Oracles: a fresh `api.prune` with the same settings (byte-identical models, equal verdicts); the serial
profile (a parallel or Ray profile gives the same figures in the same order); channels whose filters are
zero (removing exactly them leaves the outputs unchanged), so a uniform ratio that removes only those is
the smallest model within a tight gate, which a profile limited to a quarter of each group cannot reach.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from onnxslim_prune import api, sensitivity_profile
from onnxslim_prune.cli import main
from onnxslim_prune.planning.parts import VerdictPart
from onnxslim_prune.planning.search import Prober, SearchSettings, run_search, run_sensitivity
from onnxslim_prune.judge.verdict import Gates
from onnxslim_prune.settings import RunSettings

SETTINGS = SearchSettings(ratios=(0.25, 0.5, 0.75), max_probes=6, margin=0.0)


def _data(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return path


def _kwargs(calib: Path) -> dict[str, object]:
    return dict(calib=str(calib), holdout=0.5, latency=False, cache=None)


@pytest.mark.parametrize("method", ["l1", "ldrf", "merge"])
def test_a_prepared_run_gives_the_bytes_of_a_fresh_prune(tmp_path: Path, method: str) -> None:
    model = models.concat_branches(dead1=range(2), seed=3)
    calib = _data(tmp_path)
    prepared = api.prepare(model, method, **_kwargs(calib))  # type: ignore[arg-type]
    # each allocation twice: a run must leave the prepared graph as it was
    for ratios in (((0, 0.5),), ((0, 0.25), (1, 0.5)), ((0, 0.5),)):
        for part in (VerdictPart.SELECTION, VerdictPart.ALL):
            reused = prepared.run({"group_ratios": ratios}, part=part)
            fresh = api.prepare(model, method, params={"group_ratios": ratios}, part=part,
                                **_kwargs(calib)).run(part=part, consume=True)  # type: ignore[arg-type]
            assert reused.serialized is not None and reused.serialized == fresh.serialized
            assert reused.report.verdict == fresh.report.verdict and reused.report.notes == fresh.report.notes
            assert reused.report.after == fresh.report.after and reused.report.after.macs < reused.report.before.macs
    plain = api.prune(model, method, 0.5, calib=str(calib), holdout=0.5, latency=False)
    again = prepared.run(ratio=0.5)
    assert plain.serialized == again.serialized and plain.report.verdict == again.report.verdict
    kept = {i.name: onnx.numpy_helper.to_array(i).shape for i in again.model.graph.initializer}
    assert kept["c1.w"][0] == 2 and kept["c2.w"][0] == 3  # half of 4 and of 6 filters


def _profile(model: onnx.ModelProto, calib: Path, **pool: object) -> list[tuple[object, ...]]:
    prober = Prober(model, RunSettings("l1", calib=str(calib), holdout=0.5, params={"reconstruct": False}, latency=False),
                    margin=0.0, **pool)  # type: ignore[arg-type]
    rows = run_sensitivity(prober, SETTINGS, 1, proxy=False).rows
    return [(r.group, r.node, r.ratio, r.removed, r.macs_saved, r.damage, r.correlation, r.failed) for r in rows]


def test_workers_give_the_serial_profile(tmp_path: Path) -> None:
    model, calib = models.concat_branches(dead1=range(4), seed=1), _data(tmp_path)
    serial = _profile(model, calib, workers=1)
    rows = sensitivity_profile(model, "l1", settings=SETTINGS, workers=2, calib=str(calib), holdout=0.5,
                               params={"reconstruct": False}, latency=False).rows
    assert [(r.group, r.node, r.ratio, r.removed, r.macs_saved, r.damage, r.correlation, r.failed) for r in rows] == serial
    assert len(serial) == 6 and [r[1] for r in serial] == ["c1"] * 3 + ["c2"] * 3
    assert all(r[5] < 1e-9 for r in serial[:3]) and all(r[5] > 1e-3 for r in serial[3:])  # dead, then live


def test_a_local_ray_cluster_gives_the_serial_profile(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    model, calib = models.concat_branches(dead1=range(4), seed=1), _data(tmp_path)
    serial = _profile(model, calib, workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert _profile(model, calib, ray_address="local") == serial
    finally:
        ray.shutdown()


def test_ray_missing_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    path = tmp_path / "m.onnx"
    onnx.save(models.concat_branches(seed=1), str(path))
    result = CliRunner().invoke(main, [str(path), "--calib", str(_data(tmp_path)), "--sensitivity", "--ray", "auto"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ray needs Ray: pip install 'onnxslim-prune[ray]'"


def test_the_search_writes_the_uniform_run_when_it_is_smaller_within_the_gate(tmp_path: Path) -> None:
    # half of each branch is dead: uniform 0.5 removes exactly those (outputs unchanged); a profile cut at a quarter
    # of each group at most cannot reach it, so the allocation's best keeps more
    model, calib = models.concat_branches(dead1=range(2), dead2=range(3), seed=1), _data(tmp_path)
    gates = Gates(min_correlation=0.9999)
    prober = Prober(model, RunSettings("l1", calib=str(calib), holdout=0.5, params={"reconstruct": False}, latency=False,
                                                gates=gates), margin=0.0)
    settings = SearchSettings(ratios=(0.25,), max_probes=6, margin=0.0, baseline_probes=3)
    outcome = run_search(prober, settings, 1, gates, with_sensitivity=True)
    chosen = next(p for p in outcome.probes if p.index == outcome.chosen)
    allocated = [p for p in outcome.probes if "group_ratios" in p.params and p.measurement.passed]
    plain = [p for p in outcome.probes if "ratio" in p.params or "target_macs" in p.params]
    assert allocated and plain and chosen.budget.startswith("uniform ratio")
    assert chosen.measurement.macs < min(p.measurement.macs for p in allocated)
    # nothing probed dominates the written one: no passing probe is as small and less damaged
    for p in outcome.probes:
        m = p.measurement
        assert not (m.passed and m.macs <= chosen.measurement.macs and m.damage < chosen.measurement.damage)
    kept = {i.name: onnx.numpy_helper.to_array(i).shape for i in outcome.result.model.graph.initializer}
    assert kept["c1.w"][0] == 2 and kept["c2.w"][0] == 3  # exactly the live filters
    feed = {"x": np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert np.allclose(models.run(model, feed)[0], models.run(outcome.result.model, feed)[0], atol=1e-5)
    assert outcome.result.report.verdict is not None and outcome.result.report.verdict.passed
    assert outcome.result.report.extra["search"]["probes"][outcome.chosen - 1]["ratio"] == chosen.params["ratio"]
