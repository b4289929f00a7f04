"""What can be asked of the library without pruning: the methods it offers, and a model's size figures.

Public (exported by the package) so that scripts, the benchmarks among them, need none of the modules
behind them: `list_methods` reads the method registry, `model_stats` counts as a run's report counts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from . import ir
from .judge.validate import ModelStats
from .judge.validate import model_stats as _model_stats


@dataclass(frozen=True)
class MethodInfo:
    """One pruning method as `onnx-prune --help` lists it."""

    name: str
    #: the one line of `--help`
    help: str
    #: True when it needs calibration data (``calib=`` / ``--calib``)
    needs_data: bool


def list_methods() -> tuple[MethodInfo, ...]:
    """Every registered method, in `--help` order."""
    from .methods import builtin  # noqa: F401  (fills the registry)
    from .methods.base import METHODS

    return tuple(MethodInfo(spec.name, spec.help, spec.needs_data) for spec in METHODS.values())


def model_stats(
    model: onnx.ModelProto | str | os.PathLike[str], input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> ModelStats:
    """Parameters, MACs of the weighted ops and serialized size of `model`, counted as a run's report counts them.

    MACs are at `input_shapes` (input name -> static shape); without them at the model's own static
    dimensions, 1 for every symbolic one. A file that is not a model raises `ModelError`, a shape that does
    not fit an input `UsageError`.
    """
    proto = model if isinstance(model, onnx.ModelProto) else ir.load_model(model)
    return _model_stats(proto, ir.fixed_input_shapes(proto, input_shapes))
