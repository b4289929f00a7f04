"""Calibration sources: ``.npz``, ``.npy``, an image folder, or ``"random"``.

Every source becomes a ``CalibrationSet`` that yields ``{input name: batch}`` dicts in the
model's dtypes, in a fixed sample order, lazily batch by batch. ``fingerprint`` is a sha256
over the data actually used (array bytes after the ``samples`` limit, image file bytes plus
the preprocessing, or the random seed and shapes) so statistics can be cached on it.

``sample_shapes`` is the real per-sample shape of the data, dynamic axes included: arrays keep
their own size there, image folders use ``Preprocess.size``. ``resolved_input_shapes`` turns it
into the full shape to trace the model with. Unreadable images in a folder are skipped with a
warning (and left out of the fingerprint); the random source needs every non-batch dim fixed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, UsageError
from .arrays import expected_shape, fingerprint_arrays, load_npy, load_npz
from .preprocess import ImageHeader, Preprocess, image_files, load_image, scan_images
from .specs import InputSpec, input_specs, parse_input_shape

__all__ = [
    "DEFAULT_RANDOM_SAMPLES",
    "CalibrationSet",
    "InputSpec",
    "Preprocess",
    "input_specs",
    "load_calibration",
    "parse_input_shape",
    "resolved_input_shapes",
]

log = logging.getLogger(__name__)

DEFAULT_RANDOM_SAMPLES = 32
MIN_READABLE_IMAGES = 2  # with unreadable files in the folder, fewer than this is not a calibration set
MAX_NAMED_UNREADABLE = 5  # more unreadable files than this are summarised in one line
Reader = Callable[[int, int], dict[str, np.ndarray]]


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """A fixed, ordered set of calibration samples for every model input."""

    names: tuple[str, ...]
    num_samples: int
    fingerprint: str
    source: str
    sample_shapes: Mapping[str, tuple[int, ...]]
    _read: Reader = field(repr=False)
    is_random: bool = False
    labels: np.ndarray | None = field(default=None, repr=False)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches ``iter_batches`` yields."""
        _check_batch_size(batch_size)
        full, rest = divmod(self.num_samples, batch_size)
        return full + (1 if rest and not drop_last else 0)

    def iter_batches(self, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` samples (the last may be smaller unless ``drop_last``)."""
        _check_batch_size(batch_size)
        for start in range(0, self.num_samples, batch_size):
            stop = min(start + batch_size, self.num_samples)
            if drop_last and stop - start < batch_size:
                return
            yield self._read(start, stop)


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")


def _limit(available: int, samples: int | None, where: str) -> int:
    if available == 0:
        raise CalibrationError(f"{where}: no samples")
    if samples is not None and samples > available:
        log.info("%s has %d samples, fewer than the %d requested; using all", where, available, samples)
    return available if samples is None else min(samples, available)


def _array_set(
    path: Path, arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec], samples: int | None,
    labels: np.ndarray | None = None,
) -> CalibrationSet:
    count = _limit(next(iter(arrays.values())).shape[0], samples, str(path))
    dtypes = {spec.name: spec.dtype for spec in inputs}
    if any(arr.dtype == np.uint8 and dtypes[name].kind == "f" for name, arr in arrays.items()):
        log.warning("%s: uint8 arrays are fed to a float model as 0..255 without normalisation", path)

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(arr[start:stop], dtype=dtypes[name]) for name, arr in arrays.items()}

    return CalibrationSet(
        names=tuple(arrays), num_samples=count, fingerprint=fingerprint_arrays(arrays, inputs, count),
        source=str(path), sample_shapes={n: tuple(a.shape[1:]) for n, a in arrays.items()}, _read=read,
        labels=None if labels is None else labels[:count],
    )


def resolved_input_shapes(calib: CalibrationSet, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Full shape to trace each input with: its batch dim, then the calibration's per-sample shape.

    The batch dim is the spec's (1 when the model leaves it dynamic); every other dim comes from
    the data actually loaded, so a dynamic height, width or length gets the calibration's size
    rather than a placeholder. Raises ``CalibrationError`` if ``calib`` has no data for an input
    or data of another rank (it was loaded for other specs).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        sample = calib.sample_shapes.get(spec.name)
        if sample is None or len(sample) != len(spec.shape) - 1:
            raise CalibrationError(
                f"{calib.source}: no samples of rank {len(spec.shape) - 1} for input '{spec.name}' "
                f"(calibration inputs: {', '.join(calib.names) or '(none)'})"
            )
        batch = 1 if 0 in spec.dynamic_axes else spec.shape[0]
        shapes[spec.name] = (batch, *sample)
    return shapes


def _random_set(inputs: Sequence[InputSpec], samples: int | None, seed: int) -> CalibrationSet:
    for spec in inputs:  # random data has no size of its own; tracing at the placeholder 1 is wrong
        axes = [a for a in spec.dynamic_axes if a > 0]
        if axes:
            dims = "x".join("?" if a in axes else str(d) for a, d in enumerate(spec.shape))
            raise UsageError(
                f"input '{spec.name}' has dynamic dims at axes {', '.join(map(str, axes))}: random calibration "
                f"needs their sizes; give --input-shape {spec.name}:{dims} with real sizes, or real --calib data"
            )
    log.warning("calibrating on random inputs: statistics do not reflect real data; accuracy results are meaningless")
    count = DEFAULT_RANDOM_SAMPLES if samples is None else samples

    def sample(index: int, spec_index: int, spec: InputSpec) -> np.ndarray:
        if spec.dtype.kind not in "fc":
            return np.zeros(spec.sample_shape, spec.dtype)
        rng = np.random.default_rng([seed, spec_index, index])
        return rng.standard_normal(spec.sample_shape).astype(spec.dtype)

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        return {
            spec.name: np.stack([sample(i, k, spec) for i in range(start, stop)])
            for k, spec in enumerate(inputs)
        }

    digest = hashlib.sha256(f"random-v1\0{seed}\0{count}".encode())
    for spec in inputs:
        digest.update(f"\0{spec.name}\0{spec.sample_shape}\0{spec.dtype.str}".encode())
    return CalibrationSet(
        names=tuple(s.name for s in inputs), num_samples=count, fingerprint=digest.hexdigest(),
        source="random", sample_shapes={s.name: s.sample_shape for s in inputs}, _read=read, is_random=True,
    )


def _image_geometry(folder: Path, spec: InputSpec, pre: Preprocess) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of the samples to produce for a rank-4 image input.

    A dynamic H or W takes ``pre.size``; a static one must equal it. Without a size, dynamic H/W
    is a usage error: the placeholder 1 in ``spec.shape`` is not an image size.
    """
    if len(spec.shape) != 4:
        raise CalibrationError(f"{folder}: images need a rank-4 input, '{spec.name}' has shape {spec.shape}")
    c_axis = pre.channel_axis()
    hw_axes = (2, 3) if pre.layout == "NCHW" else (1, 2)
    channels = 3 if c_axis in spec.dynamic_axes else spec.shape[c_axis]
    if channels not in (1, 3):
        raise CalibrationError(
            f"{folder}: input '{spec.name}' {spec.shape} has {channels} channels on axis {c_axis} "
            f"({pre.layout}); expected 1 or 3 (check the layout)"
        )
    model_hw = tuple(None if a in spec.dynamic_axes else spec.shape[a] for a in hw_axes)
    if pre.size is None:
        if None in model_hw:
            example = f"1x{channels}xHxW" if pre.layout == "NCHW" else f"1xHxWx{channels}"
            raise UsageError(
                f"input '{spec.name}' has dynamic height/width: give --size HxW or --input-shape {spec.name}:{example}"
            )
        return channels, (int(spec.shape[hw_axes[0]]), int(spec.shape[hw_axes[1]]))
    for want, got in zip(model_hw, pre.size):
        if want is not None and want != got:
            fix = "change --size" if None in model_hw else f"give --size {model_hw[0]}x{model_hw[1]} or leave it out"
            raise UsageError(
                f"image size {pre.size} does not match input '{spec.name}' of shape {expected_shape(spec)} "
                f"({pre.layout}); {fix}"
            )
    return channels, (int(pre.size[0]), int(pre.size[1]))


def _readable_images(folder: Path, files: Sequence[Path], samples: int | None) -> list[ImageHeader]:
    """Headers of the images to use: unreadable files are skipped with a warning each."""
    wanted = len(files) if samples is None else samples
    readable, unreadable = scan_images(files, wanted)
    for path, reason in unreadable[:MAX_NAMED_UNREADABLE]:
        log.warning("%s: skipping unreadable image %s: %s", folder, path.name, reason)
    if len(unreadable) > MAX_NAMED_UNREADABLE:
        log.warning("%s: skipped %d more unreadable images (%d in all)", folder,
                    len(unreadable) - MAX_NAMED_UNREADABLE, len(unreadable))
    need = min(MIN_READABLE_IMAGES, wanted)  # asking for one sample makes one enough
    if unreadable and len(readable) < need:
        first, reason = unreadable[0]
        raise CalibrationError(
            f"{folder}: {len(unreadable)} of {len(readable) + len(unreadable)} images are unreadable "
            f"(first: {first.name}: {reason}); {len(readable)} readable left, need {need}"
        )
    if samples is not None and len(readable) < samples:
        log.info("%s has %d readable images, fewer than the %d requested; using all", folder, len(readable), samples)
    return readable


def _warn_colour_conversion(folder: Path, headers: Sequence[ImageHeader], spec: InputSpec, channels: int) -> None:
    """One warning per set when decoding changes the images' colour model (never per image)."""
    if channels == 3:
        converted = [h for h in headers if h.grey]
        kind, assumed = "greyscale", "replicated grey to RGB"
    else:
        converted = [h for h in headers if not h.grey]
        kind, assumed = "colour", "converted colour to grey"
    if converted:
        first = converted[0]
        log.warning(
            "%s: %d of %d images are %s but input '%s' has %d channel(s) (e.g. %s, mode %s): %s",
            folder, len(converted), len(headers), kind, spec.name, channels, first.path.name, first.mode, assumed,
        )


def _hash_files(files: Sequence[Path], header: str) -> str:
    digest = hashlib.sha256(header.encode())
    for path in files:
        digest.update(f"\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _image_set(
    folder: Path, inputs: Sequence[InputSpec], samples: int | None, pre: Preprocess
) -> CalibrationSet:
    if len(inputs) != 1:
        raise CalibrationError(f"{folder}: image folders feed single-input models; this model has {len(inputs)}")
    spec = inputs[0]
    channels, size = _image_geometry(folder, spec, pre)
    pre.per_channel(channels)  # mean/std lengths are checked before any image is decoded
    listed = image_files(folder)
    if not listed:
        raise CalibrationError(f"{folder}: no JPEG/PNG images in the folder")
    headers = _readable_images(folder, listed, samples)
    _warn_colour_conversion(folder, headers, spec, channels)
    files = [h.path for h in headers]  # exactly the images used: read and fingerprinted
    shape = (channels, *size) if pre.layout == "NCHW" else (*size, channels)

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        batch = [load_image(p, pre, size, channels, spec.dtype) for p in files[start:stop]]
        return {spec.name: np.stack(batch)}

    header = f"images-v1\0{pre!r}\0{shape}\0{spec.dtype.str}\0{spec.name}"
    return CalibrationSet(
        names=(spec.name,), num_samples=len(files), fingerprint=_hash_files(files, header),
        source=str(folder), sample_shapes={spec.name: shape}, _read=read,
    )


def load_calibration(
    spec: str | os.PathLike[str],
    inputs: Sequence[InputSpec],
    *,
    samples: int | None = None,
    seed: int = 0,
    preprocess: Preprocess | None = None,
) -> CalibrationSet:
    """Open a calibration source for a model with the given inputs (see module docstring)."""
    if not inputs:
        raise CalibrationError("the model has no runtime inputs to calibrate")
    if samples is not None and samples <= 0:
        raise UsageError(f"number of calibration samples must be positive, got {samples}")
    if isinstance(spec, str) and spec == "random":
        return _random_set(inputs, samples, seed)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"{path}: no such calibration file or folder")
    if path.is_dir():
        return _image_set(path, inputs, samples, preprocess or Preprocess())
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays, labels = load_npz(path, inputs)
        return _array_set(path, arrays, inputs, samples, labels)
    if suffix == ".npy":
        return _array_set(path, load_npy(path, inputs), inputs, samples)
    raise CalibrationError(f"{path}: unsupported calibration data; expected .npz, .npy, an image folder or 'random'")
