"""CLI behaviour seen failing for real users: unwritable outputs, Ctrl-C, quantized models, progress in CI logs, --help."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_LENET
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import console
from onnxslim_prune.cli import main
from onnxslim_prune.methods.base import METHODS


def test_help_lists_every_method_with_one_line() -> None:
    text = CliRunner().invoke(main, ["--help"]).output
    for name, line in ((spec.name, spec.help) for spec in METHODS.values()):
        assert line  # a new method needs its --help line
        assert f"  {name} " in text and line.split(":")[0][:30] in " ".join(text.split())
    assert "3 a gate missed" in text


def test_version() -> None:
    from onnxslim_prune import __version__

    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"onnx-prune {__version__}"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc: a folder nobody, root included, can create files in")
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_an_unwritable_output_folder_is_a_usage_error_before_any_work(tmp_path: Path, flag: str) -> None:
    target = "/proc/out.onnx" if flag == "-o" else "/proc/r.json"
    args = [str(SAMPLE_LENET), flag, target] + (["-o", str(tmp_path / "o.onnx")] if flag == "--report" else [])
    started = time.perf_counter()
    res = CliRunner().invoke(main, [*args, "--method", "thinet", "--calib", "random"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == "error: /proc: cannot write there: No such file or directory"
    assert time.perf_counter() - started < 2.0  # refused before calibration, not after it
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("signum", "code", "last"), [(signal.SIGINT, 130, "aborted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupt_or_termination_mid_run_leaves_nothing(tmp_path: Path, signum: int, code: int, last: str) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (a cancelled CI job, `kill`) in the middle of a calibrated run: one line, its exit
    code, no traceback, no output and no temporary folder: the calibration frontier spills to TMPDIR past a tiny
    `--calib-memory`, and the signal comes once it has."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "ONNXSLIM_PRUNE_CACHE": str(tmp_path / "cache"), "TMPDIR": str(temp)}
    args = [sys.executable, "-m", "onnxslim_prune.cli", str(SAMPLE_LENET), "-o", str(tmp_path / "o.onnx"),
            "--report", str(tmp_path / "r.json"), "--method", "ldrf", "--calib", "random", "--calib-samples", "200000", "--calib-memory", "64", "-v"]
    # a shell's background job (``cmd &`` without job control) starts with SIGINT ignored, and Python then keeps it
    # ignored: the child gets the default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    spilled = threading.Event()

    def read() -> None:  # imports and the first passes can take seconds on a loaded machine
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "spilling to" in line:
                spilled.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert spilled.wait(timeout=120), "".join(lines)
    time.sleep(0.5)  # inside the statistics pass over 200,000 samples
    assert proc.poll() is None, "".join(lines)
    assert any(temp.glob("onnxslim-frontier-*"))
    proc.send_signal(signum)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == last and "Traceback" not in err
    ort_session_id = temp / ".ses"  # onnxruntime's import keeps this one file in TMPDIR, the same for every run
    cache = tmp_path / "cache"  # statistics finished before the signal stay cached, whole: no partial file
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p != ort_session_id and p.parent != cache]
    assert not leftovers and not list(temp.glob("onnxslim-*")), leftovers
    assert all(p.suffix == ".npz" for p in cache.glob("*")), list(cache.glob("*"))


def _qdq_conv() -> onnx.ModelProto:
    """x -> Conv(DequantizeLinear(int8 weight, per-channel scale)) -> y: a QDQ model."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0), helper.make_node("Conv", ["x", "w"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
         numpy_helper.from_array(np.zeros(4, np.int8), "wz")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_qdq_models_are_traced_through_their_dequantize(tmp_path: Path) -> None:
    path = tmp_path / "q.onnx"
    onnx.save(_qdq_conv(), path)
    dry = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert dry.exit_code == 0 and "QOperator" not in dry.output and "1 groups, 1 fully frozen" in dry.output
    res = CliRunner().invoke(main, [str(path), "-o", str(tmp_path / "o.onnx"), "-v"])
    assert res.exit_code == 0, res.output
    assert "graph output y" in res.output  # the one conv feeds the output: frozen, with that reason
    assert "no Conv, Gemm or MatMul with constant weights" not in res.output


def test_progress_in_a_ci_log_writes_lines_and_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(console, "LINE_SECONDS", 0.0)
    monkeypatch.setattr(console, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(console, "POLL_SECONDS", 0.01)
    stream = io.StringIO()
    progress = console.ConsoleProgress(stream, terminal=False)
    progress.stage("reconstruction")
    for done in range(1, 4):
        progress(done, 3)
    time.sleep(0.3)  # one long step: the heartbeat speaks
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines[:3]] == [f"reconstruction: {i}/3 ({i / 3:.0%})" for i in (1, 2, 3)]
    assert any(line.endswith("still working: reconstruction (3/3)") for line in lines[3:])
    assert all(line.startswith("[0:00] ") for line in lines)


def test_progress_in_a_ci_log_is_quiet_for_short_runs() -> None:
    stream = io.StringIO()
    progress = console.ConsoleProgress(stream, terminal=False)
    progress.stage("statistics")
    progress(1, 2)
    progress(2, 2)
    progress.close()
    assert stream.getvalue() == ""  # a run shorter than QUIET_SECONDS prints no progress lines


def test_a_line_of_the_cli_between_stages_closes_the_open_bar() -> None:
    """`ConsoleProgress.echo` (the default method's line): on a terminal the bar of the stage before is finished
    first, so the line starts on a line of its own, never drawn over by the bar."""
    stream = io.StringIO()
    progress = console.ConsoleProgress(stream, terminal=True)
    progress.stage("reference")
    progress(2, 4)
    progress.echo("method: thinet (why)")
    progress.close()
    text = stream.getvalue()
    assert "reference" in text.split("method: thinet (why)\n")[0]  # the bar was drawn before the line
    assert text.endswith("method: thinet (why)\n") and "\nmethod: thinet (why)\n" in text
