"""On-disk cache of calibration statistics.

An entry is a ``.npz`` file named ``sha256("\\0".join(key_parts)).npz`` where the key parts are,
by convention, ``(model_digest(model), calib.fingerprint, caller key string)``. The key parts are
also stored inside the file and checked on read. Writes go to a temp file in the same directory
followed by ``os.replace`` (atomic). Unreadable or mismatching files are recomputed with a
warning. Directory: the ``cache_dir`` argument, else ``$ONNXSLIM_PRUNE_CACHE``, else
``~/.cache/onnxslim-prune``; ``cache_dir=None`` (or the variable set to ``""``, ``0``, ``off``,
``none``) disables caching.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx

log = logging.getLogger(__name__)

ENV_VAR: Final = "ONNXSLIM_PRUNE_CACHE"
_KEY_ENTRY: Final = "__cache_key__"
_DISABLED: Final = {"", "0", "off", "none", "false"}


class _Default:
    """Marker for "no cache_dir argument given" (None means disabled)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
CacheDir = str | os.PathLike[str] | None | _Default


def resolve_cache_dir(cache_dir: CacheDir = DEFAULT) -> Path | None:
    """The cache directory to use, or None when caching is disabled."""
    if not isinstance(cache_dir, _Default):
        return None if cache_dir is None else Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in _DISABLED else Path(env).expanduser()
    return Path("~/.cache/onnxslim-prune").expanduser()


def model_digest(model: onnx.ModelProto | bytes) -> str:
    """sha256 of the serialized model."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return hashlib.sha256(data).hexdigest()


def _key_text(key_parts: Sequence[str]) -> str:
    return "\0".join(key_parts)


def cache_path(key_parts: Sequence[str], directory: Path) -> Path:
    """File that holds the entry for ``key_parts``."""
    return directory / (hashlib.sha256(_key_text(key_parts).encode()).hexdigest() + ".npz")


def _read(path: Path, key_parts: Sequence[str]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except Exception as exc:  # any unreadable file is a miss: numpy/zipfile raise many types
        log.warning("ignoring corrupt cache file %s (%s); recomputing", path, type(exc).__name__)
        return None
    stored = data.pop(_KEY_ENTRY, np.array([], dtype=str))
    if [str(part) for part in stored.reshape(-1)] != list(key_parts):
        log.warning("ignoring cache file %s with a different key; recomputing", path)
        return None
    return data


def _write(path: Path, key_parts: Sequence[str], values: Mapping[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                arrays: dict[str, Any] = {_KEY_ENTRY: np.array(list(key_parts), dtype=str), **values}
                np.savez(handle, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("cannot write cache file %s: %s", path, exc)


def load_entry(key_parts: Sequence[str], cache_dir: CacheDir = DEFAULT) -> dict[str, np.ndarray] | None:
    """The cached arrays for ``key_parts``, or None (a miss, or caching disabled)."""
    directory = resolve_cache_dir(cache_dir)
    path = None if directory is None else cache_path(key_parts, directory)
    if path is None or not path.exists():
        return None
    hit = _read(path, key_parts)
    if hit is not None:
        log.debug("cache hit %s", path)
    return hit


def store_entry(key_parts: Sequence[str], values: Mapping[str, np.ndarray], cache_dir: CacheDir = DEFAULT) -> None:
    """Store `values` under ``key_parts`` (nothing when caching is disabled)."""
    if _KEY_ENTRY in values:
        raise ValueError(f"{_KEY_ENTRY!r} is reserved by the cache")
    directory = resolve_cache_dir(cache_dir)
    if directory is not None:
        _write(cache_path(key_parts, directory), key_parts, values)


def cached(
    key_parts: Sequence[str],
    compute: Callable[[], Mapping[str, np.ndarray]],
    *,
    cache_dir: CacheDir = DEFAULT,
) -> dict[str, np.ndarray]:
    """Return the cached arrays for ``key_parts``, computing and storing them on a miss."""
    hit = load_entry(key_parts, cache_dir)
    if hit is not None:
        return hit
    values = {key: np.asarray(value) for key, value in compute().items()}
    store_entry(key_parts, values, cache_dir)
    return values
