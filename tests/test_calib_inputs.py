"""Calibration inputs as real users hand them over: unreadable or grey images, loosely named
arrays, and models with dynamic height/width/length (onnxslim_prune.calib.sources)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune.calib import CalibrationSet, InputSpec, Preprocess, input_specs, load_calibration
from onnxslim_prune.calib.sources import resolved_input_shapes
from onnxslim_prune.errors import CalibrationError, UsageError

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

CALIB_LOGGERS = ("onnxslim_prune.calib.sources", "onnxslim_prune.calib.arrays", "onnxslim_prune.calib.specs")


# ----------------------------------------------------------------------------- helpers


def image_model(dims: list[int | str], channels: int = 3, name: str = "images") -> onnx.ModelProto:
    """images[dims] -> Conv(2, 1x1) -> y: runs at any H/W, so traced shapes can be checked with ORT."""
    weight = np.arange(2 * channels, dtype=np.float32).reshape(2, channels, 1, 1)
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "P", "Q"])
    graph = helper.make_graph([helper.make_node("Conv", [name, "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


def collect(calib: CalibrationSet, name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in calib.iter_batches(2)])


def write_rgb(path: Path, rgb: tuple[int, int, int], hw: tuple[int, int] = (6, 6)) -> None:
    Image.fromarray(np.broadcast_to(np.array(rgb, np.uint8), (*hw, 3)).copy()).save(path)


def write_grey(path: Path, value: int, mode: str = "L") -> None:
    if mode == "I;16":
        Image.fromarray(np.full((6, 6), value, np.uint16)).save(path)
    elif mode == "P":  # a palette PNG whose entries are all grey
        Image.fromarray(np.full((6, 6), value, np.uint8)).convert("P").save(path)
    else:
        Image.fromarray(np.full((6, 6), value, np.uint8)).convert(mode).save(path)


def calib_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name in CALIB_LOGGERS]


RGB = [InputSpec("x", (1, 3, 4, 4), np.dtype(np.float32), (0,))]
GREY = [InputSpec("x", (1, 1, 4, 4), np.dtype(np.float32), (0,))]


# ----------------------------------------------------------------------------- 1. unreadable images


def test_unreadable_image_is_skipped_named_and_left_out_of_the_fingerprint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mixed, clean = tmp_path / "mixed", tmp_path / "clean"
    mixed.mkdir()
    clean.mkdir()
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        write_rgb(mixed / f"img{i}.png", rgb)
        shutil.copy(mixed / f"img{i}.png", clean / f"img{i}.png")
    (mixed / "img1b.png").write_bytes(b"\x89PNG this is no image")  # sorts between img1 and img2
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(mixed, RGB)
    (warning,) = calib_warnings(caplog)
    assert "img1b.png" in warning and "UnidentifiedImageError: cannot identify image file" in warning
    assert "\n" not in warning
    assert calib.num_samples == 3
    data = collect(calib, "x")
    np.testing.assert_allclose(data[:, :, 0, 0], np.eye(3), atol=1e-6)  # red, green, blue: img1b left out
    assert calib.fingerprint == load_calibration(clean, RGB).fingerprint  # exactly the images used

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        limited = load_calibration(mixed, RGB, samples=2)  # the limit counts readable images
    assert limited.num_samples == 2 and calib_warnings(caplog) == []  # img1b is never reached
    with caplog.at_level(logging.WARNING):
        three = load_calibration(mixed, RGB, samples=3)
    assert three.num_samples == 3 and len(calib_warnings(caplog)) == 1  # img1b skipped, img2 taken instead
    assert three.fingerprint == calib.fingerprint


def test_many_unreadable_images_name_five_then_summarise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(8):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"")
    write_rgb(tmp_path / "good0.png", (1, 2, 3))
    write_rgb(tmp_path / "good1.png", (4, 5, 6))
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(tmp_path, RGB)
    warnings = calib_warnings(caplog)
    assert len(warnings) == 6
    assert all(f"bad{i}.jpg" in warnings[i] for i in range(5))
    assert "3 more unreadable images (8 in all)" in warnings[5] and "bad5" not in warnings[5]
    assert calib.num_samples == 2


def test_too_few_readable_images_fail_with_the_count(tmp_path: Path) -> None:
    write_rgb(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(CalibrationError, match=r"2 of 3 images are unreadable \(first: b\.png: ") as info:
        load_calibration(tmp_path, RGB)
    assert "1 readable left, need 2" in str(info.value)
    assert load_calibration(tmp_path, RGB, samples=1).num_samples == 1  # one asked for, one readable: enough
    single = tmp_path / "single"  # one readable image and nothing unreadable is still a (small) set
    single.mkdir()
    write_rgb(single / "only.png", (1, 2, 3))
    assert load_calibration(single, RGB).num_samples == 1


# ----------------------------------------------------------------------------- 2. npz key assumed


def test_npz_single_key_not_named_after_the_input_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    specs = [InputSpec("x", (1, 2), np.dtype(np.float32), (0,))]
    data = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.savez(tmp_path / "other.npz", features=data, labels=np.arange(3))
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(tmp_path / "other.npz", specs)
    (warning,) = calib_warnings(caplog)
    assert "'features'" in warning and "input 'x'" in warning and "other.npz" in warning
    np.testing.assert_array_equal(collect(calib, "x"), data)
    caplog.clear()
    np.savez(tmp_path / "named.npz", x=data)
    with caplog.at_level(logging.WARNING):
        load_calibration(tmp_path / "named.npz", specs)
    assert calib_warnings(caplog) == []


# ----------------------------------------------------------------------------- 3. grey / colour conversion


def test_grey_images_for_an_rgb_model_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_grey(tmp_path / "a_grey.png", 100)
    write_grey(tmp_path / "b_grey16.png", 50, "I;16")
    write_grey(tmp_path / "c_palette_grey.png", 30, "P")
    write_grey(tmp_path / "d_grey_alpha.png", 70, "LA")
    write_rgb(tmp_path / "e_rgb.png", (255, 0, 0))
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "f_palette_colour.png")
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(tmp_path, RGB, preprocess=Preprocess(scale=1.0))
    (warning,) = calib_warnings(caplog)
    assert "4 of 6 images" in warning and "a_grey.png" in warning and "replicated grey to RGB" in warning
    data = collect(calib, "x")
    np.testing.assert_array_equal(data[0, :, 0, 0], [100, 100, 100])
    np.testing.assert_array_equal(data[2, :, 0, 0], [30, 30, 30])
    np.testing.assert_array_equal(data[4, :, 0, 0], [255, 0, 0])


def test_colour_images_for_a_grey_model_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_grey(tmp_path / "a_grey.png", 100)
    write_rgb(tmp_path / "b_rgb.png", (200, 200, 200))
    write_rgb(tmp_path / "c_rgb.png", (0, 255, 0))
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(tmp_path, GREY, preprocess=Preprocess(scale=1.0))
    (warning,) = calib_warnings(caplog)
    assert "2 of 3 images" in warning and "b_rgb.png" in warning and "converted colour to grey" in warning
    data = collect(calib, "x")
    assert data.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(data[:2, 0, 0, 0], [100, 200])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_calibration(tmp_path, GREY, samples=1)  # only the grey image is used: nothing converted
        load_calibration(tmp_path, RGB, samples=2)
    assert len(calib_warnings(caplog)) == 1 and "1 of 2 images" in calib_warnings(caplog)[0]


# ----------------------------------------------------------------------------- 4. dynamic dims


def test_dynamic_dims_are_recorded_without_the_old_using_1_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        (only,) = input_specs(image_model(["N", 3, "H", "W"]))
    assert only == InputSpec("images", (1, 3, 1, 1), np.dtype(np.float32), (0, 2, 3))
    assert calib_warnings(caplog) == []
    (fixed,) = input_specs(image_model(["N", 3, "H", "W"]), {"images": (2, 3, 8, 8)})
    assert fixed.shape == (2, 3, 8, 8) and fixed.dynamic_axes == ()  # an --input-shape is binding


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_size_fills_dynamic_height_and_width(tmp_path: Path, layout: str) -> None:
    write_rgb(tmp_path / "a.png", (10, 20, 30), hw=(20, 30))
    write_rgb(tmp_path / "b.png", (40, 50, 60), hw=(7, 9))
    dims: list[int | str] = ["N", 3, "H", "W"] if layout == "NCHW" else ["N", "H", "W", 3]
    model = image_model(dims)
    specs = input_specs(model)
    calib = load_calibration(tmp_path, specs, preprocess=Preprocess(size=(5, 7), layout=layout))  # type: ignore[arg-type]
    sample = (3, 5, 7) if layout == "NCHW" else (5, 7, 3)
    assert calib.sample_shapes == {"images": sample}
    assert resolved_input_shapes(calib, specs) == {"images": (1, *sample)}
    batch = next(calib.iter_batches(2))["images"]
    assert batch.shape == (2, *sample)
    if layout == "NCHW":
        out = run(model, {"images": batch})
        assert out.shape == (2, 2, 5, 7)
        np.testing.assert_allclose(out[1, 1, 0, 0], (3 * 40 + 4 * 50 + 5 * 60) / 255, rtol=1e-5)


def test_dynamic_height_width_without_a_size_names_both_fixes(tmp_path: Path) -> None:
    write_rgb(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(UsageError) as info:
        load_calibration(tmp_path, input_specs(image_model(["N", 3, "H", "W"])))
    assert str(info.value) == "input 'images' has dynamic height/width: give --size HxW or --input-shape images:1x3xHxW"
    with pytest.raises(UsageError, match=r"--input-shape images:1xHxWx1$"):
        load_calibration(tmp_path, input_specs(image_model(["N", "H", "W", 1], channels=1)),
                         preprocess=Preprocess(layout="NHWC"))
    with pytest.raises(UsageError, match=r"does not match input 'images' of shape \(N, 3, 8, \?\)"):  # H is static
        load_calibration(tmp_path, input_specs(image_model(["N", 3, 8, "W"])), preprocess=Preprocess(size=(6, 6)))
    only_w = load_calibration(tmp_path, input_specs(image_model(["N", 3, 8, "W"])), preprocess=Preprocess(size=(8, 5)))
    assert only_w.sample_shapes == {"images": (3, 8, 5)}
    with pytest.raises(UsageError, match=r"of shape \(N, 3, 8, 8\) \(NCHW\); give --size 8x8 or leave it out"):
        load_calibration(tmp_path, input_specs(image_model(["N", 3, "H", "W"]), {"images": (1, 3, 8, 8)}),
                         preprocess=Preprocess(size=(6, 6)))  # --input-shape fixes H/W


def test_arrays_keep_their_size_on_dynamic_axes(tmp_path: Path) -> None:
    model = image_model(["N", 3, "H", "W"])
    specs = input_specs(model)
    data = np.random.default_rng(0).standard_normal((4, 3, 10, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=data)
    np.save(tmp_path / "d.npy", data)
    for path in ("d.npz", "d.npy"):
        calib = load_calibration(tmp_path / path, specs)
        assert calib.sample_shapes == {"images": (3, 10, 12)}
        assert resolved_input_shapes(calib, specs) == {"images": (1, 3, 10, 12)}
        assert run(model, next(calib.iter_batches(4))).shape == (4, 2, 10, 12)
    static_batch = [InputSpec("images", (2, 3, 1, 1), np.dtype(np.float32), (2, 3))]
    assert resolved_input_shapes(load_calibration(tmp_path / "d.npy", static_batch), static_batch) == {
        "images": (2, 3, 10, 12)
    }
    # samples of different sizes cannot share an array: a ragged (object) array is refused
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((3, 4, 4), np.float32), np.zeros((3, 5, 5), np.float32)
    np.savez(tmp_path / "ragged.npz", images=ragged)
    with pytest.raises(CalibrationError, match="ragged.npz"):
        load_calibration(tmp_path / "ragged.npz", specs)


def test_random_source_needs_every_non_batch_dim(caplog: pytest.LogCaptureFixture) -> None:
    dynamic = input_specs(image_model(["N", 3, "H", "W"]))
    with pytest.raises(UsageError, match=r"axes 2, 3.*--input-shape images:1x3x\?x\?"):
        load_calibration("random", dynamic)
    fixed = input_specs(image_model(["N", 3, "H", "W"]), {"images": (1, 3, 6, 5)})
    with caplog.at_level(logging.WARNING):
        calib = load_calibration("random", fixed, samples=2)
    assert calib.sample_shapes == {"images": (3, 6, 5)}
    assert resolved_input_shapes(calib, fixed) == {"images": (1, 3, 6, 5)}


# ----------------------------------------------------------------------------- 5. resolved_input_shapes


def test_resolved_input_shapes_multi_input_and_mismatch(tmp_path: Path) -> None:
    specs = [InputSpec("a", (1, 1), np.dtype(np.float32), (0, 1)), InputSpec("b", (1, 2), np.dtype(np.int64), (0,))]
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 7), np.float32), b=np.zeros((3, 2), np.int64))
    calib = load_calibration(tmp_path / "d.npz", specs)
    assert resolved_input_shapes(calib, specs) == {"a": (1, 7), "b": (1, 2)}
    with pytest.raises(CalibrationError, match="input 'c'"):
        resolved_input_shapes(calib, [*specs, InputSpec("c", (1, 2), np.dtype(np.float32), (0,))])
