"""`onnx-prune` command line: bad inputs fail cleanly and write nothing; good inputs write valid models.

Most calls run in-process through click's CliRunner (fast); a few run the real
`python -m onnxslim_prune.cli` in a subprocess to see exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from conftest import SAMPLE_FMNIST, SAMPLE_LENET, check_full, sha256, snapshot

import models as M
from onnxslim_prune.pipeline import judging
from onnxslim_prune.cli import main


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_clean_error(result: Result, code: int) -> str:
    """Exit `code`, exactly one stderr line starting with 'error:', no traceback, no stray exception."""
    err = result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, err, result.stdout)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in result.output
    assert "internal error" not in err
    return lines[0]


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "onnxslim_prune.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=60, env=env,
    )


# ----------------------------------------------------------------------------- bad inputs

BAD = {
    # id: (args, exit code, a piece of the message)
    "missing_file": (["missing.onnx", "-o", "out.onnx"], 2, "no such file"),
    "directory_as_model": (["adir", "-o", "out.onnx"], 2, "not a file"),
    "text_file": (["text.onnx", "-o", "out.onnx"], 1, "text.onnx"),
    "truncated_onnx": (["trunc.onnx", "-o", "out.onnx"], 1, "trunc.onnx"),
    "fails_checker": (["bad.onnx", "-o", "out.onnx"], 1, "checker"),
    "unknown_method": (["good.onnx", "-o", "out.onnx", "--method", "nope"], 2, "nope"),
    "unknown_merge_scale": (["good.onnx", "-o", "out.onnx", "--method", "merge", "--merge-scale", "cubic"], 2, "merge-scale"),
    "ratio_one": (["good.onnx", "-o", "out.onnx", "--ratio", "1.0"], 2, "--ratio"),
    "ratio_negative": (["good.onnx", "-o", "out.onnx", "--ratio", "-0.1"], 2, "--ratio"),
    "ratio_nan": (["good.onnx", "-o", "out.onnx", "--ratio", "nan"], 2, "--ratio"),
    "round_to_zero": (["good.onnx", "-o", "out.onnx", "--round-to", "0"], 2, "--round-to"),
    "input_shape_syntax": (["good.onnx", "-o", "out.onnx", "--input-shape", "x=1x3x8x8"], 2, "--input-shape"),
    "input_shape_dims": (["good.onnx", "-o", "out.onnx", "--input-shape", "x:1x3xAx8"], 2, "--input-shape"),
    "input_shape_zero": (["good.onnx", "-o", "out.onnx", "--input-shape", "x:0x3x8x8"], 2, "--input-shape"),
    "input_shape_unknown_name": (["good.onnx", "-o", "out.onnx", "--input-shape", "zz:1x3x8x8"], 2, "zz"),
    "input_shape_wrong_rank": (["good.onnx", "-o", "out.onnx", "--input-shape", "x:1x3"], 2, "rank"),
    "input_shape_contradicts_model": (["good.onnx", "-o", "out.onnx", "--input-shape", "x:1x3x16x16"], 2, "x"),
    "output_equals_input": (["good.onnx", "-o", "good.onnx"], 2, "input model"),
    "output_equals_input_respelled": (["good.onnx", "-o", "./adir/../good.onnx"], 2, "input model"),
    "output_folder_missing": (["good.onnx", "-o", "nodir/out.onnx"], 2, "nodir"),
    "output_is_a_folder": (["good.onnx", "-o", "adir"], 2, "adir"),
    "report_folder_missing": (["good.onnx", "-o", "out.onnx", "--report", "nodir/r.json"], 2, "nodir"),
    "no_model": (["-o", "out.onnx"], 2, "MODEL"),
    "dry_run_text_file": (["text.onnx", "--dry-run"], 1, "text.onnx"),
    "dry_run_missing": (["missing.onnx", "--dry-run"], 2, "no such file"),
    "dry_run_bad_ratio": (["good.onnx", "--dry-run", "--ratio", "5"], 2, "--ratio"),
    "dry_run_unknown_method": (["good.onnx", "--dry-run", "--method", "nope"], 2, "nope"),
    "seed_negative": (["good.onnx", "-o", "out.onnx", "--seed", "-1"], 2, "--seed"),
    "calib_positions_zero": (["good.onnx", "-o", "out.onnx", "--calib-positions", "0"], 2, "--calib-positions"),
    "batch_size_zero": (["good.onnx", "-o", "out.onnx", "--batch-size", "0"], 2, "--batch-size"),
    "calib_samples_zero": (["good.onnx", "-o", "out.onnx", "--calib-samples", "0"], 2, "--calib-samples"),
    "max_ratio_negative": (["good.onnx", "-o", "out.onnx", "--max-ratio", "-1"], 2, "--max-ratio"),
    "merge_threshold_nan": (["good.onnx", "-o", "out.onnx", "--method", "merge", "--merge-threshold", "nan"], 2, "--merge-threshold"),
    "merge_threshold_above_one": (["good.onnx", "-o", "out.onnx", "--method", "merge", "--merge-threshold", "2"], 2, "--merge-threshold"),
    "merge_criterion": (["good.onnx", "-o", "out.onnx", "--method", "merge", "--criterion", "bn"], 2, "--criterion"),
    "missing_calib": (["good.onnx", "-o", "out.onnx", "--method", "thinet", "--calib", "none.npz"], 2, "none.npz"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_cleanly_and_writes_nothing(case: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args, code, needle = BAD[case]
    monkeypatch.chdir(model_dir)
    before = snapshot(model_dir)
    line = assert_clean_error(invoke(args), code)
    assert needle in line, line
    assert snapshot(model_dir) == before, "a failed call wrote, removed or changed a file"


@pytest.mark.parametrize("case", ["text_file", "fails_checker", "ratio_one", "output_equals_input"])
def test_bad_input_in_a_real_process(case: str, model_dir: Path) -> None:
    args, code, needle = BAD[case]
    before = snapshot(model_dir)
    proc = run_subprocess(args, model_dir)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("args", [["--ratio", "abc"], ["--round-to", "x"], ["--bogus-option"]])
def test_option_parse_errors_are_one_line(args: list[str], model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    before = snapshot(model_dir)
    assert_clean_error(invoke(["good.onnx", "-o", "out.onnx", *args]), 2)
    assert snapshot(model_dir) == before


def test_report_path_equal_to_input_is_refused(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    before = snapshot(model_dir)
    assert_clean_error(invoke(["good.onnx", "-o", "out.onnx", "--report", "good.onnx"]), 2)
    assert snapshot(model_dir) == before


def test_report_path_equal_to_output_is_refused(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    before = snapshot(model_dir)
    assert_clean_error(invoke(["good.onnx", "-o", "out.onnx", "--report", "out.onnx"]), 2)
    assert snapshot(model_dir) == before


def test_report_path_that_is_a_folder_is_refused(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    before = snapshot(model_dir)
    assert_clean_error(invoke(["good.onnx", "-o", "out.onnx", "--report", "adir"]), 2)
    assert snapshot(model_dir) == before


# ----------------------------------------------------------------------------- success


def test_prune_writes_a_valid_smaller_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    digest = sha256(model_dir / "good.onnx")
    result = invoke(["good.onnx", "-o", "out.onnx", "--method", "l1", "--ratio", "0.5", "--round-to", "1",
                     "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "params" in result.stdout
    assert sha256(model_dir / "good.onnx") == digest
    original = onnx.load(str(model_dir / "good.onnx"))
    pruned = onnx.load(str(model_dir / "out.onnx"))
    check_full(pruned)
    assert M.output_signature(pruned) == M.output_signature(original)
    assert M.initializer(pruned, "conv1.w").shape == (4, 3, 3, 3)
    assert M.initializer(pruned, "conv2.w").shape == (4, 4, 3, 3)
    assert M.initializer(pruned, "fc.w").shape == (5, 4)
    assert M.run(pruned)[0].shape == (1, 5)
    leftovers = {p.name for p in model_dir.iterdir()} - {
        "good.onnx", "single.onnx", "text.onnx", "trunc.onnx", "bad.onnx", "adir", "out.onnx"}
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_default_output_name(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    result = invoke(["good.onnx", "-q", "--no-latency"])
    assert result.exit_code == 0, result.output
    check_full(onnx.load(str(model_dir / "good.pruned.onnx")))


def test_report_json(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    digest = sha256(model_dir / "good.onnx")
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--ratio", "0.5", "--round-to", "1",
                     "--no-latency"])
    assert result.exit_code == 0, result.output
    data = json.loads((model_dir / "r.json").read_text())
    assert data["method"] == "l1" and data["ratio"] == 0.5
    before, after = data["before"]["params"], data["after"]["params"]
    assert isinstance(before, int) and isinstance(after, int) and 0 < after < before
    pruned = onnx.load(str(model_dir / "out.onnx"))
    assert after == sum(int(np.prod(i.dims)) for i in pruned.graph.initializer)
    assert data["ratios"]["params"] == pytest.approx(after / before)
    assert data["after"]["macs"] < data["before"]["macs"]
    verdict = data["verdict"]
    assert verdict["source"] == "random" and not verdict["held_out"] and not verdict["function_known"]
    assert verdict["passed"] is None and verdict["max_abs"] is None  # random inputs: no headline figure, no pass
    assert verdict["random_inputs"]["max_abs"] >= 0 and verdict["random_inputs"]["samples"] == verdict["samples"]
    assert [g["kept"] for g in data["groups"]] == [4, 4, 5]
    assert sha256(model_dir / "good.onnx") == digest


def test_dry_run_prints_groups_and_writes_nothing(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    before = snapshot(model_dir)
    result = invoke(["good.onnx", "--dry-run", "-o", "out.onnx", "--report", "r.json"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "group" in out and "size" in out and "members" in out
    assert "conv1:out" in out and "conv2:in" in out and "fc:in" in out
    assert "frozen: graph output y" in out
    assert "3 groups, 1 fully frozen" in out
    assert snapshot(model_dir) == before


def test_nothing_prunable_is_written_unchanged_with_a_warning(model_dir: Path) -> None:
    before = sha256(model_dir / "single.onnx")
    proc = run_subprocess(["single.onnx", "-o", "out.onnx"], model_dir)
    assert proc.returncode == 0, proc.stderr
    assert "nothing was pruned" in proc.stderr
    assert "warning" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert sha256(model_dir / "single.onnx") == before
    written = onnx.load(str(model_dir / "out.onnx"))
    original = onnx.load(str(model_dir / "single.onnx"))
    assert written.graph.SerializeToString() == original.graph.SerializeToString()
    assert (model_dir / "out.onnx").read_bytes() == (model_dir / "single.onnx").read_bytes()


def test_exclude_and_round_to_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    onnx.save(M.wide_chain(12), tmp_path / "wide.onnx")
    result = invoke(["wide.onnx", "-o", "out.onnx", "--ratio", "0.5", "--round-to", "4", "--exclude", "conv1",
                     "--no-latency"])
    assert result.exit_code == 0, result.output
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    check_full(pruned)
    assert M.initializer(pruned, "conv1.w").shape == (12, 3, 3, 3)  # excluded
    assert M.initializer(pruned, "conv2.w").shape == (8, 12, 3, 3)  # 12 - 6 = 6, rounded up to 8


def test_input_shape_for_a_dynamic_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = M.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    check_full(model)
    monkeypatch.chdir(tmp_path)
    onnx.save(model, tmp_path / "dyn.onnx")
    result = invoke(["dyn.onnx", "-o", "out.onnx", "--input-shape", "x:2x3x8x8", "--no-latency"])
    assert result.exit_code == 0, result.output
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    check_full(pruned)
    assert M.output_signature(pruned) == [("y", onnx.TensorProto.FLOAT, ("N", 5))]
    assert M.run(pruned, M.inputs_for(pruned, batch=3))[0].shape == (3, 5)


def test_demo_writes_into_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(["--demo", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout
    written = tmp_path / "lenet300.pruned.onnx"
    pruned = onnx.load(str(written))
    check_full(pruned)
    # --round-to auto: 300 and 100 neurons are multiples of 4 (not 8), so 150 and 50 round up to 152 and 52
    assert M.initializer(pruned, "f1.weight").shape == (152, 784)
    assert M.initializer(pruned, "f2.weight").shape == (52, 152)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet300.pruned.onnx"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_honour_the_umask(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    old = os.umask(0o022)
    try:
        result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "-q", "--no-latency"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for name in ("out.onnx", "r.json"):
        assert stat.S_IMODE((model_dir / name).stat().st_mode) == 0o644, name


def test_calibrated_method_is_byte_identical_when_statistics_come_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same command twice: the first computes and caches the statistics, the second reads them."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(cache))
    calib = SAMPLE_FMNIST
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}.onnx"
        result = invoke([SAMPLE_LENET, "-o", out, "--method", "ldrf", "--ratio", "0.5", "--calib", calib, "-q",
                         "--no-latency"])
        assert result.exit_code == 0, result.output
        if run == 0:
            assert any(cache.iterdir()), "the first run caches its statistics"
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "out.onnx"],  # out.onnx.data is the input's weights file
        ["-o", "out.onnx.data"],
        ["-o", "x.onnx", "--report", "out.onnx.data"],
    ],
    ids=["output_data_file", "output_is_input_data", "report_is_input_data"],
)
def test_input_external_data_is_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    onnx.save(M.conv_chain(), "m.onnx", save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    before = snapshot(tmp_path)
    message = assert_clean_error(invoke(["m.onnx", *args]), 2)
    assert "input model" in message
    assert snapshot(tmp_path) == before
    onnx.checker.check_model(onnx.load("m.onnx"), full_check=True)


def test_settings_a_method_ignores_are_named(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --no-latency: on a loaded machine the latency note ("not faster here") would make it 4 notes
    proc = run_subprocess(["good.onnx", "-o", "out.onnx", "--merge-threshold", "0.3", "--exclude", "conv9", "--reconstruct",
                           "--no-latency", "--round-to", "1"], model_dir)
    assert proc.returncode == 0, proc.stderr
    for piece in ("--merge-threshold and --merge-scale are used by --method merge only", "'conv9' matches no node",
                  "--reconstruct needs calibration data"):
        assert piece in proc.stderr  # warned
    assert "notes: 3 (-v shows them" in proc.stdout  # and counted among the report's notes
    verbose = run_subprocess(["good.onnx", "-o", "out.onnx", "--merge-threshold", "0.3", "-v"], model_dir)
    assert "note: --merge-threshold and --merge-scale are used by --method merge only" in verbose.stdout


def test_dry_run_shows_what_a_data_free_method_keeps(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    result = invoke(["good.onnx", "--dry-run", "--ratio", "0.5", "--round-to", "1"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.split() and line.split()[0].isdigit() and "groups," not in line]
    assert [(int(r[1]), int(r[2])) for r in rows] == [(8, 4), (8, 4), (5, 5)]  # size, kept
    data_driven = invoke(["good.onnx", "--dry-run", "--method", "thinet"])
    assert "chooses them from data or a search" in data_driven.stdout


def test_report_names_a_budget_not_an_unused_ratio(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    result = invoke(["good.onnx", "-o", "out.onnx", "--target-macs", "0.6", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("method l1, target MACs 0.6,")  # not the default ratio 0.5


def test_api_exclude_as_a_string_is_one_pattern() -> None:
    from onnxslim_prune import prune

    as_string = prune(M.conv_chain(), "l1", 0.5, exclude="conv1")
    as_list = prune(M.conv_chain(), "l1", 0.5, exclude=["conv1"])
    assert as_string.model.SerializeToString() == as_list.model.SerializeToString()
    assert as_string.report.after.params < as_string.report.before.params  # not every node protected


# ----------------------------------------------------------------------------- the verdict without real data

NO_DATA_GATES = {
    "ratio_and_gate": ["--ratio", "0.5", "--min-cosine", "-1"],
    "search": ["--min-correlation", "0.5"],
    "random_calib": ["--calib", "random", "--ratio", "0.3", "--min-top1-agreement", "0.5"],
    "latency_search": ["--objective", "latency", "--target-latency", "0.6", "--min-correlation", "0.9"],
}


@pytest.mark.parametrize("case", sorted(NO_DATA_GATES))
def test_a_gate_without_real_samples_is_refused_before_any_work(
    case: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxslim_prune import api, cli

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started")

    monkeypatch.chdir(model_dir)
    monkeypatch.setattr(api, "prune", no_work)
    monkeypatch.setattr(cli.ir, "load_model", no_work)
    before = snapshot(model_dir)
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", *NO_DATA_GATES[case]])
    assert "gates need real samples: --calib or --eval" in assert_clean_error(result, 2)
    assert snapshot(model_dir) == before


def test_a_data_free_run_exits_0_and_says_function_unknown(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(model_dir)
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "verdict: function unknown: measured on random inputs" in result.stdout
    assert "function unknown: measured on random inputs" in caplog.text  # the log says it too
    check_full(onnx.load(str(model_dir / "out.onnx")))
    assert json.loads((model_dir / "r.json").read_text())["verdict"]["passed"] is None


def _unlabelled_eval(model_dir: Path) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(7).standard_normal((40, 3, 8, 8)).astype(np.float32)
    path = model_dir / "eval.npz"
    np.savez(path, x=x)
    return path, x


def test_unlabelled_eval_with_an_agreement_gate(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 0; the report's top-1 agreement is numpy's argmax comparison of both models on the 40 samples (exact)."""
    monkeypatch.chdir(model_dir)
    _, x = _unlabelled_eval(model_dir)
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--eval", "eval.npz", "--ratio", "0.25",
                     "--min-top1-agreement", "0.2", "--no-latency"])
    assert result.exit_code == 0, result.output
    verdict = json.loads((model_dir / "r.json").read_text())["verdict"]
    assert verdict["source"] == "eval" and verdict["held_out"] and verdict["samples"] == 40
    assert verdict["accuracy_before"] is None and verdict["accuracy_drop_points"] is None
    original, pruned = onnx.load(str(model_dir / "good.onnx")), onnx.load(str(model_dir / "out.onnx"))
    a = np.concatenate([M.run(original, {"x": x[i : i + 1]})[0] for i in range(40)])
    b = np.concatenate([M.run(pruned, {"x": x[i : i + 1]})[0] for i in range(40)])
    assert verdict["top1_agreement"] == float(np.mean(a.argmax(1) == b.argmax(1)))
    assert verdict["gates"][0]["value"] == verdict["top1_agreement"] and verdict["passed"] is True


