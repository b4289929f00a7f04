"""The verdict tells the truth: held-out samples never meet the fit, collapse is flagged, gates exit 3.

Oracles: sample identity (every calibration sample carries its index in one pixel) for the
split; a model built so that l1 keeps only dead neurons for collapse; figures recomputed
with numpy for the accumulator.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_FMNIST, SAMPLE_LENET
from tagged import record_reads, tagged_calibration
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import prune
from onnxslim_prune.calib import load_calibration
from onnxslim_prune.calib import split as split_mod
from onnxslim_prune.calib.specs import input_specs
from onnxslim_prune.cli import main
from onnxslim_prune.errors import UsageError
from onnxslim_prune.judge.verdict import AgreementAccumulator, Gates, VerdictSource, summarise



def test_held_out_samples_never_meet_the_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read of the calibration source after the verdict's reference pass (selection, statistics,
    least-squares refit) touches fit samples only; the verdict is measured on the others."""
    seen = record_reads(monkeypatch)
    result = prune(str(SAMPLE_LENET), "thinet", 0.5, calib=tagged_calibration(SAMPLE_FMNIST, tmp_path), seed=3)

    assert result.report.verdict is not None and result.report.verdict.source is VerdictSource.CALIB_HOLDOUT
    fitted, held = seen.seen("method"), set().union(*seen.verdicts)
    assert len(held) == 24  # ceil(0.2 * 120) samples
    assert len(fitted) == 96 and not fitted & held  # the method and the refit saw the other 96 only
    assert fitted | held == set(range(120))
    # the reference pass read the verdict's samples and fitted ones for the companion figures (32, the loader reading
    # one batch of 32 ahead), measured there so that the verdict needs no session of the original
    reference = seen.seen("reference")
    assert reference - held <= fitted and len(reference - held) in (32, 64) and held <= reference


def test_the_split_is_seeded_disjoint_and_sized() -> None:
    calib = load_calibration(SAMPLE_FMNIST, input_specs(onnx.load(str(SAMPLE_LENET))))
    one, again, other = (split_mod.split_holdout(calib, 0.2, seed) for seed in (0, 0, 1))
    assert one.holdout_indices == again.holdout_indices != other.holdout_indices
    assert len(one.holdout_indices) == 100 and not set(one.fit_indices) & set(one.holdout_indices)
    assert one.fit.fingerprint != calib.fingerprint != one.holdout.fingerprint  # type: ignore[union-attr]
    whole = next(calib.iter_batches(500))["input"]
    held = np.concatenate([b["input"] for b in one.holdout.iter_batches(7)])  # type: ignore[union-attr]
    np.testing.assert_array_equal(held, whole[list(one.holdout_indices)])
    assert split_mod.held_out_count(10, 0.2) == 5  # at least a few: min(8, N // 2)
    assert split_mod.held_out_count(1000, 0.2, static_batch=3) == 201  # whole static batches
    assert split_mod.split_holdout(calib, 0.0, 0).holdout is None
    with pytest.raises(UsageError, match="--holdout"):
        split_mod.held_out_count(10, 1.0)


# ----------------------------------------------------------------------------- collapse


def _collapsing_mlp() -> onnx.ModelProto:
    """x[N, 8] -> Relu(Gemm 8) -> Gemm 4. Neurons 0-3 carry the signal with small weights; 4-7 have
    large weights but a bias of -1000, so they never fire. l1 keeps 4-7: the output becomes constant."""
    rng = np.random.default_rng(0)
    w1 = np.concatenate([0.1 * rng.standard_normal((4, 8)), 10.0 * rng.standard_normal((4, 8))]).astype(np.float32)
    b1 = np.array([0, 0, 0, 0, -1000, -1000, -1000, -1000], np.float32)
    w2 = rng.standard_normal((4, 8)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)],
        "collapse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_collapsed_model_is_flagged_degraded_even_on_random_inputs() -> None:
    result = prune(_collapsing_mlp(), "l1", 0.5)
    v = result.report.verdict
    assert v is not None and v.source is VerdictSource.RANDOM
    assert v.spread == pytest.approx(0.0, abs=1e-9)  # the output no longer depends on the input
    assert v.degraded and any("barely depend on the input" in r for r in v.degraded_reasons)
    assert "DEGRADED" in result.report.table()
    assert json.loads(result.report.to_json())["verdict"]["degraded"] is True


