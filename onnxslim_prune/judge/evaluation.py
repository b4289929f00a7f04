"""Evaluation data (``--eval``) and top-1 accuracy of a classifier.

An ``.npz`` holds the model's single input under its name (or ``images`` / ``x``) and, optionally,
``labels``: one non-negative integer class per sample. Without labels the data still gives a
held-out verdict (agreement with the original: the ``--min-top1-agreement`` / ``--min-correlation``
gates), but no accuracy (``--max-drop`` needs labels). The images are checked like
calibration arrays (shape against the model input, a dtype that casts safely, finite
values) and the labels against the images and, once the model has run, against its
number of classes: every bad file is one clear error naming it.

    accuracy = mean(argmax(model(x_i)) == label_i)

Output error (`output_error`, `OutputError`): how far a candidate's outputs are from the original's on a few
fixed batches (`evaluation_feeds`), the fitness the searches (layer-compensated pruning, block pruning) minimise.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .. import ir
from . import validate
from ..calib.arrays import check_cast, check_finite, check_shape, pickled_error
from ..calib.specs import input_specs
from ..errors import CalibrationError, UsageError

IMAGE_KEYS = ("images", "x")
BATCH = 256
#: weight of the KL divergence next to the top-1 disagreement in `output_error`
KL_WEIGHT = 0.1


@dataclass(frozen=True, eq=False)
class EvalData:
    input_name: str
    images: np.ndarray
    labels: np.ndarray | None  # int64 [N]; None: unlabelled (agreement, no accuracy)

    @property
    def count(self) -> int:
        return len(self.images)


def load_eval(
    path: str | os.PathLike[str], model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> EvalData:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such evaluation file")
    specs = input_specs(model, input_shapes)
    if len(specs) != 1:
        raise UsageError(f"--eval takes a single-input model; the model has inputs {', '.join(s.name for s in specs)} "
                         "(give the samples as --calib: its held-out part is the verdict)")
    spec = specs[0]
    if not zipfile.is_zipfile(p):
        raise CalibrationError(f"{p}: --eval takes an .npz with arrays {spec.name!r} (or 'images') and optional 'labels'")
    try:
        with np.load(p, allow_pickle=False) as data:
            key = next((k for k in (spec.name, *IMAGE_KEYS) if k in data.files), None)
            if key is None:
                raise CalibrationError(f"{p}: needs an array {spec.name!r} (or 'images'), and 'labels' for accuracy; "
                                       f"found {data.files}")
            labels = data["labels"] if "labels" in data.files else None
            # mapped from the file when stored uncompressed (np.savez): the images are read batch by batch
            mapped = _mapped(p, key)
            images = data[key] if mapped is None else mapped
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise pickled_error(p) or CalibrationError(f"{p}: cannot read evaluation data: {type(exc).__name__}") from None
    where = f"{p}: '{key}'"
    check_shape(images, spec, where)
    check_cast(images, spec.dtype, where)
    check_finite(images, where)
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            raise CalibrationError(
                f"{p}: 'labels' must be {len(images)} integer class indices (shape ({len(images)},)); "
                f"got dtype {labels.dtype}, shape {labels.shape}"
            )
        if len(labels) and int(labels.min()) < 0:
            raise CalibrationError(f"{p}: 'labels' has negative class indices")
    release_pages(images)  # the checks read every page
    if images.dtype != spec.dtype:
        images = np.asarray(images, dtype=spec.dtype)
    return EvalData(spec.name, images, None if labels is None else labels.astype(np.int64))


def _mapped(path: Path, key: str) -> np.ndarray | None:
    """Array `key` of the .npz at `path` mapped read-only from the file, if stored uncompressed; else None.

    ``np.load`` of an .npz reads the whole array: 600 images at 240x240 are 415 MB held for the
    run. A stored (uncompressed) member is a plain .npy at an offset of the file, so it is mapped
    instead; `release_pages` drops the pages a batch read from the resident set.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with path.open("rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle)
            offset = handle.tell()
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None
    if fortran or dtype.hasobject or int(np.prod(shape, dtype=np.int64)) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a file-mapped array (`_mapped`) from the resident set; they are read again when used."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def eval_feeds(evaluation: EvalData, model: onnx.ModelProto) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Batches of the evaluation images the model accepts, and the labels they cover (None: unlabelled).

    A model with a fixed batch size runs in batches of that size (a remainder that cannot
    fill one is left out of the count); otherwise in batches of `BATCH`.
    """
    static = ir.static_batch(model)
    batch = static or BATCH
    count = evaluation.count
    usable = count - count % batch if static else count
    if usable == 0:
        raise CalibrationError(f"the model needs batches of {batch}; the evaluation data has {count} samples")
    feeds = [{evaluation.input_name: evaluation.images[start : min(start + batch, usable)]} for start in range(0, usable, batch)]
    return feeds, None if evaluation.labels is None else evaluation.labels[:usable]


def accuracy_of(runs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output of each run ([N, classes]) against `labels`."""
    return accuracy_from(correct_of(runs, labels))


def accuracy_from(correct: np.ndarray) -> float:
    """The share of True in per-sample outcomes (`correct_of`); 0 for no samples."""
    return float(correct.mean()) if correct.size else 0.0


def correct_of(runs: list[list[np.ndarray]], labels: np.ndarray) -> np.ndarray:
    """Per sample, whether the first output's argmax ([N, classes]) is its label (bool, in sample order)."""
    hits = []
    start = 0
    for outputs in runs:
        logits = outputs[0]
        if logits.ndim != 2:
            raise UsageError(f"--eval needs a classifier whose first output is [N, classes]; it has shape {logits.shape}")
        chunk = labels[start : start + len(logits)]
        if int(chunk.max(initial=0)) >= logits.shape[1]:
            raise CalibrationError(f"evaluation labels go up to {int(chunk.max())}, the model has {logits.shape[1]} classes")
        hits.append(np.argmax(logits, axis=1) == chunk)
        start += len(logits)
    return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray, input_name: str) -> float:
    """Top-1 accuracy of a classifier whose first output is [N, classes] (batches as `eval_feeds`)."""
    from .validate import outputs_of

    feeds, used = eval_feeds(EvalData(input_name, images, labels), model)
    assert used is not None
    return accuracy_of(outputs_of(model, feeds), used)


