"""The held-out samples of a search, split in two: a selection part and a final part.

A search chooses among candidate models by their verdict; a verdict on the samples it
chose by would be optimistic (the smallest of many probes that pass is partly the luckiest).
So the held-out samples (``--eval`` data, else the held-out part of ``--calib``) are split
once, by a seeded permutation, before any probe runs::

    selection = sorted(perm[:ceil(n / 2)])     final = sorted(perm[ceil(n / 2):])

(rounded to a static batch). Every probe of the search (the sensitivity table, the
bisection) is measured on the selection part; the written model's verdict and its gates on
the final part, which no fitting, selection or ranking saw. Fitting still sees the fit
samples only. Data-free runs measure on seeded random inputs: the final part uses other seeds.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import numpy as np

from ..calib.split import subset
from ..errors import CalibrationError
from ..judge.evaluation import EvalData


class VerdictPart(str, Enum):
    """Which held-out samples a run's verdict is measured on."""

    ALL = "all"  # a plain run: every held-out sample
    SELECTION = "selection"  # a probe of a search
    FINAL = "final"  # the searched model: samples no probe saw

    @property
    def seed_offset(self) -> int:
        """Added to the seed of data-free verdict inputs, so the final inputs are not the probes'."""
        return RANDOM_FINAL_OFFSET if self is VerdictPart.FINAL else 0


#: seed offset of the final part's random inputs (data-free runs)
RANDOM_FINAL_OFFSET = 7919


def part_indices(total: int, part: VerdictPart, seed: int, static_batch: int | None = None) -> np.ndarray:
    """Sorted sample indices of `part` among `total` held-out samples (module docstring)."""
    if part is VerdictPart.ALL:
        return np.arange(total)
    step = static_batch if static_batch and static_batch > 1 else 1
    first = math.ceil(math.ceil(total / 2) / step) * step
    if first < step or total - first < step:
        raise CalibrationError(
            f"{total} held-out samples are too few to split into a selection and a final part for the search "
            "(give more --eval data or a larger --holdout)"
        )
    perm = np.random.default_rng([seed, 0x5EA2C4]).permutation(total)
    chosen = perm[:first] if part is VerdictPart.SELECTION else perm[first:]
    return np.sort(chosen)


def eval_part(evaluation: EvalData, part: VerdictPart, seed: int, static_batch: int | None = None) -> EvalData:
    """The `part` of evaluation data (labelled or not)."""
    if part is VerdictPart.ALL:
        return evaluation
    index = part_indices(evaluation.count, part, seed, static_batch)
    labels = None if evaluation.labels is None else evaluation.labels[index]
    return EvalData(evaluation.input_name, evaluation.images[index], labels)


def held_part(held: Any, part: VerdictPart, seed: int, static_batch: int | None = None) -> Any:
    """The `part` of the held-out calibration samples (a `CalibrationSet`), or None."""
    if part is VerdictPart.ALL or held is None:
        return held
    index = part_indices(held.num_samples, part, seed, static_batch)
    return subset(held, index.tolist(), f"search {part.value}")
