"""How much memory the passes over calibration data may hold (``--calib-memory``).

One budget per run, in bytes, for what calibration passes keep between batches: the
frontier of the staged refit (`calib.engine`: beyond the budget, batches spill to ``.npy``
files) and the Gram matrices collected together for a selection (`passes.datadriven`:
beyond the budget, the layers are split over more passes). onnxruntime's own arena and one
batch's activations are not counted: they do not grow with the number of samples.

The default is `MEMORY_SHARE` of physical RAM. The budget is a run-scoped setting held in a
context variable (`limited`), like a ``decimal`` context: the API sets it around one
``prune`` call, and code deep in a pass reads it without every signature carrying it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator

from ..errors import UsageError

#: share of the machine's RAM that calibration passes may hold by default
MEMORY_SHARE = 0.25
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("calibration_memory", default=None)


def physical_memory() -> int:
    """Bytes of physical RAM (8 GiB when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_size(text: str) -> int:
    """Bytes of ``512M``, ``2G``, ``1.5GB``, ``300MiB``, ``4096`` (bytes) or ``25%`` (of physical RAM)."""
    value = text.strip()
    percent = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", value)
    if percent:
        share = float(percent.group(1)) / 100.0
        if not 0.0 < share <= 1.0:
            raise UsageError(f"--calib-memory {text!r}: a share of RAM must be in (0%, 100%]")
        return int(share * physical_memory())
    return byte_size(text, "--calib-memory", "(512M, 2G) or a share of RAM (25%)")


def byte_size(text: str, flag: str, examples: str, if_zero: str = "") -> int:
    """Bytes of ``512M``, ``2G``, ``1.5GB``, ``300MiB`` or ``4096`` given to `flag`; one-line usage errors."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.strip(), flags=re.IGNORECASE)
    if not match:
        raise UsageError(f"{flag} {text!r}: give bytes with an optional K/M/G/T suffix {examples}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise UsageError(f"{flag} {text!r} must be positive{if_zero}")
    return size


def explicit_budget() -> int | None:
    """The budget the run was given (``--calib-memory``), or None for the default."""
    return _budget.get()


def calibration_budget() -> int:
    """The current run's budget in bytes (`limited`), else `MEMORY_SHARE` of physical RAM."""
    budget = _budget.get()
    return int(MEMORY_SHARE * physical_memory()) if budget is None else budget


@contextlib.contextmanager
def limited(budget: int | None) -> Iterator[None]:
    """Within this block calibration passes hold at most `budget` bytes (None: the default)."""
    token = _budget.set(budget)
    try:
        yield
    finally:
        _budget.reset(token)
