"""A run's settings as one value (`settings.RunSettings`), the refit as an enum (`methods.base.Refit`), and the
default method chosen from the run's one load (`api.prepare`, `methods.defaults`).

Oracles: the settings and the keyword form of a run give the same bytes; l1 at the dead channels' share removes
exactly them, so the pruned model computes the original's outputs (to 1e-5); ``--refit mean`` keeps plain
pruning's weights (bit for bit) whether given as the enum, its value or the CLI flag; a run with ``--calib`` and
no ``--method`` parses the model once and gives the named method's bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models as M
from conftest import SAMPLE_LENET
from onnxslim_prune import RunSettings, api
from onnxslim_prune.cli import main
from onnxslim_prune.methods.base import CommonParams, Refit
from onnxslim_prune.methods.test_defaults import _attention


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path / "cache"))


def test_the_settings_and_the_keywords_are_one_run() -> None:
    model = M.conv_chain(dead1=(1, 5), dead2=(0, 3))
    settings = RunSettings("l1", 0.25, round_to=1, latency=False)
    assert RunSettings.of("l1", 0.25, round_to=1, latency=False) == settings
    by_keywords = api.prune(model, "l1", 0.25, round_to=1, latency=False)
    by_settings = api.prune(model, settings)
    prepared = api.prepare(model, settings).run()
    assert by_keywords.model.SerializeToString() == by_settings.model.SerializeToString() \
        == prepared.model.SerializeToString()
    assert M.initializer(by_settings.model, "conv1.w").shape[0] == 6  # the two dead channels of each conv
    assert M.initializer(by_settings.model, "conv2.w").shape == (6, 6, 3, 3)
    assert M.max_abs_diff(model, by_settings.model) < 1e-5
    assert by_settings.default is None  # the method was named


def test_an_unknown_or_repeated_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown run setting: calibration"):
        api.prune(M.conv_chain(), "l1", 0.5, calibration="data.npz")
    with pytest.raises(TypeError, match="ratio given twice"):
        RunSettings.of("l1", 0.5, ratio=0.25)
    assert RunSettings.of(RunSettings("ldrf", 0.3), seed=2) == RunSettings("ldrf", 0.3, seed=2)


def _lenet_calibration(folder: Path) -> Path:
    with np.load(SAMPLE_LENET.parent / "fmnist_test500.npz") as data:
        np.savez(folder / "c.npz", input=data["input"][:96])
    return folder / "c.npz"


def test_refit_mean_as_the_enum_its_value_and_the_flag(tmp_path: Path) -> None:
    calib = _lenet_calibration(tmp_path)
    assert CommonParams.parse({"refit": "mean"}).refit is Refit.MEAN
    assert CommonParams.parse({}).refit is Refit.LS
    common = dict(calib=str(calib), holdout=0.25, round_to=1, latency=False)
    as_enum = api.prune(SAMPLE_LENET, "l1", 0.5, params={"refit": Refit.MEAN}, **common)
    as_value = api.prune(SAMPLE_LENET, "l1", 0.5, params={"refit": "mean"}, **common)
    plain = api.prune(SAMPLE_LENET, "l1", 0.5, params={"reconstruct": False}, **common)
    out = tmp_path / "cli.onnx"
    flag = CliRunner().invoke(main, [str(SAMPLE_LENET), "-o", str(out), "--method", "l1", "--ratio", "0.5",
                                     "--calib", str(calib), "--holdout", "0.25", "--round-to", "1", "--no-latency",
                                     "--refit", "mean", "-q"])
    assert flag.exit_code == 0, flag.output
    assert as_enum.model.SerializeToString() == as_value.model.SerializeToString() == out.read_bytes()
    assert as_enum.report.settings["params"] == {"refit": "mean"}
    assert '"refit": "mean"' in as_enum.report.to_json()
    # the bias only: every weight is plain pruning's, the biases of the refitted layers are not
    weights = {t.name: t for t in plain.model.graph.initializer}
    for tensor in as_enum.model.graph.initializer:
        mine, theirs = onnx.numpy_helper.to_array(tensor), onnx.numpy_helper.to_array(weights[tensor.name])
        assert mine.shape == theirs.shape
        if mine.ndim == 2:
            np.testing.assert_array_equal(mine, theirs)
    changed = [t.name for t in as_enum.model.graph.initializer if t.dims and len(t.dims) == 1
               and not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(weights[t.name]))]
    assert changed  # the consumers' biases moved to keep their output means


def test_the_default_method_is_chosen_from_the_one_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx.save(_attention(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((24, 4, 8)).astype(np.float32))
    common = dict(calib=str(tmp_path / "c.npz"), round_to=1, latency=False)
    chosen = api.prune(tmp_path / "m.onnx", None, 0.5, **common)
    named = api.prune(tmp_path / "m.onnx", "obs", 0.5, **common)
    assert chosen.default is not None and chosen.default.name == "obs" and chosen.report.method == "obs"
    assert "for a transformer" in chosen.default.reason
    assert chosen.model.SerializeToString() == named.model.SerializeToString()
    kept = {t.name: list(t.dims) for t in chosen.model.graph.initializer}
    assert kept["wq"] == [8, 4] and kept["wo"] == [4, 8]  # two of four heads removed
    free = api.prune(tmp_path / "m.onnx", None, 0.5, round_to=1, latency=False)
    assert free.default is not None and free.default.name == "l1" and free.report.method == "l1"
    loads: list[str] = []
    real = onnx.load

    def counted(path: object, *args: object, **kwargs: object) -> onnx.ModelProto:
        loads.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx, "load", counted)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz"),
                                       "--ratio", "0.5", "--round-to", "1", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "method: obs (the real-model suite's best with --calib for a transformer; --method to choose another)" \
        in result.stderr
    assert loads == [str(tmp_path / "m.onnx")]  # parsed once: the default is read from the run's load
    assert out.read_bytes() == named.model.SerializeToString()
