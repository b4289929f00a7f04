"""`RunSettings`: every setting of one run of the pipeline, in one place (`api.prune`, `api.prepare`, a search).

    settings = RunSettings("ldrf", 0.5, calib="calib.npz", params={"refit": Refit.MEAN})
    prune("model.onnx", settings)                          # the same run as
    prune("model.onnx", "ldrf", 0.5, calib="calib.npz", params={"refit": "mean"})

The keyword form builds the settings (`of`): an unknown keyword is a `TypeError`, as for any function.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .calib.cache import CacheSettings
from .calib.preprocess import Preprocess
from .calib.split import DEFAULT_HOLDOUT
from .roundto import Rounding, RoundTo
from .judge.verdict import Gates


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run; the pipeline reads them as given (`api.prepare` normalises them into `Options`)."""

    #: a registered method (`methods.builtin`); None: the measured best for the model's kind (`methods.defaults`)
    method: str | None = "l1"
    ratio: float = 0.5
    #: the kept counts' multiple (`roundto.Rounding`): ``RoundTo.AUTO`` (the CLI's default) keeps the original's
    #: alignment up to the CPU's kernel block; an int N a fixed multiple; 1 none
    round_to: int | Rounding | RoundTo = 1
    exclude: Sequence[str] | str = ()  # glob patterns of protected node names (a string is one pattern)
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int = 0
    criterion: str | None = None  # None: the method's default
    #: .npz/.npy, an image folder or "random"; split (seeded) into the fitted part and the held-out verdict's
    calib: str | os.PathLike[str] | None = None
    calib_samples: int | None = None
    batch_size: int = 32
    #: labelled or unlabelled .npz: the verdict is measured there, and all calibration data is fitted
    eval_data: str | os.PathLike[str] | None = None
    params: Mapping[str, Any] | None = None  # the method's settings (`methods.base.CommonParams` and its subclasses)
    preprocess: Preprocess | None = None  # image folders
    holdout: float = DEFAULT_HOLDOUT  # the share of the calibration data held out for the verdict
    gates: Gates | None = None
    #: time the pruned model against the original; the speed gates join the verdict's (none: a search's probes)
    latency: bool = True
    calib_memory: int | None = None  # bytes the passes over calibration data may hold (`calib.memory`; None: 1/4 RAM)
    cache: CacheSettings | None = None  # the statistics cache (`calib.cache`; None: the current settings)

    @classmethod
    def of(cls, method: str | None | RunSettings = "l1", ratio: float | None = None, /,
           **overrides: Any) -> RunSettings:
        """Settings from `method` (or settings to start from), `ratio` and other fields by name."""
        base = method if isinstance(method, RunSettings) else cls(method=method)
        if ratio is not None:
            if "ratio" in overrides:
                raise TypeError("ratio given twice")
            overrides["ratio"] = ratio
        unknown = sorted(set(overrides) - FIELDS)
        if unknown:
            raise TypeError(f"unknown run setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                            f"(RunSettings has {', '.join(f.name for f in fields(cls))})")
        return replace(base, **overrides) if overrides else base


FIELDS = frozenset(f.name for f in fields(RunSettings))
