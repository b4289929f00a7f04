"""Sensitivity, the greedy allocation and the gated search (`planning.search`, `planning.parts`).

Oracles: a model whose first branch is dead (all its filters zero: removing its channels changes
nothing) beside one that matters; sample identity (a pixel holds each calibration sample's index)
for the three-way split fit / selection / final; the hull and the greedy order recomputed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_FMNIST, SAMPLE_LENET
from tagged import record_reads, tagged_calibration

import models
from onnxslim_prune import api
from onnxslim_prune.calib import load_calibration
from onnxslim_prune.calib import split as split_mod
from onnxslim_prune.calib.specs import input_specs
from onnxslim_prune.cli import main
from onnxslim_prune.errors import UsageError
from onnxslim_prune.planning.parts import VerdictPart, part_indices
from onnxslim_prune.planning.search import (
    Prober, SearchSettings, SensitivityRow, allocation_at, greedy_steps, passes_with_margin, probe_table, run_search,
    run_sensitivity, run_targeted, sensitivity_table, sorted_rows,
)
from onnxslim_prune.judge.verdict import Gates
from onnxslim_prune.settings import RunSettings



def _row(group: int, ratio: float, saved: float, damage: float) -> SensitivityRow:
    return SensitivityRow(group, f"n{group}", 8, ratio, int(8 * ratio), saved, saved, damage, None, None, None)


def test_parts_are_seeded_disjoint_and_cover() -> None:
    sel, fin = (part_indices(25, p, 3) for p in (VerdictPart.SELECTION, VerdictPart.FINAL))
    assert len(sel) == 13 and len(fin) == 12 and not set(sel) & set(fin) and set(sel) | set(fin) == set(range(25))
    assert np.array_equal(sel, part_indices(25, VerdictPart.SELECTION, 3))
    assert not np.array_equal(sel, part_indices(25, VerdictPart.SELECTION, 4))
    assert len(part_indices(25, VerdictPart.SELECTION, 3, static_batch=4)) == 16  # rounded to the static batch
    assert np.array_equal(part_indices(5, VerdictPart.ALL, 0), np.arange(5))


def test_greedy_steps_take_each_groups_hull_in_slope_order() -> None:
    rows = [
        # group 0: free up to 0.5, then costly; the 0.25 point lies on the hull's first edge and is dropped
        _row(0, 0.25, 0.10, 0.0), _row(0, 0.5, 0.20, 0.0), _row(0, 0.75, 0.30, 0.5),
        # group 1: 0.25 is above the chord from 0 to 0.5 (not convex): the hull skips it
        _row(1, 0.25, 0.05, 0.04), _row(1, 0.5, 0.10, 0.05), _row(1, 0.75, 0.15, 0.06),
    ]
    steps = greedy_steps(rows)
    assert [(s.group, s.ratio) for s in steps] == [(0, 0.5), (1, 0.75), (0, 0.75)]
    assert steps[0].slope == 0.0 and steps[1].slope == pytest.approx(0.06 / 0.15) and steps[2].slope == pytest.approx(5.0)
    assert allocation_at(steps, 0) == () and allocation_at(steps, 2) == ((0, 0.5), (1, 0.75))
    assert allocation_at(steps, 3) == ((0, 0.75), (1, 0.75))
    # a damage that falls with the ratio is noise: made non-decreasing before the hull
    noisy = greedy_steps([_row(2, 0.25, 0.1, 0.3), _row(2, 0.5, 0.2, 0.1)])
    assert [(s.ratio, s.damage) for s in noisy] == [(0.5, 0.3)]
    assert [r.group for r in sorted_rows(rows)][:2] == [0, 0]  # zero damage: most cost-effective


# ----------------------------------------------------------------------------- a dead branch beside a live one


def _branches(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    """x -> c1 (4 filters, all zero) -> Relu; x -> c2 (6 live filters) -> Relu; Concat -> c3; 48 seeded inputs."""
    model = models.concat_branches(dead1=range(4), seed=1)
    x = np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return model, path


def _prober(model: onnx.ModelProto, calib: Path, gates: Gates) -> Prober:
    return Prober(model, RunSettings("l1", calib=str(calib), holdout=0.5, gates=gates, params={"reconstruct": False},
                                     latency=False), margin=0.0)


SETTINGS = SearchSettings(ratios=(0.25, 0.5, 0.75), max_probes=6, margin=0.0)


def _group_of(result: api.PruneResult, node: str) -> int:
    return next(g.index for g in result.trace.groups if any(m.node == node for m in g.members) and not g.is_frozen)


def test_sensitivity_ranks_the_dead_group_first(tmp_path: Path) -> None:
    model, calib = _branches(tmp_path)
    outcome = run_sensitivity(_prober(model, calib, Gates()), SETTINGS, 1, proxy=False)
    rows = sorted_rows(outcome.rows)
    assert len(rows) == 6  # 2 groups x 3 ratios (4 and 6 channels: 1/2/3 and 1/3/4 removed)
    assert [r.node for r in rows[:3]] == ["c1"] * 3 and sorted(r.removed for r in rows if r.node == "c1") == [1, 2, 3]
    assert all(r.damage < 1e-9 for r in rows[:3])  # dead channels: outputs unchanged (reconstruction off)
    live = [r for r in rows if r.node == "c2"]
    assert [r.removed for r in sorted(live, key=lambda r: r.ratio)] == [1, 3, 4]
    assert all(r.damage > 1e-3 for r in live) and all(r.macs_saved > 0 for r in rows)
    assert outcome.report["rows"][0]["node"] == "c1" and not outcome.report["proxy"]


def test_the_gated_search_removes_the_dead_group_and_keeps_the_live_one(tmp_path: Path) -> None:
    model, calib = _branches(tmp_path)
    prober = _prober(model, calib, Gates(min_correlation=0.9999))
    outcome = run_search(prober, SETTINGS, 1, Gates(min_correlation=0.9999), with_sensitivity=True)
    result = outcome.result
    shapes = {i.name: i for i in result.model.graph.initializer}
    assert onnx.numpy_helper.to_array(shapes["c1.w"]).shape[0] == 1  # 3 of 4 dead filters removed (one must stay)
    assert onnx.numpy_helper.to_array(shapes["c2.w"]).shape[0] == 6  # the live branch is whole
    feed = {"x": np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert np.allclose(models.run(model, feed)[0], models.run(result.model, feed)[0], atol=1e-5)
    passing = [p for p in outcome.probes if p.measurement.passed]
    chosen = next(p for p in outcome.probes if p.index == outcome.chosen)
    assert chosen.measurement.macs == min(p.measurement.macs for p in passing)  # the smallest passing probe
    assert any(not p.measurement.passed for p in outcome.probes)  # the live group was tried and missed
    assert result.report.verdict is not None and result.report.verdict.passed
    assert result.report.settings["verdict_part"] == "final"
    search = result.report.extra["search"]
    assert len(search["probes"]) == len(outcome.probes) and search["chosen"] == chosen.index
    table = probe_table(outcome)
    assert len(table.splitlines()) == 2 + len(outcome.probes) and ">" in table
    assert json.loads(result.report.to_json())["extra"]["sensitivity"]["rows"][0]["node"] == "c1"


def test_a_search_needs_a_gate_and_a_channel_method(tmp_path: Path) -> None:
    model, calib = _branches(tmp_path)
    with pytest.raises(UsageError, match="needs a gate"):
        run_search(_prober(model, calib, Gates()), SETTINGS, 1, Gates(), with_sensitivity=False)
    prober = Prober(model, RunSettings("lcp", calib=str(calib)))
    with pytest.raises(UsageError, match="chooses its own allocation"):
        run_search(prober, SETTINGS, 1, Gates(min_cosine=0.9), with_sensitivity=False)
    with pytest.raises(UsageError, match="sensitivity-ratios"):
        SearchSettings(ratios=(0.5, 0.25))


# ----------------------------------------------------------------------------- the truth: three parts never meet


def test_probes_and_the_final_verdict_see_disjoint_held_out_halves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitting reads fit samples only; every probe is judged on the selection half, the written model on the other."""
    path = tagged_calibration(SAMPLE_FMNIST, tmp_path)
    seen = record_reads(monkeypatch)
    gates = Gates(min_top1_agreement=0.9)
    prober = Prober(onnx.load(str(SAMPLE_LENET)), RunSettings("l1", calib=str(path), seed=3, gates=gates, latency=False),
                    margin=0.0)
    outcome = run_search(prober, SearchSettings(ratios=(0.5,), max_probes=2, margin=0.0), 1, gates, with_sensitivity=False)

    calib = load_calibration(path, input_specs(onnx.load(str(SAMPLE_LENET))))
    held = set(split_mod.split_holdout(calib, 0.2, 3).holdout_indices)
    *probes, final = seen.verdicts
    assert len(probes) == 2 + len(outcome.probes)  # 2 sensitivity probes (2 groups at 0.5), the search (the trace is prepared)
    selection = probes[0]
    assert all(v == selection for v in probes) and len(selection) == 12 and len(final) == 12
    assert selection | final == held and not selection & final
    fitted = seen.seen("method", "verdict")
    assert fitted and not fitted & held  # selection, statistics, refit and the fitted companion figures: fit samples only


