"""Issue 21, item 5: the faults a user measured, each with its test.

Outputs are written by one writer (`atomic.Outputs`): all of a run's files or none, unique temporary
names, nothing removed that the run did not create. Conflicting options are usage errors or named
warnings. `python -m onnxslim_prune` works; the report has a schema version; empty graphs, pickled
arrays and truncated images get clear messages. Every test asserts the exit code, the one-line
message and the files on disk, and where a model is written, its numbers (onnxruntime, 1e-5).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from conftest import check_full, sha256, snapshot
from onnx import TensorProto, helper, numpy_helper

import models as M
from onnxslim_prune import atomic, ir
from onnxslim_prune.calib import InputSpec, Preprocess, load_calibration
from onnxslim_prune.cli import main
from onnxslim_prune.errors import CalibrationError, UsageError
from onnxslim_prune.judge.report import REPORT_SCHEMA

TOL = 1e-5
#: conv_chain with half of each conv's channels dead: l1 at 0.5 removes exactly those, outputs unchanged
DEAD = {"dead1": (1, 3, 4, 6), "dead2": (0, 2, 5, 7)}


def invoke(args: list[Any]) -> Result:
    """The CLI on `args`; channel counts are not rounded (the 8-channel test models would stay whole under auto)."""
    return CliRunner().invoke(main, [*map(str, args), "--round-to", "1"], catch_exceptions=True)


def clean_error(result: Result, code: int) -> str:
    """Exit `code` and exactly one `error:` line on stderr, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """good.onnx (conv chain with dead channels) in the current folder."""
    onnx.save(M.conv_chain(**DEAD), tmp_path / "good.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_pruned_exactly(path: Path) -> None:
    """The written model is valid, lost the dead channels, and computes what the original computes."""
    pruned = onnx.load(str(path))
    check_full(pruned)
    assert M.initializer(pruned, "conv1.w").shape == (4, 3, 3, 3)
    assert M.initializer(pruned, "conv2.w").shape == (4, 4, 3, 3)
    assert M.max_abs_diff(M.conv_chain(**DEAD), pruned) < TOL


def temporaries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- one atomic writer


class _FullDisk:
    """`open` for the writer's module: writes to a file whose name contains `needle` fail with ENOSPC."""

    def __init__(self, needle: str) -> None:
        self.needle = needle

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(file, mode, *args, **kwargs)
        if self.needle not in Path(file).name or "w" not in mode:
            return handle
        needle = self.needle

        class Full:
            def __enter__(self) -> Full:
                return self

            def __exit__(self, *exc: Any) -> None:
                handle.close()

            def write(self, data: bytes) -> int:
                handle.write(data[: len(data) // 2])  # part of it lands, as on a real full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), needle)

        return Full()


def test_a_report_that_cannot_be_written_leaves_no_model(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "open", _FullDisk("r.json"), raising=False)
    before = snapshot(folder)
    line = clean_error(invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--no-latency"]), 2)
    assert line == "error: r.json: cannot write: No space left on device"
    assert snapshot(folder) == before  # no model, no report, no temporary (docs/ci.md: exit 2 writes nothing)


def test_model_with_external_data_and_report_are_written_together(folder: Path) -> None:
    wide = M.conv_chain(dead1=range(0, 32, 2), dead2=range(1, 32, 2), c1=32, c2=32)  # conv2 keeps 9 KiB: external
    onnx.save(onnx.ModelProto.FromString(wide.SerializeToString()), "ext.onnx", save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)  # a copy: saving moves the weights out of the proto
    foreign = folder / ".out.onnx.data.tmp"  # the old fixed temporary name, here another program's file
    foreign.write_text("not ours")
    result = invoke(["ext.onnx", "-o", "out.onnx", "--report", "r.json", "--no-latency", "-q"])
    assert result.exit_code == 0, result.output
    assert foreign.read_text() == "not ours"  # never removed: this run did not create it
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".out.onnx.data.tmp", "ext.onnx", "ext.onnx.data", "good.onnx", "out.onnx", "out.onnx.data", "r.json"])
    stored = onnx.load(str(folder / "out.onnx"), load_external_data=False)
    assert {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"} == {"out.onnx.data"}
    pruned = onnx.load(str(folder / "out.onnx"))
    check_full(pruned)
    assert M.initializer(pruned, "conv2.w").shape == (16, 16, 3, 3)
    assert M.max_abs_diff(wide, pruned) < TOL
    report = json.loads((folder / "r.json").read_text())
    assert report["output_path"] == "out.onnx" and report["schema"] == REPORT_SCHEMA == 2


def test_ctrl_c_between_the_renames_restores_the_previous_files(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is renamed, then Ctrl-C before the report: the old model comes back, nothing new is left."""
    (folder / "out.onnx").write_bytes(b"previous model")
    (folder / "r.json").write_text("previous report")
    before = snapshot(folder)
    real = os.replace
    renamed: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "r.json" and Path(src).name.endswith(".tmp") and not renamed:
            renamed.append(str(dst))
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    result = invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--no-latency", "-q"])
    assert result.exit_code == 130 and result.stderr.strip() == "aborted", result.output
    assert renamed == ["r.json"]
    assert snapshot(folder) == before  # out.onnx is the previous one again; no temporary, no backup


def test_a_failed_rename_undoes_the_earlier_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.bin").write_bytes(b"old a")
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "c.bin":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(UsageError, match=r"c\.bin: cannot write: Input/output error"):
        with atomic.Outputs() as out:
            for name in ("a.bin", "b.bin", "c.bin"):
                out.add_bytes(tmp_path / name, name.encode())
            out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # b.bin removed, a.bin restored
    assert (tmp_path / "a.bin").read_bytes() == b"old a"


def test_data_file_is_renamed_before_the_model_and_files_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    synced: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(atomic.os, "replace", lambda s, d: (order.append(Path(d).name), real_replace(s, d))[1])
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    model = M.conv_chain(**DEAD)
    ir.save_model(model, tmp_path / "m.onnx", external=True)
    assert order == ["m.onnx.data", "m.onnx"]
    assert len(synced) == 3  # both files before the renames, the folder after them
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert M.max_abs_diff(model, written) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_concurrent_runs_writing_one_output_all_succeed_and_stay_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 writers of one model + data pair: none fails, no temporary is left, the pair comes from one writer."""
    real = os.replace

    def slow_replace(src: Any, dst: Any) -> None:  # widens the window between the data's rename and the model's
        real(src, dst)
        time.sleep(0.01)

    monkeypatch.setattr(atomic.os, "replace", slow_replace)
    models = [M.conv_chain(c1=32, c2=32, seed=k) for k in range(12)]  # 9 KiB conv2: a real data file
    target = tmp_path / "out.onnx"
    errors: list[BaseException] = []
    start = threading.Barrier(len(models))

    def write(model: onnx.ModelProto) -> None:
        try:
            start.wait()
            ir.save_model(model, target, external=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    stored = {i.name: i for i in onnx.load(str(target), load_external_data=False).graph.initializer}
    assert stored["conv2.w"].data_location == TensorProto.EXTERNAL
    written = onnx.load(str(target))
    check_full(written)
    weights = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    matches = [k for k, m in enumerate(models)
               if all(np.array_equal(weights[i.name], numpy_helper.to_array(i)) for i in m.graph.initializer)]
    assert len(matches) == 1, "the model and its data file come from different writers"
    assert M.max_abs_diff(models[matches[0]], written) == 0.0


def test_an_unwritable_model_leaves_nothing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.startswith(".out.onnx."):
            real(self, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    before = snapshot(folder)
    line = clean_error(invoke(["good.onnx", "-o", "out.onnx", "--report", "r.json", "--no-latency"]), 2)
    assert line == "error: out.onnx: cannot write: No space left on device"
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------- conflicting options

CONFLICTS = {
    "ratio_and_target_macs": (["good.onnx", "--ratio", "0.5", "--target-macs", "0.5"], "--ratio and --target-macs are two budgets"),
    "ratio_and_target_params": (["good.onnx", "--ratio", "0.3", "--target-params", "0.5"], "--ratio and --target-params"),
    "dry_run_and_sensitivity": (["good.onnx", "--dry-run", "--sensitivity"], "--dry-run only plans and --sensitivity"),
    "quiet_and_verbose": (["good.onnx", "-q", "-v"], "-q/--quiet and -v/--verbose"),
    "demo_and_model": (["good.onnx", "--demo"], "--demo prunes the bundled sample model: drop good.onnx"),
    "plot_without_search": (["good.onnx", "--plot", "p.png"], "--plot draws the sensitivity profile"),
    "sensitivity_gate_and_ratio": (["good.onnx", "--sensitivity", "--ratio", "0.3", "--min-cosine", "0.9"],
                                   "--sensitivity with a gate searches, but --ratio fixes the budget"),
    "plot_is_the_report": (["good.onnx", "--sensitivity", "--report", "r.json", "--plot", "r.json"], "--plot r.json is the report"),
    "report_is_the_output_data": (["good.onnx", "-o", "o.onnx", "--report", "o.onnx.data"], "output model's external data"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_conflicting_options_are_usage_errors(case: str, folder: Path) -> None:
    args, needle = CONFLICTS[case]
    before = snapshot(folder)
    line = clean_error(invoke(args), 2)
    assert needle in line, line
    assert snapshot(folder) == before


def test_ignored_options_are_named_in_a_warning(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot(folder)
    with caplog.at_level(logging.WARNING):
        dry = invoke(["good.onnx", "--dry-run", "-o", "x.onnx", "--calib", "random", "--report", "r.json", "--max-drop", "1"])
    assert dry.exit_code == 0, dry.output
    assert ("--dry-run only traces and plans; it writes and measures nothing: --output, --calib, --max-drop, --report "
            "are ignored") in caplog.text
    assert "3 groups" in dry.stdout and snapshot(folder) == before
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plain = invoke(["good.onnx", "-o", "out.onnx", "--max-probes", "3", "--keep-failed", "--mean", "0.5", "--no-latency"])
    assert plain.exit_code == 0, plain.output
    assert "no search or --sensitivity runs: --max-probes is ignored" in caplog.text
    assert "--calib is not an image folder: --mean is ignored" in caplog.text
    assert "no gate is given, so every validated model is written: --keep-failed is ignored" in caplog.text
    assert_pruned_exactly(folder / "out.onnx")


def test_sensitivity_alone_names_what_it_ignores_and_its_report_has_the_schema(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result = invoke(["good.onnx", "--sensitivity", "-o", "x.onnx", "--ratio", "0.2", "--report", "s.json",
                         "--sensitivity-ratios", "0.5"])
    assert result.exit_code == 0, result.output
    assert "--sensitivity without a gate only measures and writes no model: --output, --ratio are ignored" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["good.onnx", "s.json"]
    data = json.loads((folder / "s.json").read_text())
    assert data["schema"] == REPORT_SCHEMA and data["method"] == "l1"
    rows = data["sensitivity"]["rows"]
    # dead channels are the lowest-l1 half: cutting half of either conv alone does no damage
    assert sorted(r["node"] for r in rows) == ["conv1", "conv2"]
    assert all(r["ratio"] == 0.5 and r["removed"] == 4 and r["failed"] is None and r["damage"] < TOL for r in rows), rows


# ----------------------------------------------------------------------------- python -m onnxslim_prune


def test_python_dash_m_runs_the_command(folder: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    ok = subprocess.run([sys.executable, "-m", "onnxslim_prune", "good.onnx", "-o", "out.onnx", "--round-to", "1", "--report", "r.json",
                         "--no-latency", "-q"], cwd=folder, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert_pruned_exactly(folder / "out.onnx")
    assert json.loads((folder / "r.json").read_text())["schema"] == REPORT_SCHEMA
    (folder / "text.onnx").write_text("not a model\n")
    bad = subprocess.run([sys.executable, "-m", "onnxslim_prune", "text.onnx", "-o", "t.onnx"], cwd=folder,
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: text.onnx:"), bad.stderr
    assert not (folder / "t.onnx").exists()


# ----------------------------------------------------------------------------- clear messages


def _empty_graph_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    return helper.make_model(helper.make_graph([], "empty", [x], [x]), opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_without_nodes_says_so(folder: Path) -> None:
    model = _empty_graph_model()
    onnx.checker.check_model(model, full_check=True)  # valid ONNX: only there is nothing to prune
    onnx.save(model, folder / "empty.onnx")
    no_opset = M.conv_chain()
    del no_opset.opset_import[:]
    onnx.save(no_opset, folder / "noopset.onnx")
    before = snapshot(folder)
    assert clean_error(invoke(["empty.onnx", "-o", "out.onnx"]), 1) == "error: empty.onnx: the graph has no nodes: nothing to prune"
    assert clean_error(invoke(["noopset.onnx", "-o", "out.onnx"]), 1) == "error: noopset.onnx: not an ONNX model (no opset)"
    assert snapshot(folder) == before


def test_pickled_arrays_are_refused_by_name(folder: Path) -> None:
    np.savez(folder / "pickled.npz", x=np.array([{"a": 1}], dtype=object), labels=np.zeros(1, np.int64))
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object))
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(folder / "plain.npz", x=x)
    before = snapshot(folder)
    for args in (["--method", "ldrf", "--calib", "pickled.npz"], ["--method", "ldrf", "--calib", "pickled.npy"],
                 ["--method", "ldrf", "--calib", "plain.npz", "--eval", "pickled.npz"]):
        line = clean_error(invoke(["good.onnx", "-o", "out.onnx", "--no-latency", *args]), 1)
        name = args[-1]
        assert line == f"error: {name}: holds Python objects (pickled); not loaded for safety: save plain arrays", line
    corrupt = folder / "corrupt.npz"
    corrupt.write_bytes(b"PK not a zip")
    line = clean_error(invoke(["good.onnx", "-o", "out.onnx", "--method", "ldrf", "--calib", "corrupt.npz"]), 1)
    assert "expected a numpy .npz archive" in line  # a plainly unreadable file keeps its message
    assert snapshot(folder) == {**before, "corrupt.npz": sha256(corrupt)}


def _write_jpegs(folder: Path, count: int) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = []
    for i in range(count):
        rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.jpg", quality=95)
        with Image.open(folder / f"img{i}.jpg") as img:
            pixels.append(np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), np.float32))
    return pixels


def test_a_truncated_jpeg_is_skipped_with_a_warning_like_a_bad_header(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("PIL")
    from PIL import ImageFile

    images = folder / "images"
    images.mkdir()
    good = _write_jpegs(images, 4)
    data = (images / "img3.jpg").read_bytes()
    (images / "img3.jpg").write_bytes(data[: len(data) // 2])  # the header parses; the body ends early
    (images / "img4.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # a bad header
    spec = [InputSpec("x", (1, 3, 8, 8), np.dtype(np.float32), (0,))]
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(images, spec, preprocess=Preprocess())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # not switched on to get there
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping unreadable image img3.jpg: OSError: image file is truncated" in w for w in warnings), warnings
    assert any("skipping unreadable image img4.jpg" in w for w in warnings), warnings
    assert calib.num_samples == 3
    batch = next(calib.iter_batches(8))["x"]
    expected = np.stack([g.transpose(2, 0, 1) / 255.0 for g in good[:3]]).astype(np.float32)
    np.testing.assert_allclose(batch, expected, atol=1e-6)  # exactly the three whole images, in order

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = invoke(["good.onnx", "-o", "out.onnx", "--calib", "images", "--holdout", "0", "--no-reconstruct", "--method", "l1",
                         "--report", "r.json", "--no-latency", "-q"])
    assert result.exit_code == 0, result.output  # was exit 1: the truncated file failed the run mid-way
    assert "img3.jpg" in caplog.text and "img4.jpg" in caplog.text
    assert_pruned_exactly(folder / "out.onnx")
    verdict = json.loads((folder / "r.json").read_text())["verdict"]
    assert verdict["samples"] == 3 and verdict["source"] == "calib-fit" and verdict["max_abs"] < TOL


def test_too_few_whole_images_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _write_jpegs(tmp_path, 2)
    for name in ("img0.jpg", "img1.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 3])
    spec = [InputSpec("x", (1, 3, 8, 8), np.dtype(np.float32), (0,))]
    with pytest.raises(CalibrationError, match=r"2 of 2 images are unreadable \(first: img0\.jpg: OSError: image file is truncated"):
        load_calibration(tmp_path, spec)
