"""Issue 21, never slower: ``--round-to auto`` keeps the original's channel alignment, and the speed gates.

Rounding is tested on small conv chains whose lowest-L1 filters are zero: the pruned model must keep
counts that are multiples of each group's own alignment (structure) and compute the original's outputs
exactly (numbers: onnxruntime, 1e-5). The gates are tested with an injected measurement
(`judging.timed` replaced): no test times anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxslim_prune.pipeline import judging
from onnxslim_prune import api, roundto
from onnxslim_prune.channels import Group
from onnxslim_prune.cli import main
from onnxslim_prune.judge.latency import SLOWER_TOLERANCE, Latency, median_interval
from onnxslim_prune.ops.testing import assert_same_outputs, initializer, parse, weights, zeroed
from onnxslim_prune.analysis.plan import kept_count
from onnxslim_prune.roundto import Rounding
from onnxslim_prune.judge.verdict import Gates

import models as M


def _chain(widths: Sequence[int], dead: Sequence[int]) -> onnx.ModelProto:
    """x[1,3,6,6] -> Conv(w1) -> Relu -> ... -> Conv(wN) -> Relu -> Conv(5, frozen output); `dead[i]` filters of
    conv i+1 are zero (no bias), so l1 removes them first and removing them changes nothing."""
    lines, prev, inputs = [], "x", 3
    named: dict[str, np.ndarray] = {}
    for i, (c, d) in enumerate(zip(widths, dead), start=1):
        lines.append(f"h{i} = Conv <pads = [1, 1, 1, 1]> ({prev}, w{i})")
        lines.append(f"r{i} = Relu (h{i})")
        named[f"w{i}"] = zeroed(weights(c, inputs, 3, 3, seed=i), tuple(range(d)))
        prev, inputs = f"r{i}", c
    lines.append(f"y = Conv ({prev}, wo)")
    named["wo"] = weights(5, inputs, 1, 1, seed=99)
    text = '<ir_version: 8, opset_import: ["" : 17]>\ng (float[1,3,6,6] x) => (float[1,5,6,6] y) {\n  ' + \
        "\n  ".join(lines) + "\n}"
    return parse(text, **named)


def _kept(model: onnx.ModelProto, name: str) -> int:
    return int(initializer(model, name).shape[0])


# ----------------------------------------------------------------------------- rounding


def test_auto_keeps_each_groups_original_alignment() -> None:
    # 48 = 3 x 16, 40 = 5 x 8, 12 = 3 x 4: with a block of 16 each keeps its own multiple (16, 8, 4)
    model = _chain((48, 40, 12), dead=(16, 16, 4))
    result = api.prune(model, "l1", 0.5, round_to=Rounding(16, adaptive=True), latency=False)
    kept = [_kept(result.model, f"w{i}") for i in (1, 2, 3)]
    assert kept == [32, 24, 8]  # half of each (24, 20, 6), rounded up to 16, 8 and 4
    assert [g.multiple for g in result.report.groups if g.kept < g.size] == [16, 8, 4]
    assert result.report.rounding["pruned_groups_by_multiple"] == {"16": 1, "8": 1, "4": 1}
    assert result.report.settings["round_to"] == 16 and result.report.settings["round_to_auto"]
    assert_same_outputs(model, result.model)  # only the zero filters went: the same outputs (1e-5)
    # a fixed --round-to 16 forces every group to multiples of 16 (or whole); --round-to 1 rounds nothing
    fixed = api.prune(model, "l1", 0.5, round_to=16, latency=False)
    assert [_kept(fixed.model, f"w{i}") for i in (1, 2, 3)] == [32, 32, 12]
    off = api.prune(model, "l1", 0.5, round_to=1, latency=False)
    assert [_kept(off.model, f"w{i}") for i in (1, 2, 3)] == [24, 20, 6]
    assert_same_outputs(model, fixed.model)  # 16 and 8 of the zero filters went, the third group stayed whole
    assert not np.allclose(M.run(model)[0], M.run(off.model)[0], atol=1e-3)  # unrounded, live filters go too


@pytest.mark.parametrize("block", [4, 8, 16])
def test_a_multiple_the_original_had_is_never_broken(block: int) -> None:
    rounding = Rounding(block, adaptive=True)
    for size in (3, 10, 12, 24, 40, 96, 100, 112, 120, 300, 672, 1000, 1280):
        multiple = rounding.channel_multiple(size)
        for ratio in (0.05, 0.15, 0.3, 0.5, 0.7, 0.9):
            kept = kept_count(size, ratio, multiple)
            assert size - math.floor(ratio * size + 1e-9) <= kept <= size  # never more removed than asked
            for p in (2, 4, 8, 16):
                if p <= block and size % p == 0:
                    assert kept % p == 0, (size, ratio, kept, p)  # the original's alignment, up to the block, is kept
    # the brief's case: a multiple of 16 on an AVX2 machine (block 8) keeps a multiple of 8
    assert Rounding(8, adaptive=True).channel_multiple(32) == 8
    # not a multiple of the block: the original's own alignment, nothing forced (3 and 10 stay free to prune)
    assert [Rounding(16, adaptive=True).channel_multiple(c) for c in (3, 10, 1000)] == [1, 2, 8]


def test_auto_counts_channels_so_heads_of_a_block_multiple_prune_one_by_one() -> None:
    # 4 heads: of 16 channels each (64 channels), any head count keeps a multiple of 16 channels; of 2 channels
    # each (8 channels, so 8-aligned), heads go 4 at a time: all or none
    heads = Group(0, (0,), (0, 1, 2, 3), (False,) * 4, (), (), 1, 0)
    wide = SimpleNamespace(space_atoms={0: np.arange(64)})
    narrow = SimpleNamespace(space_atoms={0: np.arange(8)})
    auto16 = Rounding(16, adaptive=True)
    assert auto16.classes(heads, wide) == 1 and auto16.classes(heads, narrow) == 4  # type: ignore[arg-type]
    assert Rounding(16).classes(heads, wide) == 16  # type: ignore[arg-type]  # a fixed N counts classes, as before
    assert kept_count(4, 0.5, auto16.classes(heads, wide)) == 2  # type: ignore[arg-type]


def test_auto_is_the_cpu_block_with_a_floor_of_8(monkeypatch: pytest.MonkeyPatch) -> None:
    for isa, block in ((16, 16), (8, 8), (4, 8), (1, 8)):
        monkeypatch.setattr(roundto, "isa_multiple", lambda isa=isa: isa)
        assert roundto.auto() == Rounding(block, adaptive=True) == Rounding.of("auto") == roundto.resolve(roundto.RoundTo.AUTO)
    with pytest.raises(Exception, match="--round-to"):
        Rounding.of(0)


def test_a_target_macs_budget_lands_near_its_target_with_auto_rounding() -> None:
    model = _chain((64, 64, 48), dead=(0, 0, 0))
    for target in (0.7, 0.5):
        result = api.prune(model, "l1", round_to=Rounding(16, adaptive=True), params={"target_macs": target}, latency=False)
        kept = [_kept(result.model, f"w{i}") for i in (1, 2, 3)]
        assert all(k % 16 == 0 for k in kept), kept
        macs = result.report.after.macs / result.report.before.macs
        assert abs(macs - target) <= 0.06, (target, macs, kept)  # 16-channel steps of 64-wide convs: a few % each
        out = M.run(result.model)[0]
        assert out.shape == (1, 5, 6, 6) and np.all(np.isfinite(out))


# ----------------------------------------------------------------------------- the speed gates


def test_the_median_interval_is_the_sign_test_order_statistics() -> None:
    values = [float(v) for v in range(1, 31)]  # n = 30: 2 P(Bin(30, 1/2) <= 9) = 0.043, <= 10: 0.099
    assert median_interval(values) == (10.0, 21.0)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)  # 5 rounds: the extremes (93.8%)
    assert median_interval([float(v) for v in range(1, 9)]) == (1.0, 8.0)  # 8: 2 P(X <= 1) = 0.07 > 0.05
    assert median_interval([]) is None


class _Session:
    """A fake onnxruntime session whose run advances a fake clock by its next duration (nothing is timed)."""

    def __init__(self, clock: list[float], durations: Sequence[float]) -> None:
        self.clock, self.durations, self.runs = clock, durations, 0

    def run(self, names: Any, feed: Any) -> None:
        self.clock[0] += self.durations[self.runs % len(self.durations)]
        self.runs += 1


def _measured(durations_after: Sequence[float], decided_at: Sequence[float], monkeypatch: pytest.MonkeyPatch,
              warmup_seconds: float | None = None) -> tuple[Latency, _Session, _Session]:
    from onnxslim_prune.judge import latency

    if warmup_seconds is not None:
        monkeypatch.setattr(latency, "WARMUP_SECONDS", warmup_seconds)
    clock = [0.0]
    before, after = _Session(clock, [1.0]), _Session(clock, durations_after)
    timing = latency.measure(onnx.ModelProto(), onnx.ModelProto(), {"x": np.zeros((1, 2), np.float32)},
                             sessions=(before, after), clock=lambda: clock[0], decided_at=decided_at)
    return timing, before, after


def test_the_rounds_stop_once_the_gates_are_decided(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_prune.judge import latency

    gates = latency.gate_ratios(Gates())
    assert gates == (1.0, 1.0 + SLOWER_TOLERANCE)
    # 4x faster every round: more than twice clear of both gates, decided after the fewest rounds (3), the figures
    # those rounds' medians
    timing, before, after = _measured([0.25], gates, monkeypatch)
    assert timing.rounds == latency.CLEAR_ROUNDS == 3 and timing.ratio == pytest.approx(0.25)
    assert before.runs == latency.WARMUP + latency.CLEAR_ROUNDS  # instant warm-up runs (on the wall clock): all three
    # 1.7x faster (0.6, not twice clear of 1.0): the sign test's 5 rounds; one round of 0.6 among 0.25s does the same
    assert _measured([0.6], gates, monkeypatch)[0].rounds == latency.MIN_ROUNDS
    assert _measured([0.25, 0.25, 0.6], gates, monkeypatch)[0].rounds == latency.MIN_ROUNDS
    # 2.5x slower in every round (2.5 > 2 x 1.03): clear the other way, refused after 3 rounds
    slower, _, _ = _measured([2.5], gates, monkeypatch)
    assert slower.rounds == latency.CLEAR_ROUNDS and slower.slower
    # the same model without a decision to make (the latency search wants the figure): every round of the budget
    timing, _, _ = _measured([0.25], (), monkeypatch)
    assert timing.rounds == latency.MAX_ROUNDS
    # ratios straddling 1 (0.9, 1.1, ...) never decide: the budget's rounds, median ratio about 1
    timing, _, _ = _measured([0.9, 1.1], gates, monkeypatch)
    assert timing.rounds == latency.MAX_ROUNDS and 0.9 <= timing.ratio <= 1.1
    # --min-speedup 2 flips at a ratio of 0.5: 0.45-0.55 straddles it, so the rounds go on; 0.3 decides it
    with_speedup = latency.gate_ratios(Gates(min_speedup=2.0))
    assert with_speedup[-1] == pytest.approx(0.5)
    assert _measured([0.45, 0.55], with_speedup, monkeypatch)[0].rounds == latency.MAX_ROUNDS
    assert _measured([0.3], with_speedup, monkeypatch)[0].rounds == latency.MIN_ROUNDS  # 0.3 is not twice clear of 0.5
    assert _measured([0.2], with_speedup, monkeypatch)[0].rounds == latency.CLEAR_ROUNDS


def test_a_slow_models_warm_up_is_one_run(monkeypatch: pytest.MonkeyPatch) -> None:

    # a warm-up budget already spent after one run (as VGG-16's 0.3 s runs spend 0.25 s): one warm-up run each
    timing, before, after = _measured([0.25], (1.0,), monkeypatch, warmup_seconds=0.0)
    assert before.runs == 1 + timing.rounds and after.runs == 1 + timing.rounds


def _fake(ratio: float, interval: tuple[float, float] | None) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Latency:
        return Latency(10.0, 10.0 * ratio, 30, 1, interval, "thread-cpu", 1)
    return timed


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timing: Any, *extra: str) -> tuple[Any, Path, dict[str, Any]]:
    if timing is not None:
        monkeypatch.setattr(judging, "timed", timing)
    source, out, rep = tmp_path / "m.onnx", tmp_path / "m.pruned.onnx", tmp_path / "r.json"
    onnx.save(_chain((32, 32), dead=(16, 16)), source)
    result = CliRunner().invoke(main, [str(source), "-o", str(out), "--report", str(rep), "--ratio", "0.5", *extra])
    return result, out, json.loads(rep.read_text()) if rep.exists() else {}


def _gate(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((g for g in report["verdict"]["gates"] if g["gate"] == name), None)


def test_a_slower_model_is_a_missed_gate_and_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, out, report = _run(tmp_path, monkeypatch, _fake(1.3, (1.25, 1.35)))
    assert result.exit_code == 3 and "slower than the original" in result.output
    assert not out.exists() and report["output_path"] is None  # never written silently
    gate = _gate(report, "not-slower")
    assert gate is not None and not gate["passed"] and gate["value"] == pytest.approx(1.3)
    assert gate["threshold"] == pytest.approx(1 + SLOWER_TOLERANCE)
    assert report["speed"] == "slower" and not report["verdict"]["passed"]
    assert report["after"]["macs"] < report["before"]["macs"]  # the model itself was pruned, and is refused for speed


def test_keep_failed_writes_the_slower_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, out, report = _run(tmp_path, monkeypatch, _fake(1.3, (1.25, 1.35)), "--keep-failed")
    assert result.exit_code == 3 and out.exists() and report["output_path"] == str(out)
    written = onnx.load(str(out))
    assert _kept(written, "w1") == 16 and _kept(written, "w2") == 16  # 32 -> 16, a multiple of 16
    original = onnx.load(str(tmp_path / "m.onnx"))
    assert_same_outputs(original, written)  # only the zero filters went (1e-5)


@pytest.mark.parametrize("ratio, interval", [(1.02, (1.01, 1.03)), (1.06, (0.97, 1.12)), (0.8, (0.78, 0.83))])
def test_noise_within_the_tolerance_or_the_interval_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratio: float,
                                                            interval: tuple[float, float]) -> None:
    result, out, report = _run(tmp_path, monkeypatch, _fake(ratio, interval))
    assert result.exit_code == 0, result.output
    assert out.exists() and _kept(onnx.load(str(out)), "w1") == 16
    gate = _gate(report, "not-slower")
    assert gate is not None and gate["passed"] and gate["value"] == pytest.approx(ratio)
    assert report["speed"] == ("faster" if ratio < 1 else "not slower")
    assert report["latency"]["ratio_ci95"] == list(interval)


def test_min_speedup_is_a_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, out, report = _run(tmp_path, monkeypatch, _fake(0.8, (0.78, 0.82)), "--min-speedup", "1.5")
    assert result.exit_code == 3 and "--min-speedup 1.5: speedup is 1.250x" in result.output and not out.exists()
    gate = _gate(report, "--min-speedup")
    assert gate is not None and not gate["passed"] and gate["value"] == pytest.approx(1.25)
    assert _gate(report, "not-slower")["passed"]  # type: ignore[index]
    result, out, report = _run(tmp_path, monkeypatch, _fake(0.8, (0.78, 0.82)), "--min-speedup", "1.2")
    assert result.exit_code == 0 and out.exists() and _gate(report, "--min-speedup")["passed"]  # type: ignore[index]


def test_without_latency_the_speed_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> Latency:
        raise AssertionError("--no-latency must not time anything")

    result, out, report = _run(tmp_path, monkeypatch, never, "--no-latency")
    assert result.exit_code == 0 and out.exists()
    assert report["speed"] == "unknown" and report["latency"] is None
    assert _gate(report, "not-slower") is None  # not claimed as passed
    assert "whether the model is slower is unknown" in result.output
    assert _kept(onnx.load(str(out)), "w1") == 16
    bad, _, _ = _run(tmp_path, monkeypatch, never, "--no-latency", "--min-speedup", "1.2")
    assert bad.exit_code == 2 and "--min-speedup needs the latency measurement" in bad.output


def test_an_unchanged_model_is_not_slower_than_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judging, "timed", _fake(1.5, (1.4, 1.6)))  # noise: the same model, measured slower
    model = _chain((8, 8), dead=(0, 0))
    result = api.prune(model, "l1", 0.5, round_to=Rounding(16, adaptive=True), gates=Gates())
    assert result.model is model or _kept(result.model, "w1") == 8  # 8 channels, multiple 8: nothing to remove
    # nothing missed; data-free, so the function is unknown (None), never a pass
    assert result.report.verdict is not None and result.report.verdict.passed is None
    assert [g.gate for g in result.report.verdict.gates] == ["not-slower"] and result.report.verdict.gates[0].passed
    assert_same_outputs(model, result.model)
