"""The damage allocation of the gated search (`planning.search`: `Allocation.AUTO` / `DAMAGE`, `Line`).

Oracles: a synthetic gate slack whose boundary is known (the line must bracket it within its resolution, in
fewer probes than a bisection); a model whose two branches hold dead filters (removing exactly them leaves the
outputs unchanged, so it is the smallest model within a tight gate); the serial search (local workers and a
local Ray cluster give its probes, figure for figure, and its bytes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from onnxslim_prune.cli import main
from onnxslim_prune.errors import UsageError
from onnxslim_prune.planning.search import (
    LINE_RESOLUTION, Allocation, Line, Measurement, Objective, Prober, SearchSettings, original_slack,
    resolved, run_search,
)
from onnxslim_prune.settings import RunSettings
from onnxslim_prune.judge.verdict import Gates


def _measured(kept: float, slack: float) -> Measurement:
    return Measurement(kept, kept, slack >= 0, 0.0, None, None, None, 100, 0.0, slack=slack)


def _walk(line: Line, slack: Any) -> list[float]:
    asked = []
    while (job := line.next()) is not None:
        kept = job[0]["kept"]
        asked.append(kept)
        line.record(_measured(kept, slack(kept)))
    return asked


def test_a_line_brackets_the_gate_boundary_within_its_resolution() -> None:
    # not a power law (so no fit lands on the root by construction): the slack is 0 at 0.68377 kept
    origin = 0.01

    def slack(kept: float) -> float:
        c = 1.0 - kept
        return origin - 0.08 * c**2 - 0.2 * c**4

    root = 0.68377
    assert slack(root - 1e-4) < 0 < slack(root + 1e-4)
    asked = _walk(Line("t", lambda k: ({"kept": round(k, 6)}, ""), 10, origin, Objective.MACS), slack)
    passes = [k for k in asked if slack(k) >= 0]
    misses = [k for k in asked if slack(k) < 0]
    assert asked[0] == 0.6 and len(asked) == 4  # a bisection of [0.05, 1] to 0.02 takes 6
    assert root <= min(passes) <= root + LINE_RESOLUTION and root - LINE_RESOLUTION <= max(misses) < root


def test_a_line_on_a_staircase_stops_at_a_repeated_run() -> None:
    # runs exist only at tenths: the fraction asked for maps to the tenth below it (a uniform ratio's rounded widths)
    line = Line("t", lambda k: ({"kept": math.floor(k * 10 + 1e-9) / 10}, ""), 10, 0.01, Objective.MACS)
    asked = _walk(line, lambda k: 0.01 - 0.05 * (1 - k) ** 2)  # the boundary at 0.553: 0.6 passes, 0.5 misses
    assert asked[0] == 0.6 and 0.5 in asked and len(asked) == len(set(asked)) <= 4 and line.done
    assert original_slack(Gates(max_drop=1.0)) == pytest.approx(0.01)
    assert original_slack(Gates(min_top1_agreement=0.95, min_correlation=0.99)) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- dead filters in both branches


def _setup(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    """c1: 4 filters, 2 dead; c2: 6 filters, 3 dead; 48 seeded inputs."""
    model = models.concat_branches(dead1=range(2), dead2=range(3), seed=1)
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    return model, path


GATES = Gates(min_correlation=0.999)


def _search(model: onnx.ModelProto, calib: Path, **pool: Any) -> Any:
    prober = Prober(model, RunSettings("ldrf", calib=str(calib), holdout=0.5, latency=False, gates=GATES), margin=0.0, **pool)
    return run_search(prober, SearchSettings(margin=0.0), 1, GATES, with_sensitivity=False)


def _figures(outcome: Any) -> list[tuple[Any, ...]]:
    return [(p.index, p.budget, p.measurement.macs, p.measurement.damage, p.measurement.correlation,
             p.measurement.slack, p.measurement.passed) for p in outcome.probes]


def test_the_damage_search_writes_the_smallest_model_within_the_gate_with_any_workers(tmp_path: Path) -> None:
    model, calib = _setup(tmp_path)
    outcome = _search(model, calib)
    assert outcome.settings.allocation is Allocation.DAMAGE and not outcome.sensitivity  # no profile probes
    chosen = next(p for p in outcome.probes if p.index == outcome.chosen)
    assert chosen.measurement.macs == pytest.approx(0.5, abs=1e-3)  # the dead filters, nothing live
    kept = {i.name: onnx.numpy_helper.to_array(i).shape for i in outcome.result.model.graph.initializer}
    assert kept["c1.w"][0] == 2 and kept["c2.w"][0] == 3
    feed = {"x": np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert np.allclose(models.run(model, feed)[0], models.run(outcome.result.model, feed)[0], atol=1e-4)
    budgets = [p.budget for p in outcome.probes]
    assert any(b.startswith("target macs") for b in budgets) and any(b.startswith("uniform ratio") for b in budgets)
    for p in outcome.probes:  # the slack's sign is the verdict; nothing probed is smaller and passes
        m = p.measurement
        assert m.slack is not None and (m.slack >= 0) == m.passed
        assert not (m.passed and m.macs < chosen.measurement.macs - 1e-9)
    assert outcome.result.report.extra["search"]["allocation"] == "damage"
    # the same probes and bytes from two local worker processes
    parallel = _search(model, calib, workers=2)
    assert _figures(parallel) == _figures(outcome) and parallel.chosen == outcome.chosen
    assert parallel.result.serialized == outcome.result.serialized


def test_a_local_ray_cluster_gives_the_serial_damage_search(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    model, calib = _setup(tmp_path)
    serial = _search(model, calib)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        clustered = _search(model, calib, ray_address="local")
    finally:
        ray.shutdown()
    assert _figures(clustered) == _figures(serial) and clustered.result.serialized == serial.result.serialized


def test_auto_is_damage_only_where_the_method_shares_its_budget_by_damage(tmp_path: Path) -> None:
    model, calib = _setup(tmp_path)

    def allocation(method: str, **params: Any) -> Allocation:
        prober = Prober(model, RunSettings(method, calib=str(calib), holdout=0.5, latency=False, params=params))
        return resolved(prober, SearchSettings()).allocation

    assert allocation("ldrf") is Allocation.DAMAGE and allocation("thinet") is Allocation.DAMAGE
    assert allocation("l1") is Allocation.SENSITIVITY  # a data-free criterion predicts no damage
    assert allocation("ldrf", budget_allocation="ranking") is Allocation.SENSITIVITY
    prober = Prober(model, RunSettings("l1", calib=str(calib), holdout=0.5, latency=False))
    with pytest.raises(UsageError, match="--allocation damage needs"):
        resolved(prober, SearchSettings(allocation=Allocation.DAMAGE))


def test_cli_search_defaults_to_the_damage_allocation(tmp_path: Path) -> None:
    model, calib = _setup(tmp_path)
    src, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    res = CliRunner().invoke(main, [str(src), "--method", "ldrf", "--calib", str(calib), "--holdout", "0.5",
                                    "--min-correlation", "0.999", "--search-margin", "0", "--no-latency", "--round-to", "1",
                                    "--workers", "1", "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "search (damage allocation" in res.output and "sensitivity (" not in res.output
    data = json.loads(report.read_text())
    assert data["extra"]["search"]["allocation"] == "damage" and "sensitivity" not in data["extra"]
    kept = {i.name: onnx.numpy_helper.to_array(i).shape for i in onnx.load(str(out)).graph.initializer}
    assert kept["c1.w"][0] == 2 and kept["c2.w"][0] == 3
