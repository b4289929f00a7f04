"""On-disk cache of calibration statistics, bounded in size.

An entry is a ``.npz`` file named ``sha256("\\0".join(key_parts)).npz`` where the key parts are,
by convention, ``(model_digest(model), calib.fingerprint, caller key string)``. The key parts are
also stored inside the file and checked on read. Unreadable or mismatching files are recomputed
with a warning.

Where: `CacheSettings.directory`, else ``$ONNXSLIM_PRUNE_CACHE``, else the platform's user cache
folder (``platformdirs``: ``$XDG_CACHE_HOME/onnxslim-prune``, by default ``~/.cache/onnxslim-prune``,
on Linux). ``CacheSettings(enabled=False)``, ``cache_dir=None`` or the variable set to ``""``,
``0``, ``off``, ``none``, ``false`` disables it.

How much: the entries together stay within `CacheSettings.max_bytes` (`DEFAULT_MAX_BYTES`): before
an entry is stored, the least recently used entries are deleted until it fits. A hit refreshes
its entry's modification time (set here, so ``noatime`` mounts change nothing): mtime is recency.
An entry larger than `ENTRY_SHARE` of the cap is not stored (one such entry would evict everything
else; the Gram matrices of a wide layer are ``8 D^2`` bytes however few samples made them).

Safety: writes go to a uniquely named temp file beside the entry, then ``os.replace`` (atomic);
the temp file is removed in a ``finally`` (errors, Ctrl-C), and one left by a killed process is
deleted by the next sweep once older than `STALE_TEMP_SECONDS`. Runs may share a folder: an entry
another run deletes while this one reads it is a miss, and files that are not the cache's own
(names other than entries and temp files) are never touched.

The settings are run-scoped, held in a context variable (`using`), like `calib.memory.limited`:
`api.prune` sets them around the passes that collect statistics.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import numpy_helper
import platformdirs

from .. import ir
from ..errors import UsageError
from . import memory

log = logging.getLogger(__name__)

ENV_VAR: Final = "ONNXSLIM_PRUNE_CACHE"
APP_NAME: Final = "onnxslim-prune"
#: default cap on the bytes of all entries together (``--cache-size``)
DEFAULT_MAX_BYTES: Final = 2 << 30
#: an entry larger than this share of the cap is not stored
ENTRY_SHARE: Final = 0.25
#: a temp file older than this is a killed writer's, deleted by the sweep
STALE_TEMP_SECONDS: Final = 3600
_KEY_ENTRY: Final = "__cache_key__"
_DISABLED: Final = {"", "0", "off", "none", "false"}
_ENTRY_NAME: Final = re.compile(r"[0-9a-f]{64}\.npz")
# ".<entry stem>.<random>.tmp"; without the dots, the temp files of versions before the cap
_TEMP_NAME: Final = re.compile(r"\.?[0-9a-f]{64}\.?[a-z0-9_]+\.tmp")


@dataclass(frozen=True)
class CacheSettings:
    """Where the statistics cache lives and how large it may grow (module docstring)."""

    #: None: ``$ONNXSLIM_PRUNE_CACHE``, else the platform's user cache folder
    directory: Path | None = None
    enabled: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise UsageError(f"the cache size must be positive, got {self.max_bytes} bytes (--no-cache disables the cache)")
        if self.directory is not None:
            object.__setattr__(self, "directory", Path(self.directory).expanduser())


@dataclass(frozen=True)
class CacheInfo:
    """What a cache folder holds (`cache_info`), or what `clear_cache` deleted."""

    directory: Path
    entries: int
    bytes: int
    max_bytes: int
    enabled: bool


_current: contextvars.ContextVar[CacheSettings] = contextvars.ContextVar("statistics_cache", default=CacheSettings())


@contextlib.contextmanager
def using(settings: CacheSettings | None) -> Iterator[None]:
    """Within this block the cache follows `settings` (None: keep the current ones)."""
    if settings is None:
        yield
        return
    token = _current.set(settings)
    try:
        yield
    finally:
        _current.reset(token)


def current_settings() -> CacheSettings:
    return _current.get()


#: the share of the calibration memory budget (`memory.calibration_budget`) a `Memo` holds at most
MEMO_SHARE: Final = 8


class Memo:
    """Entries of one prepared run kept in memory across its runs (`api.prepare`: a search's probes).

    Every probe collects the original's statistics again; read from disk they cost a read, and the
    model's digest a serialisation of the whole model. Here `load_entry` finds them in memory first
    (also with the disk cache off), and `model_digest` of `model` (the prepared original, never
    modified) is computed once; only its entries are kept. Entries are copied in and out (a statistic may fold into the arrays it
    loaded); those past `1 / MEMO_SHARE` of the calibration budget are left to the disk cache.
    """

    def __init__(self, model: onnx.ModelProto | None = None) -> None:
        self.model = model
        self.digest: str | None = None
        self.entries: dict[str, dict[str, np.ndarray]] = {}
        self.nbytes = 0

    def get(self, key_parts: Sequence[str]) -> dict[str, np.ndarray] | None:
        hit = self.entries.get(_key_text(key_parts))
        return None if hit is None else {k: v.copy() for k, v in hit.items()}

    def put(self, key_parts: Sequence[str], values: Mapping[str, np.ndarray]) -> None:
        if not key_parts or key_parts[0] != self.digest:
            return  # a pruned model's statistics: no other run asks for them
        key = _key_text(key_parts)
        size = _entry_bytes(values)
        if key in self.entries or self.nbytes + size > memory.calibration_budget() // MEMO_SHARE:
            return
        self.entries[key] = {k: np.array(v, copy=True) for k, v in values.items()}
        self.nbytes += size


_memo: contextvars.ContextVar[Memo | None] = contextvars.ContextVar("statistics_memo", default=None)


@contextlib.contextmanager
def remembered(memo: Memo | None) -> Iterator[None]:
    """Within this block entries are looked up in and kept by `memo` too (None: only the disk cache)."""
    token = _memo.set(memo)
    try:
        yield
    finally:
        _memo.reset(token)


def parse_cache_size(text: str) -> int:
    """Bytes of ``2G``, ``500M``, ``1.5GB``, ``300MiB`` or ``4096`` (``--cache-size``)."""
    return memory.byte_size(text, "--cache-size", "(500M, 2G)", " (--no-cache disables the cache)")


def human_bytes(size: int) -> str:
    """``512 B``, ``45.6 KiB``, ``1.2 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class _Default:
    """Marker for "no cache_dir argument given": the current `CacheSettings` decide (None means disabled)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
CacheDir = str | os.PathLike[str] | None | _Default


def cache_location(settings: CacheSettings | None = None) -> Path:
    """The folder `settings` (default: the current ones) point at, whether or not caching is enabled."""
    settings = settings or current_settings()
    if settings.directory is not None:
        return settings.directory
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip().lower() not in _DISABLED:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def resolve_cache_dir(cache_dir: CacheDir = DEFAULT) -> Path | None:
    """The cache directory to use, or None when caching is disabled."""
    if not isinstance(cache_dir, _Default):
        return None if cache_dir is None else Path(cache_dir).expanduser()
    settings = current_settings()
    if not settings.enabled:
        return None
    env = os.environ.get(ENV_VAR)
    if settings.directory is None and env is not None and env.strip().lower() in _DISABLED:
        return None
    return cache_location(settings)


def model_digest(model: onnx.ModelProto | bytes) -> str:
    """sha256 of the model's weightless part and then of each initializer's bytes, length-prefixed (the
    whole model is never serialized at once: SmolLM2's bytes would be 0.6 GB more); the same for its bytes."""
    memo = _memo.get()
    if memo is not None and memo.model is not None and model is memo.model:
        if memo.digest is None:
            memo.digest = _proto_digest(model)
        return memo.digest
    return _proto_digest(onnx.ModelProto.FromString(model) if isinstance(model, bytes) else model)


def _proto_digest(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    for part in (ir.without_initializers(model), *model.graph.initializer):
        # a view's tensor (`ir.file_view`) counts by its values, as the same tensor loaded into the model does
        viewed = ir.file_view_values(part) if isinstance(part, onnx.TensorProto) else None
        data = part.SerializeToString() if viewed is None else numpy_helper.from_array(viewed, part.name).SerializeToString()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _key_text(key_parts: Sequence[str]) -> str:
    return "\0".join(key_parts)


def cache_path(key_parts: Sequence[str], directory: Path) -> Path:
    """File that holds the entry for ``key_parts``."""
    return directory / (hashlib.sha256(_key_text(key_parts).encode()).hexdigest() + ".npz")


def _read(path: Path, key_parts: Sequence[str]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except FileNotFoundError:  # never stored, or evicted by another run a moment ago
        return None
    except Exception as exc:  # any unreadable file is a miss: numpy/zipfile raise many types
        log.warning("ignoring corrupt cache file %s (%s); recomputing", path, type(exc).__name__)
        return None
    stored = data.pop(_KEY_ENTRY, np.array([], dtype=str))
    if [str(part) for part in stored.reshape(-1)] != list(key_parts):
        log.warning("ignoring cache file %s with a different key; recomputing", path)
        return None
    return data


def _touch(path: Path) -> None:
    """Mark `path` as just used (the eviction order is by mtime)."""
    try:
        os.utime(path)
    except OSError:  # evicted meanwhile, or a read-only cache: the hit stands
        pass


def _entries(directory: Path) -> list[tuple[int, str, int]]:
    """``(mtime_ns, name, bytes)`` of the entries in `directory`, least recently used first."""
    out = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        if not _ENTRY_NAME.fullmatch(name):
            continue
        try:
            st = os.stat(directory / name)
        except OSError:  # deleted by another run meanwhile
            continue
        out.append((st.st_mtime_ns, name, st.st_size))
    return sorted(out)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:  # already gone (another run), or open elsewhere on Windows
        return False


def _sweep(directory: Path, max_bytes: int, incoming: int = 0, replacing: str = "") -> None:
    """Delete stale temp files, then the least recently used entries until `incoming` more bytes fit in `max_bytes`.

    `replacing`: the entry the incoming one overwrites (it does not count).
    """
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if _TEMP_NAME.fullmatch(name):
            try:
                stale = now - os.stat(directory / name).st_mtime > STALE_TEMP_SECONDS
            except OSError:
                continue
            if stale and _remove(directory / name):
                log.debug("removed stale cache temp file %s", name)
    entries = [e for e in _entries(directory) if e[1] != replacing]
    total = sum(size for _t, _n, size in entries) + incoming
    for _mtime, name, size in entries:
        if total <= max_bytes:
            break
        if _remove(directory / name):
            log.debug("evicted cache entry %s (%d bytes)", name, size)
        total -= size  # gone either way: a file another run deleted no longer counts


def _entry_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes an uncompressed ``.npz`` of `arrays` takes, near enough (headers are small)."""
    return sum(int(np.asarray(a).nbytes) + 512 for a in arrays.values())


def _write(path: Path, key_parts: Sequence[str], values: Mapping[str, np.ndarray], max_bytes: int) -> None:
    arrays: dict[str, Any] = {_KEY_ENTRY: np.array(list(key_parts), dtype=str), **values}
    size = _entry_bytes(arrays)
    if size > ENTRY_SHARE * max_bytes:
        what = key_parts[-1].split("|", 1)[0] if key_parts else "statistics"
        log.info("not caching %s of %s: more than %d%% of the cache's %s cap (--cache-size)",
                 what, human_bytes(size), round(ENTRY_SHARE * 100), human_bytes(max_bytes))
        return
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path.parent, max_bytes, incoming=size, replacing=path.name)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("cannot write cache file %s: %s", path, exc)
    finally:  # errors and Ctrl-C leave no temp file
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_entry(key_parts: Sequence[str], cache_dir: CacheDir = DEFAULT) -> dict[str, np.ndarray] | None:
    """The cached arrays for ``key_parts``, or None (a miss, or caching disabled); a `Memo` in use is asked first."""
    memo = _memo.get()
    remembered_hit = None if memo is None else memo.get(key_parts)
    if remembered_hit is not None:
        return remembered_hit
    directory = resolve_cache_dir(cache_dir)
    if directory is None:
        return None
    path = cache_path(key_parts, directory)
    hit = _read(path, key_parts)
    if hit is not None:
        _touch(path)
        log.debug("cache hit %s", path)
        if memo is not None:
            memo.put(key_parts, hit)
    return hit


def store_entry(key_parts: Sequence[str], values: Mapping[str, np.ndarray], cache_dir: CacheDir = DEFAULT) -> None:
    """Store `values` under ``key_parts`` within the cap (nothing when caching is disabled or the entry is too large)."""
    if _KEY_ENTRY in values:
        raise ValueError(f"{_KEY_ENTRY!r} is reserved by the cache")
    memo = _memo.get()
    if memo is not None:
        memo.put(key_parts, values)
    directory = resolve_cache_dir(cache_dir)
    if directory is not None:
        _write(cache_path(key_parts, directory), key_parts, values, current_settings().max_bytes)


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


def cache_info(settings: CacheSettings | None = None) -> CacheInfo:
    """Entries and bytes in the cache folder of `settings` (default: the current ones); reads nothing else."""
    settings = settings or current_settings()
    directory = cache_location(settings)
    entries = _entries(directory)
    return CacheInfo(directory, len(entries), sum(size for _t, _n, size in entries), settings.max_bytes, _enabled(settings))


def _enabled(settings: CacheSettings) -> bool:
    with using(settings):
        return resolve_cache_dir() is not None


def clear_cache(settings: CacheSettings | None = None) -> CacheInfo:
    """Delete every entry of the cache folder of `settings` (default: the current ones), and stale temp files.

    A fresh temp file is a running writer's; other files in the folder, and the folder, are left
    alone. Returns what was deleted.
    """
    settings = settings or current_settings()
    directory = cache_location(settings)
    entries = bytes_freed = 0
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    for name in sorted(names):
        path = directory / name
        entry = _ENTRY_NAME.fullmatch(name) is not None
        if not entry and not _TEMP_NAME.fullmatch(name):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        size = st.st_size
        if not entry and now - st.st_mtime <= STALE_TEMP_SECONDS:
            continue
        if _remove(path):
            entries += entry
            bytes_freed += size
    log.debug("cleared %d cache entries (%d bytes) from %s", entries, bytes_freed, directory)
    return CacheInfo(directory, entries, bytes_freed, settings.max_bytes, _enabled(settings))
