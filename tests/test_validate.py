"""Validation figures: agreement with the original is measured on the inputs the report names.

Oracle: top-1 agreement and max |y - y0| recomputed here with onnxruntime on the same samples.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SAMPLE_FMNIST, SAMPLE_LENET
from onnx import TensorProto, helper, numpy_helper

import models as M
from onnxslim_prune import prune
from onnxslim_prune.judge import validate
from onnxslim_prune.errors import CalibrationError, UsageError, ValidationError
from onnxslim_prune.judge.verdict import VerdictSource



def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": images})[0]


def test_verdict_on_evaluation_samples_matches_onnxruntime() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.7, eval_data=SAMPLE_FMNIST)
    v = result.report.verdict
    assert v is not None
    data = np.load(SAMPLE_FMNIST)
    images, labels = data["input"], data["labels"]
    assert (v.source, v.held_out, v.samples) == (VerdictSource.EVAL, True, len(images))  # every --eval sample
    before, after = logits(onnx.load(str(SAMPLE_LENET)), images), logits(result.model, images)
    assert v.top1_agreement == float(np.mean(before.argmax(1) == after.argmax(1)))
    assert v.top1_agreement < 1.0  # 70% of the neurons gone: some predictions must change
    np.testing.assert_allclose(v.max_abs, np.abs(before - after).max(), rtol=1e-5)
    a, b = before.astype(np.float64).ravel(), after.astype(np.float64).ravel()
    np.testing.assert_allclose(v.cosine, a @ b / np.linalg.norm(a) / np.linalg.norm(b), rtol=1e-9)
    ca, cb = before - before.mean(0), after - after.mean(0)  # centred over samples
    np.testing.assert_allclose(v.correlation, np.sum(ca * cb) / np.sqrt(np.sum(ca**2) * np.sum(cb**2)), rtol=1e-6)
    assert v.accuracy_after == float(np.mean(after.argmax(1) == labels))
    assert v.accuracy_before == float(np.mean(before.argmax(1) == labels))


def test_verdict_on_held_out_calibration_samples() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.3, calib=SAMPLE_FMNIST, params={"reconstruct": False})
    v = result.report.verdict
    assert v is not None and v.source is VerdictSource.CALIB_HOLDOUT and v.held_out
    assert v.samples == 100  # 20% of the 500 calibration samples
    assert v.fitted and v.fitted[0].top1 is not None  # fitted-sample figures beside it, never as the verdict


def test_holdout_zero_measures_on_fitted_samples_and_says_so() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.3, calib=SAMPLE_FMNIST, params={"reconstruct": False}, holdout=0.0)
    v = result.report.verdict
    assert v is not None and v.source is VerdictSource.CALIB_FIT and not v.held_out
    assert any("--holdout 0" in n and "optimistic" in n for n in result.report.notes)


def test_verdict_without_data_uses_seeded_random_samples() -> None:
    result = prune(M.conv_chain(dead1=[0, 1], dead2=[0, 1]), "l1", 0.25)
    v = result.report.verdict
    assert v is not None
    assert (v.source, v.samples, v.held_out) == (VerdictSource.RANDOM, validate.RANDOM_SAMPLES, False)
    assert v.max_abs <= 1e-5 and v.correlation == pytest.approx(1.0)  # only the dead channels went
    assert "structure, not function" in result.report.table()


def test_sample_feeds_respect_a_static_batch() -> None:
    model = M.conv_chain()  # batch fixed at 1
    arrays = {"x": np.zeros((10, *M.inputs_for(model)["x"].shape[1:]), np.float32)}
    feeds = validate.sample_feeds(model, arrays, limit=5)
    assert [f["x"].shape[0] for f in feeds] == [1] * 5


def test_sample_feeds_take_a_handful_of_samples_on_a_dynamic_batch() -> None:
    model = onnx.load(str(SAMPLE_LENET))  # dynamic batch
    arrays = {"input": np.zeros((4, 1, 28, 28), np.float32)}
    feeds = validate.sample_feeds(model, arrays)
    assert [f["input"].shape[0] for f in feeds] == [4]


# ----------------------------------------------------------------------------- bad data is refused, never averaged


def _lenet_fixed_batch(tmp_path: Path) -> Path:
    model = onnx.load(str(SAMPLE_LENET))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1  # exported with batch 1, the common case
    path = tmp_path / "lenet_b1.onnx"
    onnx.save(model, path)
    return path


def test_eval_on_a_fixed_batch_model(tmp_path: Path) -> None:
    data = np.load(SAMPLE_FMNIST)
    small = tmp_path / "eval.npz"
    np.savez(small, input=data["input"][:20], labels=data["labels"][:20])
    result = prune(str(_lenet_fixed_batch(tmp_path)), "l1", 0.3, eval_data=small)
    full = prune(str(SAMPLE_LENET), "l1", 0.3, eval_data=small)
    assert result.report.accuracy_before == full.report.accuracy_before
    assert result.report.accuracy_after == full.report.accuracy_after


BAD_EVAL = {
    # id: (arrays to save, or None for a .npy, expected error type, a piece of the message)
    "npy": (None, CalibrationError, "--eval takes an .npz"),
    "label_count": ({"input": (8, 1, 28, 28), "labels": 7}, CalibrationError, "'labels' must be 8 integer"),
    "float_labels": ({"input": (8, 1, 28, 28), "labels": "float"}, CalibrationError, "integer class indices"),
    "one_hot": ({"input": (8, 1, 28, 28), "labels": "one_hot"}, CalibrationError, "integer class indices"),
    "out_of_range": ({"input": (8, 1, 28, 28), "labels": "big"}, CalibrationError, "the model has 10 classes"),
    "shape": ({"input": (8, 1, 32, 32), "labels": 8}, CalibrationError, "expected (N, 1, 28, 28)"),
    "nan": ({"input": (8, 1, 28, 28), "labels": 8, "nan": True}, CalibrationError, "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVAL))
def test_bad_evaluation_data_is_one_clear_error(tmp_path: Path, case: str) -> None:
    spec, error, piece = BAD_EVAL[case]
    path = tmp_path / ("eval.npy" if spec is None else "eval.npz")
    if spec is None:
        np.save(path, np.zeros((8, 1, 28, 28), np.float32))
    else:
        images = np.zeros(spec["input"], np.float32)
        if spec.get("nan"):
            images[3, 0, 5, 5] = np.nan
        n = 8
        labels = {
            "float": np.zeros(n, np.float32), "one_hot": np.eye(10, dtype=np.int64)[:n], "big": np.full(n, 12),
        }.get(spec["labels"], np.zeros(spec["labels"] if isinstance(spec["labels"], int) else n, np.int64))
        np.savez(path, input=images, labels=labels)
    with pytest.raises(error, match=re.escape(piece)):
        prune(str(SAMPLE_LENET), "l1", 0.3, eval_data=path)


def test_non_finite_calibration_data_is_refused(tmp_path: Path) -> None:
    images = np.load(SAMPLE_FMNIST)["input"][:16].copy()
    images[2, 0, 0, 0] = np.inf
    path = tmp_path / "calib.npz"
    np.savez(path, input=images)
    with pytest.raises(CalibrationError, match="1 non-finite value"):
        prune(str(SAMPLE_LENET), "thinet", 0.3, calib=path)


def test_non_finite_preprocessing_is_a_usage_error() -> None:
    from onnxslim_prune.calib import Preprocess

    with pytest.raises(UsageError, match="finite"):
        Preprocess(scale=float("nan"))


def test_a_pruned_model_that_outputs_nan_fails_validation() -> None:
    def model(op: str, value: float) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node(op, ["x", "c"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            [numpy_helper.from_array(np.array(value, np.float32), "c")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    feeds = [{"x": np.ones((2, 3), np.float32)}]
    assert validate.compare(model("Mul", 1.0), model("Mul", 2.0), feeds)[0].max_abs == 1.0
    with pytest.raises(ValidationError, match="non-finite values in output y"):
        validate.compare(model("Mul", 1.0), model("Div", 0.0), feeds)


def test_sample_feeds_use_every_sample_up_to_the_limit_on_a_dynamic_batch() -> None:
    model = onnx.load(str(SAMPLE_LENET))
    arrays = {"input": np.zeros((40, 1, 28, 28), np.float32)}
    assert [f["input"].shape[0] for f in validate.sample_feeds(model, arrays)] == [32, 8]