def test_constant_outputs_cannot_score_a_good_correlation() -> None:
    """Cosine is dominated by the mean output: a constant prediction near it scores 0.99+; correlation is 0."""
    rng = np.random.default_rng(1)
    mean = np.array([8.0, 1.0, 0.5, 0.2])
    original = mean + 0.3 * rng.standard_normal((64, 4))
    constant = np.tile(mean, (64, 1))
    acc = AgreementAccumulator(["y"])
    acc.add([original[:40]], [constant[:40]], 40)
    acc.add([original[40:]], [constant[40:]], 24)
    (out,) = acc.results()
    assert out.cosine > 0.99
    assert out.correlation == 0.0 and out.spread == 0.0
    verdict = summarise(VerdictSource.EVAL, 64, [out])
    assert verdict.degraded
    same = AgreementAccumulator(["y"])
    same.add([original], [2 * original - mean], 64)  # follows the input, twice as strongly
    (follows,) = same.results()
    assert follows.correlation == pytest.approx(1.0) and follows.spread == pytest.approx(2.0)


# ----------------------------------------------------------------------------- gates


def test_gates_are_checked_on_the_verdict() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.7, eval_data=SAMPLE_FMNIST, gates=Gates(min_top1_agreement=0.99, max_drop=50.0))
    v = result.report.verdict
    assert v is not None and not v.passed
    by_gate = {g.gate: g for g in v.gates}
    assert not by_gate["--min-top1-agreement"].passed and by_gate["--min-top1-agreement"].value == v.top1_agreement
    assert by_gate["--max-drop"].passed and by_gate["--max-drop"].value == pytest.approx(v.accuracy_drop_points)


def test_max_drop_needs_labelled_eval_data() -> None:
    with pytest.raises(UsageError, match="--max-drop needs labelled --eval"):
        prune(str(SAMPLE_LENET), "l1", 0.5, gates=Gates(max_drop=1.0))