def output_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Mean over float outputs of the error of `outputs` against `reference` (0: identical).

    A classifier's [N, C>1] output: the top-1 disagreement with the reference plus
    ``KL_WEIGHT * KL(softmax(y0) || softmax(y))`` (the KL term orders candidates that flip no
    prediction; alone it would reward a collapsed model for flat, uninformed outputs).
    Any other output: the relative squared error ``|y - y0|^2 / |y0|^2``.
    """
    errors: list[float] = []
    for y0, y in zip(reference, outputs):
        if not np.issubdtype(y0.dtype, np.floating):
            continue
        a, b = y0.astype(np.float64), y.astype(np.float64)
        if a.ndim == 2 and a.shape[1] > 1:
            la = a - a.max(axis=1, keepdims=True)
            la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
            lb = b - b.max(axis=1, keepdims=True)
            lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
            kl = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=1)))
            flips = float(np.mean(np.argmax(a, axis=1) != np.argmax(b, axis=1)))
            errors.append(flips + KL_WEIGHT * kl)
        else:
            denom = float(np.sum(a * a))
            errors.append(float(np.sum((a - b) ** 2) / denom) if denom > 0 else float(np.sum((a - b) ** 2)))
    return float(np.mean(errors)) if errors else 0.0


def evaluation_feeds(
    model: onnx.ModelProto,
    calibration: object,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    samples: int,
    batch_size: int,
    seed: int,
) -> tuple[list[dict[str, np.ndarray]], bool]:
    """A few batches to compare models on: calibration data, or seeded random inputs.

    Returns the feeds and whether they are random (data-free). A model with a static
    batch dimension gets batches of exactly that size.
    """
    static = ir.static_batch(model)
    size = static or max(1, min(batch_size, samples))
    feeds: list[dict[str, np.ndarray]] = []
    if calibration is not None and not getattr(calibration, "is_random", False):
        taken = 0
        for batch in calibration.iter_batches(size, drop_last=static is not None):  # type: ignore[attr-defined]
            feeds.append(batch)
            taken += len(next(iter(batch.values())))
            if taken >= samples:
                break
        if feeds:
            return feeds, False
    count = max(1, math.ceil(min(samples, 64) / size))
    shapes = {name: (size, *shape[1:]) if shape else shape for name, shape in input_shapes.items()}
    for i in range(count):
        feeds.append(validate.random_inputs(model, shapes, seed + i))
    return feeds, True


class OutputError:
    """Output error of candidate models against the original on fixed feeds."""

    def __init__(self, original: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        sess = validate.session(original)
        self.reference = [sess.run(None, feed) for feed in feeds]

    def __call__(self, model: onnx.ModelProto) -> float:
        sess = validate.session(model)
        errors = [output_error(ref, sess.run(None, feed)) for ref, feed in zip(self.reference, self.feeds)]
        return float(np.mean(errors))