# ----------------------------------------------------------------------------- CLI


def test_cli_sensitivity_table_report_and_plot(tmp_path: Path) -> None:
    model, calib = _branches(tmp_path)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = tmp_path / "s.json"
    args = [str(src), "--calib", str(calib), "--holdout", "0.5", "--no-reconstruct", "--sensitivity", "--report", str(report),
            "--sensitivity-ratios", "0.5", "--round-to", "1",  # 8-channel groups: auto would keep them whole
            "--workers", "1"]  # the default's worker processes: the gated search below and test_faults' sensitivity
    plot = tmp_path / "s.png"
    plotting = True
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(plot)]
    except ImportError:
        plotting = False
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "sensitivity (each group cut alone" in res.output and "no model written" in res.output
    data = json.loads(report.read_text())["sensitivity"]
    assert len(data["rows"]) == 2 and data["rows"][0]["node"] == "c1" and data["ratios"] == [0.5]
    assert not (tmp_path / "m.pruned.onnx").exists()
    if plotting:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_gated_search_is_deterministic_and_reports_the_probes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="onnxslim_prune.planning.search")
    model, calib = _branches(tmp_path)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    outs = []
    # the default (a worker process per core), then every probe in this process: the same bytes either way
    for i, workers in enumerate(([], ["--workers", "1"])):
        out, report = tmp_path / f"o{i}.onnx", tmp_path / f"r{i}.json"
        caplog.clear()
        res = CliRunner().invoke(main, [str(src), "--calib", str(calib), "--holdout", "0.5", "--no-reconstruct",
                                        "--min-correlation", "0.9999", "--search-margin", "0", "--max-probes", "3",
                                        "--sensitivity-ratios", "0.75", "--no-latency", "--round-to", "1", "-o", str(out),
                                        "--allocation", "sensitivity", "--report", str(report), *workers])
        assert res.exit_code == 0, res.output
        assert ("local worker processes" in caplog.text) == (not workers)
        assert "search (sensitivity allocation" in res.output and "searched: smallest of" in res.output
        outs.append(out.read_bytes())
        search = json.loads(report.read_text())["extra"]["search"]
        assert search["chosen"] is not None and all("macs_kept" in p for p in search["probes"])
    assert outs[0] == outs[1]
    # an explicit --ratio is a plain gated run, not a search
    res = CliRunner().invoke(main, [str(src), "--calib", str(calib), "--holdout", "0.5", "--ratio", "0.5",
                                    "--min-correlation", "0.9999", "--no-latency", "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 3 and "search (" not in res.output


def test_data_free_sensitivity_is_a_labelled_proxy_on_seeded_inputs(tmp_path: Path) -> None:
    model, _ = _branches(tmp_path)
    prober = Prober(model, RunSettings("l1", latency=False))
    outcome = run_sensitivity(prober, SearchSettings(ratios=(0.5,)), 1, proxy=prober.data_free)
    assert prober.data_free and outcome.report["proxy"]
    rows = sorted_rows(outcome.rows)
    assert [r.node for r in rows] == ["c1", "c2"] and rows[0].damage < 1e-9 < 1e-3 < rows[1].damage
    assert "data-free proxy" in sensitivity_table(outcome.rows, True)


def test_a_macs_target_with_the_sensitivity_allocation_cuts_the_dead_group_first(tmp_path: Path) -> None:
    """c1 (4 dead filters), c2 (6 live), c3 (10 -> 5): cutting 3 of c1 keeps 1 - (3*27 + 3*90) * 64 / 46080 = 0.7 of the MACs."""
    model, calib = _branches(tmp_path)
    kwargs = dict(calib=str(calib), holdout=0.5, params={"reconstruct": False, "target_macs": 0.75}, latency=False)
    outcome = run_targeted(Prober(model, RunSettings.of("l1", **kwargs)), SETTINGS, 1)
    report = outcome.result.report
    assert report.after.macs / report.before.macs == pytest.approx(0.7)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in outcome.result.model.graph.initializer}
    assert inits["c1.w"].shape[0] == 1 and inits["c2.w"].shape[0] == 6
    assert "sensitivity allocation" in report.request and report.verdict is not None and report.verdict.correlation > 0.99999


def test_a_macs_target_cuts_the_last_step_only_as_far_as_it_needs(tmp_path: Path) -> None:
    """c1's hull is one step to 0.75 (3 dead filters, each 0.1 of the MACs): --target-macs 0.85 takes 2 of them
    (0.8 kept), not the step's 3 (0.7), so the target is met with the most kept."""
    model, calib = _branches(tmp_path)
    kwargs = dict(calib=str(calib), holdout=0.5, params={"reconstruct": False, "target_macs": 0.85}, latency=False)
    outcome = run_targeted(Prober(model, RunSettings.of("l1", **kwargs)), SETTINGS, 1)
    report = outcome.result.report
    assert report.after.macs / report.before.macs == pytest.approx(0.8)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in outcome.result.model.graph.initializer}
    assert inits["c1.w"].shape[0] == 2 and inits["c2.w"].shape[0] == 6
    assert report.verdict is not None and report.verdict.correlation > 0.99999


def test_a_degraded_probe_never_passes_whatever_its_gates_say(tmp_path: Path) -> None:
    """A gate on one figure must not let a probe through whose other outputs collapsed: `degraded` fails it."""

    model, calib = _branches(tmp_path)
    result = api.prune(model, "l1", 0.5, calib=str(calib), holdout=0.5, gates=Gates(min_correlation=0.0),
                       params={"reconstruct": False}, latency=False)
    verdict = result.report.verdict
    assert verdict is not None and verdict.gates and all(g.passed for g in verdict.gates)
    assert passes_with_margin(verdict, 0.0)
    collapsed = dataclasses.replace(verdict, degraded_reasons=("outputs no longer follow the original's",))
    assert collapsed.passed and not passes_with_margin(collapsed, 0.0)


def test_each_objective_reads_its_figures_from_its_row_of_data() -> None:
    """`OBJECTIVES`: the kept fraction a probe is ranked by, what a sensitivity step saves, the target setting."""
    from onnxslim_prune.planning.search import OBJECTIVES, Measurement, Objective, SensitivityRow

    assert set(OBJECTIVES) == set(Objective)
    m = Measurement(0.5, 0.7, True, 0.1, None, None, None, 10, 1.0, latency_ratio=0.8)
    row = SensitivityRow(0, "conv", 8, 0.5, 4, macs_saved=0.2, params_saved=0.3, damage=0.0, top1_agreement=None,
                         accuracy_drop=None, correlation=None)
    assert [m.kept(o) for o in Objective] == [0.5, 0.7, 0.8]
    assert [row.saved(o) for o in (Objective.MACS, Objective.PARAMS)] == [0.2, 0.3]
    assert [o.target_key for o in (Objective.MACS, Objective.PARAMS)] == ["target_macs", "target_params"]
    assert Measurement(0.5, 0.7, True, 0.1, None, None, None, 10, 1.0).kept(Objective.LATENCY) == float("inf")  # unmeasured


def test_each_allocation_spends_its_probes_by_its_row_of_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ALLOCATIONS`: whether a profile comes first, what spends the probes, and whether plain runs are compared."""
    from onnxslim_prune.planning import search as search_module
    from onnxslim_prune.planning.search import ALLOCATIONS, Allocation, AllocationSpec, Exploration, Probe, search

    assert set(ALLOCATIONS) == set(Allocation) - {Allocation.AUTO}
    with pytest.raises(ValueError, match="resolve"):
        _ = Allocation.AUTO.spec
    assert [a.spec.profiled for a in (Allocation.SENSITIVITY, Allocation.DAMAGE, Allocation.RANKING)] == [True, False, False]
    # a row whose exploration probes the dead group alone at 3 of 4 channels: the search writes exactly that
    model, calib = _branches(tmp_path)
    gates = Gates(min_correlation=0.9999)
    prober = _prober(model, calib, gates)
    trace = search_module.baseline(prober)
    dead = next(g.index for g in trace.groups if any(m.node == "c1" for m in g.members) and not g.is_frozen)
    seen: list[Exploration] = []

    def explore(e: Exploration) -> None:
        seen.append(e)
        measurement, _ = e.prober.probe({"group_ratios": ((dead, 0.75),)})
        e.probes.append(Probe(1, "dead group", {"group_ratios": ((dead, 0.75),)}, measurement))

    monkeypatch.setitem(ALLOCATIONS, Allocation.RANKING,
                        AllocationSpec(profiled=False, explore=explore, plain_candidates=False, ranked=True))
    outcome = search(prober, trace, dataclasses.replace(SETTINGS, allocation=Allocation.RANKING), 1, gates)
    assert len(seen) == 1 and seen[0].rows == () and len(outcome.probes) == 1  # no profile, no plain candidates
    assert outcome.chosen == 1 and outcome.probes[0].measurement.passed
    kept = {i.name: onnx.numpy_helper.to_array(i).shape[0] for i in outcome.result.model.graph.initializer
            if i.name in ("c1.w", "c2.w")}
    assert kept == {"c1.w": 1, "c2.w": 6}