def test_a_missed_gate_exits_3_writes_the_report_and_no_model(tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = [str(SAMPLE_LENET), "-o", str(out), "--report", str(report), "--ratio", "0.7", "--eval", str(SAMPLE_FMNIST),
            "--min-top1-agreement", "0.99", "--no-latency"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3, res.output
    assert "gate missed: --min-top1-agreement 0.99: top1_agreement is" in res.output and "missed by" in res.output
    assert not out.exists() and not list(tmp_path.glob(".*"))
    data = json.loads(report.read_text())
    assert data["verdict"]["passed"] is False and data["output_path"] is None
    assert data["verdict"]["gates"][0]["gate"] == "--min-top1-agreement"
    kept = CliRunner().invoke(main, [*args, "--keep-failed"])
    assert kept.exit_code == 3 and out.is_file()
    assert json.loads(report.read_text())["output_path"] == str(out)
    passing = CliRunner().invoke(main, [*args[:-3], "--min-top1-agreement", "0.5", "--no-latency"])
    assert passing.exit_code == 0, passing.output


def test_report_records_settings_version_stages_and_latency(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    res = CliRunner().invoke(main, [str(SAMPLE_LENET), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    from onnxslim_prune import __version__

    assert data["version"] == __version__ and data["validated"] is True
    assert data["input_path"] == str(SAMPLE_LENET) and data["output_path"] == str(tmp_path / "o.onnx")
    assert data["settings"]["method"] == "l1" and data["settings"]["holdout"] == 0.2
    assert {"load", "trace", "validation", "verdict", "latency"} <= set(data["stage_seconds"])
    lat = data["latency"]
    assert lat["before_ms"] > 0 and lat["after_ms"] > 0 and lat["rounds"] >= 3  # 3 when every round is clearly faster
    assert lat["speedup"] == pytest.approx(lat["before_ms"] / lat["after_ms"])


def test_intervals_match_scipy_and_cover_at_their_stated_rate() -> None:
    """Wilson equals scipy's; Fisher's z and the paired accuracy-drop interval cover the true value ~95% of 2,000 seeded draws."""
    from scipy.stats import binomtest

    from onnxslim_prune.judge.verdict import fisher_interval, paired_drop_interval, wilson_interval

    for hits, n in ((7, 8), (0, 8), (8, 8), (380, 400)):
        ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(hits, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    rng = np.random.default_rng(0)
    rho, n, trials = 0.6, 20, 2000
    cov = np.array([[1.0, rho], [rho, 1.0]])
    hits = 0
    for _ in range(trials):
        xy = rng.multivariate_normal(np.zeros(2), cov, size=n)
        lo, hi = fisher_interval(float(np.corrcoef(xy.T)[0, 1]), n)
        hits += lo <= rho <= hi
    assert 0.93 <= hits / trials <= 0.97
    # paired outcomes: 10% only the original right, 5% only the pruned right: the true drop is 5 points
    hits = 0
    for _ in range(trials):
        cells = rng.multinomial(200, [0.1, 0.05, 0.85])
        lo, hi = paired_drop_interval(int(cells[0]), int(cells[1]), 200)
        hits += lo <= 5.0 <= hi
    assert 0.93 <= hits / trials <= 0.975


def test_a_verdict_on_few_samples_is_imprecise_and_says_how_many_would_do(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """8 eval samples: every interval is in the report, the table and log say imprecise; 500 samples: top-1 within +-5 points."""
    with np.load(SAMPLE_FMNIST) as d:
        few = tmp_path / "few.npz"
        np.savez(few, input=d["input"][:8], labels=d["labels"][:8])
    reports = {}
    for name, data in (("few", few), ("all", SAMPLE_FMNIST)):
        report = tmp_path / f"{name}.json"
        res = CliRunner().invoke(main, [str(SAMPLE_LENET), "-o", str(tmp_path / f"{name}.onnx"), "--report", str(report),
                                        "--ratio", "0.5", "--eval", str(data), "--no-latency"])
        assert res.exit_code == 0, res.output
        reports[name] = (json.loads(report.read_text())["verdict"], res.output + caplog.text)
        caplog.clear()
    few_v, few_out = reports["few"]
    assert few_v["samples"] == 8 and few_v["imprecise"] is True
    lo, hi = few_v["top1_agreement_ci95"]
    assert lo <= few_v["top1_agreement"] <= hi and hi - lo > 0.3
    assert few_v["accuracy_drop_ci95"][0] <= few_v["accuracy_drop_points"] <= few_v["accuracy_drop_ci95"][1]
    assert "imprecise on 8 samples" in few_out and "the verdict rests on 8 samples" in few_out
    all_v, all_out = reports["all"]
    lo, hi = all_v["top1_agreement_ci95"]
    assert all_v["samples"] == 500 and hi - lo < 0.1 and lo <= all_v["top1_agreement"] <= hi
    assert all_v["correlation_ci95"][0] <= all_v["correlation"] <= all_v["correlation_ci95"][1]
    assert "imprecise" not in all_out


def test_top1_headline_comes_from_softmax_outputs_when_the_model_has_them() -> None:
    """MTCNN-like: a face/no-face Softmax beside a box regression [N, 4]; the box's argmax is detail, not the headline."""
    from onnx import parser

    from onnxslim_prune.judge.verdict import OutputAgreement, class_score_outputs

    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 6] x) => (float[N, 2] prob, float[N, 4] box) <float[6, 2] wp, float[6, 4] wb> {
            logits = MatMul(x, wp)
            soft = Softmax<axis = 1>(logits)
            prob = Flatten<axis = 1>(soft)
            box = MatMul(x, wb)
        }""")
    assert class_score_outputs(model) == frozenset({"prob"})
    outputs = (OutputAgreement("prob", 0.1, 0.1, 0.99, 0.9, 1.0, 0.95, 40, (0.83, 0.99), None),
               OutputAgreement("box", 0.5, 0.5, 0.9, 0.8, 1.0, 0.30, 40, (0.18, 0.46), None))
    both = summarise(VerdictSource.EVAL, 40, outputs)
    scored = summarise(VerdictSource.EVAL, 40, outputs, class_outputs=class_score_outputs(model))
    assert both.top1_agreement == 0.30 and both.top1_interval == (0.18, 0.46)
    assert scored.top1_agreement == 0.95 and scored.top1_interval == (0.83, 0.99)
    assert scored.correlation == 0.8  # the other figures still take the worst output


def test_a_data_free_verdict_takes_fewer_random_samples_on_large_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 random samples up to the size threshold, then inversely fewer by weight bytes, never under 4."""
    from onnxslim_prune import ir
    from onnxslim_prune.judge import validate

    model = onnx.load(str(SAMPLE_LENET))
    size = ir.payload_bytes(model)
    assert validate.random_samples_for(model) == 16
    monkeypatch.setattr(validate, "RANDOM_SAMPLES_FULL_BYTES", size // 2)
    assert validate.random_samples_for(model) == 8
    monkeypatch.setattr(validate, "RANDOM_SAMPLES_FULL_BYTES", size // 100)
    assert validate.random_samples_for(model) == 4
    result = prune(model, "l1", 0.5, latency=False)
    assert result.report.verdict is not None
    assert result.report.verdict.source is VerdictSource.RANDOM and result.report.verdict.samples == 4


# ----------------------------------------------------------------------------- random inputs: function unknown


def _negated(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its single output negated (same name, dtype and shape): cosine -1 with the original."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name = out.graph.output[0].name
    for node in out.graph.node:
        node.output[:] = [f"{o}_pre" if o == name else o for o in node.output]
    out.graph.node.append(helper.make_node("Neg", [f"{name}_pre"], [name]))
    return out


def test_a_random_input_verdict_is_never_passed_and_keeps_its_figures_aside() -> None:
    """Data-free: passed is None (JSON null), the headline keys are null, the figures are structure evidence; numbers:
    the structure cosine is numpy's over the same seeded random samples (1e-9)."""
    from onnxslim_prune.judge import validate

    model = onnx.load(str(SAMPLE_LENET))
    result = prune(model, "l1", 0.5, latency=False)
    v = result.report.verdict
    assert v is not None and v.source is VerdictSource.RANDOM and not v.function_known and v.passed is None
    feeds = validate.random_feeds(model, {"input": (1, 1, 28, 28)}, 0, v.samples)
    a = np.concatenate([validate.outputs_of(model, feeds)[i][0] for i in range(len(feeds))]).astype(np.float64)
    b = np.concatenate([validate.outputs_of(result.model, feeds)[i][0] for i in range(len(feeds))]).astype(np.float64)
    cosine = float(np.vdot(a, b) / np.sqrt(np.vdot(a, a) * np.vdot(b, b)))
    assert v.cosine == pytest.approx(cosine, abs=1e-9)
    data = json.loads(result.report.to_json())["verdict"]
    assert data["passed"] is None and data["function_known"] is False and data["outputs"] == []
    assert all(data[k] is None for k in ("cosine", "correlation", "top1_agreement", "spread", "max_abs", "imprecise"))
    assert data["random_inputs"]["cosine"] == pytest.approx(cosine, abs=1e-9) and data["random_inputs"]["samples"] == 16
    table = result.report.table()
    assert "function unknown: measured on random inputs" in table and "gate passed" not in table
    # no random figure can pass a gate: refused before any work, whatever the threshold
    for calib in (None, "random"):
        with pytest.raises(UsageError, match="gates need real samples"):
            prune(model, "l1", 0.5, calib=calib, gates=Gates(min_cosine=-1.0))
    with pytest.raises(UsageError, match="gates need real samples"):
        summarise(VerdictSource.RANDOM, 16, v.outputs, gates=Gates(min_correlation=0.0))
    held = prune(model, "l1", 0.5, eval_data=SAMPLE_FMNIST, latency=False).report.verdict
    assert held is not None and held.function_known and held.passed is True  # real data, no gate: nothing missed


def test_a_missed_speed_gate_fails_a_random_input_verdict() -> None:
    """Speed is measured whatever the inputs: on random inputs a slower model is passed False (exit 3), a faster
    one None (function unknown), never True; the table lists the speed gate beside 'function unknown'."""
    from onnxslim_prune.judge.latency import Latency, with_speed_gates
    from onnxslim_prune.judge.report import verdict_lines

    acc = AgreementAccumulator(["y"])
    acc.add([np.eye(4)], [np.eye(4)], 4)
    v = summarise(VerdictSource.RANDOM, 4, acc.results())
    slower = with_speed_gates(v, Latency(10.0, 20.0, 30, 1, (1.9, 2.1)), Gates(min_speedup=1.5))
    faster = with_speed_gates(v, Latency(10.0, 5.0, 30, 1, (0.45, 0.55)), Gates(min_speedup=1.5))
    assert [g.passed for g in slower.gates] == [False, False] and slower.passed is False
    assert [g.passed for g in faster.gates] == [True, True] and faster.passed is None
    assert faster.gates[1].value == pytest.approx(2.0) and json.loads(json.dumps(faster.to_dict()))["passed"] is None
    lines = verdict_lines(slower)
    assert "function unknown" in lines[0] and sum("gate MISSED" in line for line in lines) == 2


def test_negated_outputs_are_degraded_on_random_inputs() -> None:
    """A model whose outputs are negated: cosine and correlation -1 on the seeded random samples, so degraded."""
    from onnxslim_prune.judge import validate

    model = _collapsing_mlp()
    negated = _negated(model)
    feeds = validate.random_feeds(model, {"x": (1, 8)}, 0)
    agreement = validate.agreement_of(model, negated, validate.outputs_of(model, feeds), validate.outputs_of(negated, feeds),
                                      feeds)
    v = summarise(VerdictSource.RANDOM, validate.feed_samples(feeds), agreement)
    assert v.cosine == pytest.approx(-1.0, abs=1e-12) and v.correlation == pytest.approx(-1.0, abs=1e-12)
    assert v.degraded and any("cosine -1.000" in r for r in v.degraded_reasons) and v.passed is None
    assert json.loads(json.dumps(v.to_dict()))["degraded"] is True


def test_a_near_zero_cosine_is_degraded_where_no_correlation_is_measured() -> None:
    """One sample (no correlation across samples, as with all-equal token ids): the cosine floor alone decides."""
    a = np.array([[3.0, 0.0, 1.0, 0.0]])
    near_zero = np.array([[0.0, 2.0, 0.1, 1.0]])  # <a, b> = 0.1: cosine 0.1 / (sqrt(10) sqrt(5.01)) = 0.0141
    close = np.array([[2.9, 0.2, 1.1, 0.0]])
    for b, degraded in ((near_zero, True), (close, False)):
        acc = AgreementAccumulator(["y"])
        acc.add([a], [b], 1)
        (out,) = acc.results()
        expected = float(np.vdot(a, b) / np.sqrt(np.vdot(a, a) * np.vdot(b, b)))
        assert out.cosine == pytest.approx(expected, abs=1e-12) and out.correlation is None
        for source in (VerdictSource.RANDOM, VerdictSource.EVAL):
            assert summarise(source, 1, [out]).degraded is degraded
    assert expected > 0.99


def test_token_ids_are_drawn_within_every_embedding_vocabulary() -> None:
    """ids -> Gather(word table [11, 4]) and -> Cast -> Gather(fp16 position table [7, 4] via Cast): ids in [0, 7);
    a mask that indexes nothing stays zeros; float inputs are the same draws as without ids. Numbers: the data-free
    verdict of an l1 prune runs on them, and its correlation across samples exists (the samples differ)."""
    from onnx import parser

    from onnxslim_prune.judge import validate

    rng = np.random.default_rng(0)
    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 5] ids, int64[N, 5] mask, float[N, 4] bias) => (float[N, 3] y) {
            word = Gather<axis = 0>(table, ids)
            ids32 = Cast<to = 6>(ids)
            pos16 = Cast<to = 10>(positions)
            pos32 = Cast<to = 1>(pos16)
            pos = Gather<axis = 0>(pos32, ids32)
            maskf = Cast<to = 1>(mask)
            both = Add(word, pos)
            axes = Constant<value = int64[1] {1}>()
            mean = ReduceMean<axes = [1], keepdims = 0>(both)
            h = Add(mean, bias)
            hidden = MatMul(h, w1)
            act = Relu(hidden)
            y0 = MatMul(act, w2)
            msum = ReduceSum<keepdims = 0>(maskf, axes)
            m2 = Unsqueeze(msum, axes)
            y = Add(y0, m2)
        }""")
    weights = {"table": rng.standard_normal((11, 4)), "positions": rng.standard_normal((7, 4)),
               "w1": rng.standard_normal((4, 16)), "w2": rng.standard_normal((16, 3))}
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    assert validate.token_id_inputs(model) == {"ids": 7}
    shapes = {"ids": (1, 5), "mask": (1, 5), "bias": (1, 4)}
    feeds = validate.random_feeds(model, shapes, 3, 16)
    ids = np.concatenate([f["ids"] for f in feeds])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() == 6 and len(np.unique(ids)) == 7
    assert all(not f["mask"].any() for f in feeds)
    assert all(np.array_equal(f["bias"], validate.random_inputs(model, shapes, 3 + i)["bias"]) for i, f in enumerate(feeds))
    result = prune(model, "l1", 0.25, input_shapes={"ids": (1, 5), "mask": (1, 5), "bias": (1, 4)}, latency=False)
    v = result.report.verdict
    assert v is not None and v.source is VerdictSource.RANDOM and v.correlation is not None and v.passed is None
    assert validate.outputs_of(result.model, feeds)[0][0].shape == (1, 3)


def test_unlabelled_eval_gives_a_held_out_verdict_with_agreement_and_no_accuracy(tmp_path: Path) -> None:
    """--eval without 'labels': source eval, held out, top-1 agreement equals numpy's argmax comparison on the
    same 500 samples; no accuracy; an agreement gate is checked; --max-drop is refused."""
    from onnxslim_prune.judge import validate

    with np.load(SAMPLE_FMNIST) as d:
        images = d["input"]
    path = tmp_path / "unlabelled.npz"
    np.savez(path, input=images)
    model = onnx.load(str(SAMPLE_LENET))
    result = prune(model, "l1", 0.5, eval_data=path, gates=Gates(min_top1_agreement=0.5), latency=False)
    v = result.report.verdict
    assert v is not None and v.source is VerdictSource.EVAL and v.held_out and v.samples == 500
    before = validate.run(model, {"input": images})[0]
    after = validate.run(result.model, {"input": images})[0]
    assert v.top1_agreement == float(np.mean(before.argmax(1) == after.argmax(1)))
    assert v.accuracy_before is None and v.accuracy_drop_points is None and v.passed is True
    assert [(g.gate, g.value) for g in v.gates] == [("--min-top1-agreement", v.top1_agreement)]
    with pytest.raises(UsageError, match="--max-drop needs labelled --eval data: .* has no 'labels'"):
        prune(model, "l1", 0.5, eval_data=path, gates=Gates(max_drop=1.0))
