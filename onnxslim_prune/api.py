"""Python API: `analyze` (trace only), `prune` (the whole pipeline), `prepare` (its first half, for many runs).

    result = prune("model.onnx", method="l1", ratio=0.5)
    result.model   # onnx.ModelProto, validated
    result.report  # Report: params, MACs, the verdict, groups

    result = prune("model.onnx", RunSettings("ldrf", 0.5, calib="calib.npz"))  # the settings as one value

A run is two pipelines of passes (`pipeline`): `pipeline.prepare` (load, settings, calibration data, the
original's outputs, trace: once per model) and `pipeline.run` (method, apply, recovery, validation, verdict,
latency, report: once per run); `result.passes` says what each did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .analysis.model import Analysis, analyze_loaded, nothing_prunable_reason, quantized_ops, unmatched_excludes
from .analysis.plan import Plan
from .methods.base import Context, Options, get_method
from .methods.defaults import DefaultMethod
from .pipeline.prepare import ModelLike, PreparedRun, checked_options, load, path_of, patterns, prepare_run, resolve_input_shapes, with_default_method
from .pipeline.run import PruneResult
from .planning.parts import VerdictPart
from .roundto import Rounding
from .settings import RunSettings

log = logging.getLogger(__name__)

__all__ = ["Analysis", "DryRun", "ModelLike", "PreparedRun", "PruneResult", "analyze", "nothing_prunable_reason",
           "plan_only", "prepare", "prune", "quantized_ops", "resolve_input_shapes", "with_default_method"]


def analyze(
    model: ModelLike,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    exclude: Sequence[str] = (),
) -> Analysis:
    """Load, check, normalise and trace; nothing is modified."""
    return analyze_loaded(load(model), input_shapes, exclude, path=path_of(model))


def prune(
    model: ModelLike,
    method: str | None | RunSettings = "l1",
    ratio: float | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> PruneResult:
    """Prune `model`; the returned model is validated (see `validate`) and judged (see `verdict`).

    The run's settings are a `RunSettings` (`settings` module), given as one or built from `method`, `ratio` and
    the other fields by name (``prune(model, "l1", 0.5, calib="calib.npz")``); `method` None picks the measured
    best for the model's kind (`methods.defaults`; `PruneResult.default` says which and why).
    Calibration data is split (seeded) into a fit part, the only data the method sees, and a
    held-out part (`holdout` of it) on which the verdict is measured; with `eval_data` the
    verdict is measured there and all calibration data is fitted. With `latency`, the pruned model is timed against
    the original and the speed gates (`latency.speed_gates`: never slower, `gates.min_speedup`) join the verdict's
    gates; without it none is checked (a search's probes).
    Many runs of one model and data with other allocations (a search's probes): `prepare` once, then `PreparedRun.run`.
    """
    prepared = prepare(model, RunSettings.of(method, ratio, **overrides), progress=progress, remember=False)
    return prepared.run(consume=True)


def prepare(
    model: ModelLike,
    method: str | None | RunSettings = "l1",
    ratio: float | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    part: VerdictPart = VerdictPart.ALL,
    remember: bool = True,
    **overrides: Any,
) -> PreparedRun:
    """Everything of `prune` before the method, done once: `PreparedRun.run` then prunes, as often as asked.

    The model is loaded and checked, the default method chosen (when `method` is None), the calibration data
    loaded and split, the original's outputs on the verdict's samples of `part` measured (other parts when a run
    asks for them) and the model traced; each run restarts from the method with its own settings and a copy of the
    traced graph, and with `remember` the original's statistics are kept in memory across runs (`calib.cache.Memo`;
    `prune`, one run, keeps none). The settings are `prune`'s; a run with the same settings gives `prune`'s bytes.
    """
    return prepare_run(model, RunSettings.of(method, ratio, **overrides), progress, part, remember)


@dataclass(frozen=True, eq=False)
class DryRun:
    """What `plan_only` found: the trace and, where the method chooses without data, the plan."""

    analysis: Analysis
    plan: Plan | None  # None: the method chooses from data or a search
    method: str
    #: the method chosen for a run that named none, and why (None: the method was named)
    default: DefaultMethod | None = None


def plan_only(
    model: ModelLike,
    method: str | None | RunSettings = "l1",
    ratio: float | None = None,
    **overrides: Any,
) -> DryRun:
    """Check the options, trace, and (for a `MethodSpec.plan_only` method) choose the plan; nothing is applied.

    The settings are `prune`'s (`RunSettings`); those that choose the plan are read, no data is loaded.
    """
    settings = RunSettings.of(method, ratio, **overrides)
    # the default with data depends on the model's kind: the model is then loaded before the checks
    proto = load(model) if settings.method is None and settings.calib is not None else None
    settings, chosen = with_default_method(settings, proto)
    assert settings.method is not None
    spec = get_method(settings.method)
    options = Options(method=settings.method, ratio=settings.ratio, round_to=Rounding.of(settings.round_to),
                      exclude=patterns(settings.exclude), seed=settings.seed,
                      criterion=settings.criterion or spec.default_criterion, params=dict(settings.params or {}))
    checked_options(options)
    if proto is None:
        proto = load(model)
    shapes = resolve_input_shapes(proto, dict(settings.input_shapes or {}), preprocess=settings.preprocess)
    analysis = analyze_loaded(proto, shapes, options.exclude, path=path_of(model))
    unmatched_excludes([n.name for n in analysis.graph.nodes], options.exclude)
    if not spec.plan_only:
        return DryRun(analysis, None, settings.method, chosen)
    ctx = Context(analysis.model, analysis.graph, analysis.trace, options, analysis.input_shapes, analysis.opset)
    return DryRun(analysis, spec.plan(ctx), settings.method, chosen)


