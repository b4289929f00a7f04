"""Image decoding and normalisation for image-folder calibration sources.

For each pixel value ``p`` (0..255) of channel ``c``::

    out = (p * scale - mean[c]) / std[c]

after resizing to ``size`` (``"stretch"``: resize both sides; ``"shorter"``: scale so the image
covers ``size`` then center-crop). Channels are reordered to BGR on request and laid out as
CHW (``"NCHW"``) or HWC (``"NHWC"``). Grayscale (``"L"``) or colour (``"RGB"``) decoding is
chosen from the model input's channel count (1 or 3); ``scan_images`` reports which files are
grey so the source can say when grey is replicated to RGB or colour reduced to grey. Integer
model inputs (e.g. uint8) get the raw resized pixels without scale/mean/std.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import CalibrationError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Preprocess:
    """How image files become model input tensors (see module docstring for the formula)."""

    size: tuple[int, int] | None = None
    resize: Literal["stretch", "shorter"] = "stretch"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channel_order: Literal["RGB", "BGR"] = "RGB"

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "shorter"):
            raise UsageError(f"resize mode must be 'stretch' or 'shorter', got {self.resize!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise UsageError(f"layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise UsageError(f"channel order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise UsageError(f"image size must be (H, W) with positive values, got {self.size!r}")
        if not self.mean or not self.std or any(s == 0 for s in self.std):
            raise UsageError("mean and std need at least one value each and std must be non-zero")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.scale)) or self.scale == 0:
            raise UsageError("--scale, --mean and --std must be finite numbers, and --scale non-zero")

    def channel_axis(self) -> int:
        """Axis of the channel dimension in a batched tensor."""
        return 1 if self.layout == "NCHW" else 3

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std broadcast to ``channels`` values (length 1 or ``channels`` accepted)."""
        out = []
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise UsageError(f"{label} has {len(values)} values, the model input has {channels} channel(s)")
            out.append(np.broadcast_to(np.asarray(values, np.float64), (channels,)))
        return out[0], out[1]


def image_files(folder: Path) -> list[Path]:
    """JPEG/PNG files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationError(
            "reading an image folder needs Pillow: pip install onnxslim-prune[images]"
        ) from None
    return Image


@dataclass(frozen=True)
class ImageHeader:
    """What the header of one readable image says, read without decoding the pixels."""

    path: Path
    mode: str  # Pillow mode: "RGB", "L", "P", "I;16", ...
    grey: bool  # no colour information (grey modes, or a palette whose entries are all grey)


# Pillow modes that carry no colour; "I;16*" variants are matched by prefix.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


def error_reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (Pillow's type names alone say little)."""
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) > 200:
        line = line[:197] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _palette_is_grey(img: Any) -> bool:
    """True if every palette entry has R == G == B; unknown palettes count as colour."""
    palette = getattr(img, "palette", None)
    mode = getattr(palette, "rawmode", None) or getattr(palette, "mode", None)
    data = getattr(palette, "palette", None)
    if mode not in ("RGB", "RGBA") or not isinstance(data, bytes | bytearray) or not data:
        return False
    stride = len(mode)
    entries = np.frombuffer(bytes(data[: len(data) // stride * stride]), np.uint8).reshape(-1, stride)
    return bool(np.all(entries[:, 0] == entries[:, 1]) and np.all(entries[:, 1] == entries[:, 2]))


def _is_grey(img: Any) -> bool:
    mode = str(img.mode)
    if mode in _GREY_MODES or mode.startswith("I;16"):
        return True
    return mode in ("P", "PA") and _palette_is_grey(img)


def _read_header(image_module: Any, path: Path) -> ImageHeader:
    with image_module.open(path) as img:
        img.size  # noqa: B018 - forces the header to be parsed
        return ImageHeader(path, str(img.mode), _is_grey(img))


def _check_decodes(image_module: Any, path: Path) -> None:
    """Decode every byte of the image, so a truncated or corrupt body fails here (and is skipped) like a bad header.

    A JPEG is decoded at its smallest draft scale (1/8), which still reads the whole entropy-coded body;
    Pillow's LOAD_TRUNCATED_IMAGES is left as it is (off by default): a truncated file raises.
    """
    with image_module.open(path) as img:
        img.draft(None, (1, 1))  # a no-op for formats without draft decoding
        img.load()


def check_image(path: Path) -> ImageHeader:
    """Cheap header check (no full decode) so obviously broken files fail at load time."""
    image_module = _pil_image()
    try:
        return _read_header(image_module, path)
    except Exception as exc:  # Pillow raises several unrelated types
        raise CalibrationError(f"cannot read image {path}: {error_reason(exc)}") from None


def scan_images(files: Sequence[Path], wanted: int) -> tuple[list[ImageHeader], list[tuple[Path, str]]]:
    """Headers of the first ``wanted`` readable files, and (file, reason) for each unreadable one seen.

    Readable means decodable to the end: a file whose header parses but whose pixels are truncated
    is unreadable. Files after the ``wanted``-th readable one are not opened: they are not used.
    """
    image_module = _pil_image()  # a missing Pillow is fatal, not a per-file problem
    readable: list[ImageHeader] = []
    unreadable: list[tuple[Path, str]] = []
    for path in files:
        if len(readable) >= wanted:
            break
        try:
            header = _read_header(image_module, path)
            _check_decodes(image_module, path)
            readable.append(header)
        except Exception as exc:  # Pillow raises several unrelated types
            unreadable.append((path, error_reason(exc)))
    return readable, unreadable


def _resized(img: Any, size: tuple[int, int], mode: str) -> Any:
    Image = _pil_image()
    height, width = size
    if mode == "stretch":
        return img.resize((width, height), Image.Resampling.BILINEAR)
    factor = max(height / img.height, width / img.width)
    new_w, new_h = max(width, round(img.width * factor)), max(height, round(img.height * factor))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def load_image(
    path: str | os.PathLike[str], pre: Preprocess, size: tuple[int, int], channels: int, dtype: np.dtype
) -> np.ndarray:
    """Decode one image into a single sample (CHW or HWC) of ``dtype``."""
    Image = _pil_image()
    try:
        with Image.open(path) as img:
            img.load()  # decoding fails here, inside the try, not lazily in a later call
            img = _resized(img.convert("L" if channels == 1 else "RGB"), size, pre.resize)
            pixels = np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], channels)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"cannot read image {path}: {error_reason(exc)}") from None
    if pre.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    if np.issubdtype(dtype, np.floating):
        mean, std = pre.per_channel(channels)
        values: np.ndarray = (pixels.astype(np.float64) * pre.scale - mean) / std
    else:
        values = pixels
    if pre.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values, dtype=dtype)
