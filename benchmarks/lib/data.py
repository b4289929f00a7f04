"""The benchmarks' shared loaders: Fashion-MNIST arrays, image folders, text .npz files, zoo models.

Fashion-MNIST (IDX files, gzip) and a calibration .npz writer.

IDX layout: 4 bytes of magic (bytes 0-1 zero, byte 2 the element type, byte 3 the number of
dimensions), one big-endian uint32 per dimension, then the data (uint8 here). Images become
float32 ``pixels / 255`` shaped ``[N, 1, 28, 28]``, the input every ../shared model expects
(each normalises inside its graph); labels become int64 ``[N]``.

Image folders (``image_batches``) are preprocessed here, written from the model's card, not by the tool's
code; text data (``npz_batches``) are the tokenised arrays of ../shared/data/text; zoo models
(``zoo_model``, ``fill_zoo``) are the zoo's graphs filled with seeded random weights by its fill.py.

    from lib.data import load_split, write_calibration
    images, labels = load_split("test")                 # 10,000 test images
    write_calibration("/tmp/fmnist_train2000.npz", 2000)  # first 2,000 TRAIN images, once
"""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from .paths import FASHION_MNIST, FILLED, ZOO

log = logging.getLogger(__name__)

DATA = FASHION_MNIST
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UINT8 = 0x08


def read_idx(path: Path) -> np.ndarray:
    """One IDX array (uint8 only, as Fashion-MNIST ships)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    if raw[2] != _UINT8:
        raise ValueError(f"{path}: element type 0x{raw[2]:02x} is not uint8")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for dims {dims}")
    return data.reshape(dims)


def load_split(split: Literal["train", "test"], limit: int | None = None, root: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, 1, 28, 28] in [0, 1], labels int64 [N])`` of one split."""
    image_file, label_file = FILES[split]
    images = read_idx(root / image_file)
    labels = read_idx(root / label_file)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)


def write_calibration(path: str | Path, count: int = 2000, split: Literal["train", "test"] = "train") -> Path:
    """Write the first `count` images of `split` as an .npz (`input`, `labels`) unless it exists."""
    target = Path(path)
    if not target.exists():
        x, y = load_split(split, count)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, input=x, labels=y)
        log.info("wrote %s (%d %s images)", target, len(x), split)
    return target


def search_split(work: Path) -> tuple[Path, Path]:
    """The search benchmarks' data: calibration TRAIN[:2000] and --eval TRAIN[2000:4000] (`input`, `labels`)."""
    work.mkdir(parents=True, exist_ok=True)
    calib, evaluation = work / "fmnist_train2000.npz", work / "fmnist_train2000_4000.npz"
    if not calib.exists() or not evaluation.exists():
        x, y = load_split("train", 4000)
        np.savez(calib, input=x[:2000], labels=y[:2000])
        np.savez(evaluation, input=x[2000:], labels=y[2000:])
    return calib, evaluation


# --- image folders -------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The images of `folder` (jpg, jpeg, png), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]


def image_batches(
    folder: Path, size: int, mean: float = 0.5, std: float = 0.5, batch: int = 50, limit: int | None = None,
    input_name: str = "input",
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of `folder`'s images: RGB, bilinear resize to `size` x `size`, ``(pixels / 255 - mean) / std``, NCHW
    float32, `batch` images at a time (EfficientNet-Lite1: size 240, mean 0.5, std 0.5)."""
    from PIL import Image

    files = image_files(folder, limit)
    for start in range(0, len(files), batch):
        arrays = []
        for path in files[start:start + batch]:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.float32) / 255.0
            arrays.append(((pixels - mean) / std).transpose(2, 0, 1))
        yield {input_name: np.stack(arrays).astype(np.float32)}


# --- text .npz -----------------------------------------------------------------------------------------------------


def npz_batches(path: Path, batch: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of an .npz of arrays named after the model's inputs (``input_ids``, ``attention_mask``, ...)."""
    with np.load(path) as data:
        arrays = {k: data[k][:limit] for k in data.files}
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch):
        yield {k: v[start:start + batch] for k, v in arrays.items()}


# --- zoo models ----------------------------------------------------------------------------------------------------


def zoo_model(name: str, zoo: Path = ZOO, filled: Path = FILLED) -> Path:
    """`filled`/NAME.onnx: the zoo's graph NAME with seeded random weights (seed 0), filled once by the zoo's fill.py."""
    path = filled / f"{name}.onnx"
    if not path.exists():
        filled.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(zoo / "fill.py"), str(zoo / f"{name}.onnx"), str(path), "--seed", "0"], check=True)
    return path


def fill_zoo(zoo: Path = ZOO, filled: Path = FILLED) -> None:
    """Every model of `zoo` filled into `filled` (those already there are kept)."""
    for src in sorted(zoo.glob("*.onnx")):
        zoo_model(src.stem, zoo, filled)
