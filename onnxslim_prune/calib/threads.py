"""Thread policy: numpy/scipy BLAS threads while onnxruntime sessions stream batches.

The machines this tool runs on are often small (CI runners, laptops, 2-core VMs). onnxruntime
already spreads one ``run`` over every core; numpy/scipy's OpenBLAS (or MKL / an OpenMP
runtime) starts its own pool of the same size. The two pools take turns in one Python loop
(``run`` a batch, reduce it with numpy, ``run`` the next) and fight over the cores: a BLAS
worker that has just finished busy-waits for more work while onnxruntime's threads want the
core, and a multithreaded BLAS call waits at its barrier for a worker that the scheduler parked
behind an onnxruntime thread. Measured on a 2-core machine: 9x9 ``scipy.linalg.solve`` calls
took 37 ms instead of 0.1 ms, and Gram updates (``X^T X`` of a few thousand rows) ran 11x
slower than with one BLAS thread, while a session was alive and streaming.

Policy, with ``blas_limited(threads=1)``:

* ``collect.stream_tensors`` holds the limit for the whole streamed loop: every onnxruntime
  ``run`` *and* whatever the caller does with a batch between two ``next()`` calls (a ``with``
  inside a generator stays in force while the generator is suspended at ``yield``). It is
  released when the stream is exhausted, raises, or is closed early (``close()``, garbage
  collection of an abandoned generator, or leaving a ``with contextlib.closing(...)``).
* Wrap anything else that does numpy / scipy linear algebra while an onnxruntime session is
  alive, or in loops of many small solves (selection loops, per-layer refits between
  streamed passes): ``with blas_limited(): ...``. Enter it once around the loop, not per call:
  the outermost entry scans the loaded libraries (about 2 ms); nested entries cost nothing.
* Large one-off products with no session running (a single big eigendecomposition) may use
  every core: do not wrap those.

The limit is process-wide (BLAS keeps one thread count per library), so overlapping uses are
reference-counted rather than nested: the most restrictive active request is in force, and
the original limits come back only when the last request ends, in whatever order the users
(for example two interleaved generators) finish. ``ONNXSLIM_PRUNE_BLAS_THREADS`` overrides
the streaming default (``0`` or ``off`` = leave the libraries alone).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_info, threadpool_limits

__all__ = ["blas_limited", "blas_threads", "stream_blas_threads"]

ENV = "ONNXSLIM_PRUNE_BLAS_THREADS"
DEFAULT_STREAM_THREADS = 1

_lock = threading.Lock()
_requests: list[int] = []  # active requests, any order
_original: threadpool_limits | None = None  # limits before the first active request
_in_force: int | None = None


def stream_blas_threads() -> int | None:
    """BLAS threads for streamed passes: ``ONNXSLIM_PRUNE_BLAS_THREADS`` or 1 (None = no limit)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return DEFAULT_STREAM_THREADS
    if raw in ("0", "off", "none", "no"):
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a thread count or 'off', got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{ENV} must be a thread count or 'off', got {raw!r}")
    return value or None


def _apply() -> None:
    """Put the most restrictive active request in force, or the originals back when none is left."""
    global _original, _in_force
    if not _requests:
        if _original is not None:
            _original.restore_original_limits()
        _original, _in_force = None, None
        return
    target = min(_requests)
    if _original is None:
        _original = threadpool_limits(limits=target)  # remembers the limits it replaced
    elif target != _in_force:
        threadpool_limits(limits=target)  # a change while active: `_original` still restores the first state
    _in_force = target


@contextmanager
def blas_limited(threads: int | None = 1) -> Iterator[None]:
    """Limit BLAS and OpenMP thread pools (numpy, scipy) to `threads` while the block runs.

    ``threads=None`` does nothing (a caller can pass its setting through). onnxruntime's own
    thread pool is not touched (its CPU provider does not use OpenMP in the PyPI builds).
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for no limit), got {threads}")
    with _lock:
        _requests.append(threads)
        _apply()
    try:
        yield
    finally:
        with _lock:
            _requests.remove(threads)
            _apply()


def blas_threads() -> dict[str, int]:
    """``{library file: threads}`` of the BLAS / OpenMP pools now loaded (for tests and reports)."""
    return {str(info["filepath"]): int(info["num_threads"]) for info in threadpool_info()}
