"""Array sources (``.npz`` / ``.npy``): key matching, shape checks and cast rules.

A data array for input ``x`` must have ``rank(x)`` dims, any batch size on axis 0 and the
model's size on every other static axis. Casting to the model dtype is allowed when it loses
no kind information: any safe cast, float to float (float64 -> float32), bool/int to float
(uint8 images -> float32) and int to a narrower int when every value fits.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError
from .specs import InputSpec

LABELS_KEY = "labels"
_HASH_CHUNK_BYTES = 1 << 24

log = logging.getLogger(__name__)


def expected_shape(spec: InputSpec) -> str:
    """Human form of the accepted shape: ``(N, 3, 224, 224)`` with ``?`` for dynamic axes."""
    dims = ["N"] + ["?" if i in spec.dynamic_axes else str(d) for i, d in enumerate(spec.shape) if i > 0]
    return "(" + ", ".join(dims) + ")"


def check_shape(arr: np.ndarray, spec: InputSpec, where: str) -> None:
    """Rank and non-batch dims must match the model input."""
    bad = arr.ndim != len(spec.shape) or any(
        got != want for i, (got, want) in enumerate(zip(arr.shape, spec.shape)) if i > 0 and i not in spec.dynamic_axes
    )
    if bad:
        raise CalibrationError(
            f"{where} has shape {tuple(arr.shape)}, expected {expected_shape(spec)} for input '{spec.name}'"
        )


def check_cast(arr: np.ndarray, dtype: np.dtype, where: str) -> None:
    """Raise unless ``arr`` can be cast to ``dtype`` without changing what the values mean."""
    src, dst = arr.dtype, np.dtype(dtype)
    if np.can_cast(src, dst, "safe"):
        return
    if dst.kind == "f" and src.kind in "fiub":
        return
    if dst.kind in "iu" and src.kind in "iub":
        info = np.iinfo(dst)
        if arr.size == 0 or (int(arr.min()) >= info.min and int(arr.max()) <= info.max):
            return
        raise CalibrationError(f"{where} has values outside the range of {dst} required by the model")
    raise CalibrationError(f"{where} has dtype {src}, which cannot be cast safely to the model's {dst}")


def check_finite(arr: np.ndarray, where: str) -> None:
    """Raise if a floating array holds NaN or infinity (statistics from it would be NaN)."""
    if arr.dtype.kind not in "fc":
        return
    bad = sum(int(chunk.size - np.count_nonzero(np.isfinite(chunk))) for chunk in _chunks(arr))  # bounded memory
    if bad:
        raise CalibrationError(f"{where} has {bad} non-finite value(s) (NaN or infinity)")


def pickled_error(path: Path) -> CalibrationError | None:
    """The error for a .npz/.npy file holding object arrays (numpy refuses them: allow_pickle stays off); else None."""
    if not holds_objects(path):
        return None
    return CalibrationError(f"{path}: holds Python objects (pickled); not loaded for safety: save plain arrays")


def holds_objects(path: Path) -> bool:
    """Whether some array of a .npy file or .npz archive has an object dtype, read from the headers only."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith(".npy"):
                        with archive.open(name) as member:
                            if _object_header(member):
                                return True
            return False
        with open(path, "rb") as handle:
            return _object_header(handle)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def _object_header(handle: Any) -> bool:
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read(handle)
    return bool(np.dtype(dtype).hasobject)


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise pickled_error(path) or CalibrationError(
            f"cannot read {path}: {type(exc).__name__} (expected a numpy .npz archive)") from None


def _match_keys(path: Path, arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec]) -> dict[str, str]:
    """Map input name -> npz key."""
    data_keys = [k for k in arrays if k != LABELS_KEY]
    if len(inputs) == 1 and inputs[0].name not in arrays and len(data_keys) == 1:
        # convenient for single-input models, but a wrong file would otherwise be used silently
        log.warning("%s: no array named '%s'; assuming its only data array '%s' feeds input '%s'",
                    path, inputs[0].name, data_keys[0], inputs[0].name)
        return {inputs[0].name: data_keys[0]}
    for spec in inputs:
        if spec.name not in arrays:
            raise CalibrationError(
                f"{path}: no array for input '{spec.name}'; keys: {', '.join(arrays) or '(none)'}"
            )
    return {spec.name: spec.name for spec in inputs}


def _validated(path: Path, arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        arr = arrays[spec.name]
        where = f"{path}: '{spec.name}'"
        check_shape(arr, spec, where)
        check_cast(arr, spec.dtype, where)
        check_finite(arr, where)
        out[spec.name] = arr
    counts = {name: arr.shape[0] for name, arr in out.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{path}: inputs have different sample counts {counts}")
    return out


def load_npz(path: Path, inputs: Sequence[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays keyed by input name, plus the optional ``labels`` array."""
    raw = _open_npz(path)
    keys = _match_keys(path, raw, inputs)
    arrays = _validated(path, {name: raw[key] for name, key in keys.items()}, inputs)
    labels = raw.get(LABELS_KEY)
    if labels is not None:
        count = next(iter(arrays.values())).shape[0]
        if labels.ndim == 0 or labels.shape[0] != count:
            raise CalibrationError(f"{path}: 'labels' has shape {labels.shape}, expected ({count}, ...)")
    return arrays, labels


def load_npy(path: Path, inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """A single memory-mapped array for a single-input model."""
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise CalibrationError(f"{path}: a .npy file holds one array but the model has inputs {names}; use .npz")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise pickled_error(path) or CalibrationError(
            f"cannot read {path}: {type(exc).__name__} (expected a numpy .npy array)") from None
    return _validated(path, {inputs[0].name: arr}, inputs)


def _chunks(arr: np.ndarray) -> Iterator[np.ndarray]:
    """Contiguous slices along axis 0, each around 16 MiB."""
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    step = max(1, _HASH_CHUNK_BYTES // row_bytes)
    for start in range(0, max(arr.shape[0], 1), step):
        yield np.ascontiguousarray(arr[start : start + step])


def fingerprint_arrays(arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec], count: int) -> str:
    """sha256 over names, shapes, dtypes and bytes of the first ``count`` samples of each input."""
    digest = hashlib.sha256(b"arrays-v1")
    for spec in inputs:
        arr = arrays[spec.name][:count]
        digest.update(f"\0{spec.name}\0{arr.dtype.str}\0{spec.dtype.str}\0{arr.shape}".encode())
        for chunk in _chunks(arr):
            digest.update(chunk.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()