def test_max_drop_with_unlabelled_eval_is_one_line_exit_2(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir)
    _unlabelled_eval(model_dir)
    before = snapshot(model_dir)
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--eval", "eval.npz", "--max-drop", "1"])
    assert "--max-drop needs labelled --eval data: eval.npz has no 'labels'" in assert_clean_error(result, 2)
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("ratio, code", [(0.5, 0), (2.0, 3)])
def test_a_speed_gate_needs_no_real_samples(
    ratio: float, code: int, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--min-speedup is measured whatever the inputs: accepted without data; a miss is exit 3 (passed false), a pass
    leaves the data-free verdict's passed null. Timing is faked (pruned = `ratio` x the original's 10 ms)."""
    from onnxslim_prune.judge.latency import Latency

    monkeypatch.chdir(model_dir)
    monkeypatch.setattr(judging, "timed", lambda *a, **k: Latency(10.0, 10.0 * ratio, 30, 1, (ratio, ratio), "thread-cpu", 1))
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--round-to", "1", "--min-speedup", "1.5"])
    assert result.exit_code == code, result.output
    verdict = json.loads((model_dir / "r.json").read_text())["verdict"]
    speed = next(g for g in verdict["gates"] if g["gate"] == "--min-speedup")
    assert speed["value"] == pytest.approx(1.0 / ratio) and speed["passed"] is (code == 0)
    assert verdict["passed"] is (None if code == 0 else False) and verdict["source"] == "random"
    assert (model_dir / "out.onnx").exists() is (code == 0)
