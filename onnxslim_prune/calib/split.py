"""The held-out split of calibration data: a fit part and a part no fitting ever sees.

A verdict on the samples a least-squares refit was fitted to says nothing about unseen
inputs (16 photos fitted by a refit with more unknowns than rows read as 100% top-1
agreement and were 18.8% on other photos). So the calibration set is split once, before
any method runs, by a seeded permutation of the sample indices::

    held = max(ceil(fraction * N), min(MIN_HOLDOUT, N // 2))   (rounded up to a static batch)
    holdout = sorted(perm[:held]),  fit = sorted(perm[held:])

Methods, statistics, rankings and refits receive only the fit part; validation measures the
verdict on the held-out part. Both parts keep the source's order, read lazily; their
fingerprints cover the parent's and the indices, so cached statistics of the fit part are
never confused with those of the whole set.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..errors import CalibrationError, UsageError
from .sources import CalibrationSet

#: fewest held-out samples when the data allows (half the set at most)
MIN_HOLDOUT = 8
#: default fraction held out (``--holdout``)
DEFAULT_HOLDOUT = 0.2


@dataclass(frozen=True, eq=False)
class Split:
    fit: CalibrationSet
    holdout: CalibrationSet | None  # None with ``--holdout 0``
    fit_indices: tuple[int, ...]
    holdout_indices: tuple[int, ...]


def subset(calib: CalibrationSet, indices: Sequence[int], tag: str) -> CalibrationSet:
    """The samples ``indices`` of ``calib`` (in that order) as a calibration set of its own."""
    index = np.asarray(indices, dtype=np.int64)
    if index.size == 0:
        raise CalibrationError(f"{calib.source}: an empty {tag} part")
    parent = calib._read  # noqa: SLF001 - same package

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        chosen = index[start:stop]
        # consecutive runs are read as one range: an unshuffled subset costs what the whole does
        runs = np.split(chosen, np.flatnonzero(np.diff(chosen) != 1) + 1)
        parts = [parent(int(r[0]), int(r[-1]) + 1) for r in runs]
        return {name: np.concatenate([p[name] for p in parts]) for name in calib.names}

    digest = hashlib.sha256(f"{calib.fingerprint}\0{tag}\0".encode())
    digest.update(index.tobytes())
    labels = None if calib.labels is None else calib.labels[index]
    return replace(calib, num_samples=int(index.size), fingerprint=digest.hexdigest(), _read=read,
                   source=f"{calib.source} [{tag}]", labels=labels)


def held_out_count(total: int, fraction: float, static_batch: int | None = None) -> int:
    """How many of ``total`` samples are held out (see the module docstring)."""
    if not 0.0 <= fraction < 1.0 or not math.isfinite(fraction):
        raise UsageError(f"--holdout must be in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return 0
    held = max(math.ceil(fraction * total), min(MIN_HOLDOUT, total // 2))
    if static_batch and static_batch > 1:
        held = math.ceil(held / static_batch) * static_batch
    return held


def split_holdout(calib: CalibrationSet, fraction: float, seed: int, static_batch: int | None = None) -> Split:
    """Split ``calib`` into a fit part and a held-out part (seeded, deterministic)."""
    total = calib.num_samples
    held = held_out_count(total, fraction, static_batch)
    every = tuple(range(total))
    if held == 0:
        return Split(calib, None, every, ())
    need = static_batch or 1
    if total - held < need:
        raise CalibrationError(
            f"{calib.source}: {total} samples are too few to hold out {held} and fit on the rest; "
            f"give more samples, --eval data, or --holdout 0 (the verdict is then measured on fitted samples)"
        )
    perm = np.random.default_rng([seed, 0x401D]).permutation(total)
    holdout = tuple(sorted(int(i) for i in perm[:held]))
    fit = tuple(sorted(int(i) for i in perm[held:]))
    return Split(subset(calib, fit, "fit"), subset(calib, holdout, "held out"), fit, holdout)
