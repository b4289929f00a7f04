"""Validation figures: agreement with the original is measured on the inputs the report names.

Oracle: top-1 agreement and max |y - y0| recomputed here with onnxruntime on the same samples.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import SAMPLE_LENET

import models as M
from onnxslim_prune import prune, validate

FMNIST = SAMPLE_LENET.parent / "fmnist_test500.npz"


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": images})[0]


def test_agreement_on_evaluation_samples_matches_onnxruntime() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.7, eval_data=FMNIST)
    ag = result.report.agreement
    assert ag is not None
    assert (ag.samples, ag.inputs) == (validate.AGREEMENT_SAMPLES, "evaluation samples")
    images = np.load(FMNIST)["input"][: validate.AGREEMENT_SAMPLES]
    before, after = logits(onnx.load(str(SAMPLE_LENET)), images), logits(result.model, images)
    expected_top1 = float(np.mean(before.argmax(1) == after.argmax(1)))
    assert ag.top1 == expected_top1
    assert ag.top1 < 1.0  # 70% of the neurons gone: some predictions must change
    np.testing.assert_allclose(ag.max_abs, np.abs(before - after).max(), rtol=1e-5)


def test_agreement_on_calibration_samples() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.3, calib=FMNIST, params={"reconstruct": False})
    ag = result.report.agreement
    assert ag is not None and (ag.samples, ag.inputs) == (validate.AGREEMENT_SAMPLES, "calibration samples")


def test_agreement_without_data_uses_several_random_feeds() -> None:
    result = prune(M.conv_chain(dead1=[0, 1], dead2=[0, 1]), "l1", 0.25)
    ag = result.report.agreement
    assert ag is not None
    assert (ag.samples, ag.inputs) == (validate.RANDOM_FEEDS, "seeded random inputs")
    assert ag.max_abs <= 1e-5  # only the dead channels went


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
