"""``--objective latency`` (`planning.latency_search`) and ``--round-to auto`` (`roundto`).

No timing is asserted: the latency of a probe is a fake meter that reports the probe's kept MACs
fraction as its latency ratio (deterministic), or a fixed ratio, so the bisection, the choice and the
never-slower guard are tested on exact figures. Models: `models.wide_chain` (two 32-channel convs,
seeded weights) and `models.conv_chain` with 16 dead filters (zero: removing them changes nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from onnxslim_prune import api, roundto
from onnxslim_prune.cli import main
from onnxslim_prune.errors import UsageError
from onnxslim_prune.judge.latency import Latency
from onnxslim_prune.planning import latency_search
from onnxslim_prune.planning.latency_search import LatencySettings, run_latency_search
from onnxslim_prune.planning.search import Allocation, Prober, SearchSettings
from onnxslim_prune.roundto import RoundTo, RoundToParam, isa_multiple
from onnxslim_prune.judge.verdict import Gates
from onnxslim_prune.settings import RunSettings

SETTINGS = SearchSettings(max_probes=6, allocation=Allocation.RANKING, margin=0.0)


class MacsMeter:
    """Latency ratio = `curve`(MACs kept) (the final measurement: `final` when given); records what it measured."""

    def __init__(self, final: float | None = None, curve: Any = None) -> None:
        self.final = final
        self.curve = curve or (lambda m: m)
        self.calls: list[tuple[str, float]] = []

    def __call__(self, result: Any) -> Latency:
        report = result.report
        part = report.settings.get("verdict_part", "all")
        ratio = float(self.curve(report.after.macs / report.before.macs))
        if part == "final" and self.final is not None:
            ratio = self.final
        self.calls.append((part, ratio))
        return Latency(10.0, 10.0 * ratio, 5, 1)


def _prober(model: onnx.ModelProto, gates: Gates = Gates(), round_to: int = 1) -> Prober:
    return Prober(model, RunSettings("l1", latency=False, gates=gates, round_to=round_to), margin=0.0)


def _kept(model: onnx.ModelProto, name: str) -> int:
    return int(models.initializer(model, name).shape[0])


def test_probes_bisect_the_budget_towards_the_target() -> None:
    model = models.wide_chain(c=32, seed=3)
    meter = MacsMeter(curve=lambda m: 0.15 + 0.85 * m * m)  # per-op overhead and a convex curve: not linear in MACs
    outcome = run_latency_search(_prober(model), SETTINGS, 1, Gates(), LatencySettings(0.6), meter=meter)
    points = outcome.points
    assert 2 <= len(points) <= SETTINGS.max_probes and all(p.valid for p in points)
    # every probe after the first lies strictly inside the bracket the earlier ones left
    for i, p in enumerate(points[1:], start=1):
        slow = max([q.share for q in points[:i] if q.ratio > 0.6], default=0.0)
        fast = min([q.share for q in points[:i] if q.ratio <= 0.6], default=1.0)
        assert slow < p.share < fast
    chosen = next(p for p in points if p.probe.index == outcome.search.chosen)
    meeting = [p for p in points if p.ratio <= 0.6]
    assert chosen.ratio == max(p.ratio for p in meeting)  # the least-pruned probe that meets the target
    assert 0.6 * (1 - latency_search.TOLERANCE) <= chosen.ratio <= 0.6  # it stopped within the tolerance
    assert outcome.final_ratio == pytest.approx(chosen.ratio, abs=1e-12) and not outcome.slower
    assert [part for part, _ in meter.calls] == ["selection"] * len(points) + ["final"]
    # structure: fewer channels, the written model's MACs are the chosen probe's
    written = outcome.result.model
    assert _kept(written, "conv1.w") < 32 and _kept(written, "conv2.w") <= 32
    report = outcome.result.report
    assert report.after.macs / report.before.macs == pytest.approx(chosen.probe.measurement.macs, abs=1e-12)
    assert 0.15 + 0.85 * chosen.probe.measurement.macs ** 2 == pytest.approx(chosen.ratio, abs=1e-12)
    assert report.extra["latency_search"]["final_ratio"] == pytest.approx(chosen.ratio)
    assert [p["latency_ratio"] for p in report.extra["search"]["probes"]] == [p.ratio for p in points]
    # numbers: the written model is the chosen probe's plan, run again (onnxruntime, seeded input, atol 1e-6)
    again = api.prune(model, "l1", params=dict(chosen.probe.params), latency=False).model
    feed = models.inputs_for(model, seed=4)
    assert np.allclose(models.run(written, feed)[0], models.run(again, feed)[0], atol=1e-6)


def test_a_gate_writes_the_fastest_model_that_passes(tmp_path: Path) -> None:
    model = models.conv_chain(dead1=range(16), c1=32, c2=32, seed=2)
    gates = Gates(min_correlation=0.9999)
    settings = SearchSettings(max_probes=10, allocation=Allocation.RANKING, margin=0.0)
    calib = tmp_path / "calib.npz"  # a gate needs real samples (random inputs cannot pass one): 24 held out
    np.savez(calib, x=np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    prober = Prober(model, RunSettings("l1", latency=False, gates=gates, calib=str(calib), holdout=0.5,
                                                params={"reconstruct": False}), margin=0.0)
    outcome = run_latency_search(prober, settings, 1, gates, LatencySettings(0.2), meter=MacsMeter())
    passing = [p for p in outcome.points if p.passed]
    assert passing and any(not p.passed for p in outcome.points)  # the target is out of reach within the gate
    chosen = next(p for p in outcome.points if p.probe.index == outcome.search.chosen)
    assert chosen.ratio == min(p.ratio for p in passing) and chosen.ratio > 0.2
    assert any("not reached within the gate" in n for n in outcome.notes)
    written = outcome.result.model
    assert 16 <= _kept(written, "conv1.w") < 32  # dead filters go first; a live one would break the gate
    feed = models.inputs_for(model, seed=1)
    assert np.allclose(models.run(written, feed)[0], models.run(model, feed)[0], atol=1e-5)


def test_a_written_model_slower_than_the_original_is_flagged() -> None:
    model = models.wide_chain(c=32, seed=3)
    outcome = run_latency_search(_prober(model), SETTINGS, 1, Gates(), LatencySettings(0.6), meter=MacsMeter(final=1.2))
    assert outcome.slower and outcome.final_ratio == pytest.approx(1.2)
    assert any("SLOWER" in n for n in outcome.notes) and outcome.result.report.extra["latency_search"]["slower"]
    assert _kept(outcome.result.model, "conv1.w") < 32  # the pruned model itself is valid and runs
    out = models.run(outcome.result.model, models.inputs_for(model, seed=0))[0]
    assert out.shape == (1, 5) and np.all(np.isfinite(out))


def test_no_probe_faster_than_the_original_writes_it_unchanged() -> None:
    model = models.wide_chain(c=32, seed=3)

    def never_faster(result: Any) -> Latency:
        return Latency(10.0, 11.0, 5, 1)

    outcome = run_latency_search(_prober(model), SETTINGS, 1, Gates(), LatencySettings(0.6), meter=never_faster)
    assert outcome.search.chosen is None and not outcome.slower  # the original is no result slower than itself
    assert any("no probe was faster" in n for n in outcome.notes)
    assert _kept(outcome.result.model, "conv1.w") == 32 and _kept(outcome.result.model, "conv2.w") == 32
    feed = models.inputs_for(model, seed=0)
    assert np.array_equal(models.run(outcome.result.model, feed)[0], models.run(model, feed)[0])


def test_the_latency_objective_needs_a_target_or_a_gate() -> None:
    with pytest.raises(UsageError, match="needs --target-latency"):
        run_latency_search(_prober(models.wide_chain(c=8)), SETTINGS, 1, Gates(), LatencySettings(None), meter=MacsMeter())
    with pytest.raises(UsageError, match="--target-latency must be"):
        LatencySettings(1.5)


# ----------------------------------------------------------------------------- --round-to auto


def test_round_to_auto_is_the_isa_block_and_deterministic() -> None:
    assert isa_multiple(frozenset({"sse4_1", "avx", "avx2", "avx512f"}), "x86_64") == 16
    assert isa_multiple(frozenset({"sse4_1", "avx", "avx2"}), "x86_64") == 8
    assert isa_multiple(frozenset({"fp", "asimd"}), "aarch64") == 4
    assert isa_multiple(frozenset(), "riscv64") == 1
    block = max(isa_multiple(), roundto.AUTO_FLOOR)
    assert roundto.resolve(RoundTo.AUTO) == roundto.resolve(RoundTo.AUTO) == roundto.Rounding(block, adaptive=True)
    assert roundto.resolve(8) == roundto.Rounding(8)
    with pytest.raises(UsageError):
        roundto.resolve(0)
    param = RoundToParam()
    assert param.convert("auto", None, None) is RoundTo.AUTO and param.convert(" AUTO ", None, None) is RoundTo.AUTO
    assert param.convert("8", None, None) == 8


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meter: MacsMeter, *extra: str) -> tuple[Any, Path, dict[str, Any]]:
    monkeypatch.setattr(latency_search, "InterleavedMeter", lambda prober, threads, clock: meter)
    source, out, rep = tmp_path / "m.onnx", tmp_path / "m.pruned.onnx", tmp_path / "r.json"
    onnx.save(models.wide_chain(c=32, seed=3), source)
    result = CliRunner().invoke(main, [str(source), "-o", str(out), "--report", str(rep), "-q", *extra])
    return result, out, json.loads(rep.read_text()) if rep.exists() else {}


def test_cli_latency_objective_rounds_to_auto_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, out, report = _cli(tmp_path, monkeypatch, MacsMeter(), "--objective", "latency", "--target-latency", "0.6")
    assert result.exit_code == 0, result.output
    block = max(isa_multiple(), roundto.AUTO_FLOOR)  # the 32 channels keep multiples of the whole block
    assert report["settings"]["round_to"] == block and report["settings"]["round_to_auto"]
    assert report["extra"]["latency_search"]["target"] == 0.6
    written = onnx.load(out)
    for name in ("conv1.w", "conv2.w"):
        kept = _kept(written, name)
        assert kept == 32 or kept % block == 0
    assert report["extra"]["latency_search"]["final_ratio"] <= 1.0
    y = models.run(written, models.inputs_for(written, seed=0))[0]
    assert y.shape == (1, 5) and np.all(np.isfinite(y))
    # a plain run rounds to auto too (issue 21: never slower); --round-to 1 turns it off
    plain = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--report",
                                      str(tmp_path / "p.json"), "--ratio", "0.3", "--no-latency", "-q"])
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "p.json").read_text())["settings"]["round_to"] == block
    assert _kept(onnx.load(tmp_path / "p.onnx"), "conv1.w") % block == 0
    off = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--report",
                                    str(tmp_path / "o.json"), "--ratio", "0.3", "--no-latency", "-q", "--round-to", "1"])
    assert off.exit_code == 0, off.output
    assert json.loads((tmp_path / "o.json").read_text())["settings"]["round_to"] == 1
    assert _kept(onnx.load(tmp_path / "o.onnx"), "conv1.w") == 32 - 9


def test_cli_slower_than_the_original_is_a_missed_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, out, report = _cli(tmp_path, monkeypatch, MacsMeter(final=1.3), "--objective", "latency",
                               "--target-latency", "0.6", "--round-to", "1")
    assert result.exit_code == 3 and "slower than the original" in result.output
    assert not out.exists()  # never written silently
    assert report["extra"]["latency_search"]["slower"] and report["extra"]["latency_search"]["final_ratio"] == 1.3
    assert report["after"]["macs"] < report["before"]["macs"]
    kept = onnx.load(tmp_path / "m.onnx")  # the input is untouched and still runs
    assert models.run(kept, models.inputs_for(kept, seed=0))[0].shape == (1, 5)


def test_cli_rejects_mixed_budgets(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(models.wide_chain(c=8), source)
    runner = CliRunner()
    r1 = runner.invoke(main, [str(source), "--target-latency", "0.5"])
    r2 = runner.invoke(main, [str(source), "--objective", "latency", "--target-latency", "0.5", "--ratio", "0.3"])
    r3 = runner.invoke(main, [str(source), "--round-to", "fast"])
    assert (r1.exit_code, r2.exit_code, r3.exit_code) == (2, 2, 2)
    assert "--objective latency" in r1.output and "drop --ratio" in r2.output and "auto" in r3.output
    assert not (tmp_path / "m.pruned.onnx").exists()


def test_with_data_the_budget_walks_the_sensitivity_profile(tmp_path: Path) -> None:
    """Calibration data: the greedy order of the profile; the dead branch (free to cut) is its first step."""
    model = models.concat_branches(dead1=range(4), seed=1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    prober = Prober(model, RunSettings("l1", calib=str(calib), holdout=0.5, params={"reconstruct": False}, latency=False),
                    margin=0.0)
    settings = SearchSettings(ratios=(0.25, 0.5, 0.75), max_probes=6, margin=0.0)
    outcome = run_latency_search(prober, settings, 1, Gates(), LatencySettings(0.8), meter=MacsMeter())
    assert len(outcome.search.sensitivity) == 6  # 2 groups x 3 ratios, measured once
    assert all(p.probe.budget.startswith("steps ") for p in outcome.points)
    assert all("group_ratios" in p.probe.params for p in outcome.points)
    chosen = next(p for p in outcome.points if p.probe.index == outcome.search.chosen)
    assert chosen.ratio <= 0.8 and outcome.result.report.extra["latency_search"]["budget"] == "sensitivity"
    written = outcome.result.model
    assert _kept(written, "c1.w") == 1  # the dead branch first: 3 of its 4 filters (one must stay)
    feed = models.inputs_for(model, seed=5)
    assert np.isfinite(models.run(written, feed)[0]).all()
    assert models.run(written, feed)[0].shape == models.run(model, feed)[0].shape
