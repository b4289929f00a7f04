"""The passes before a run, done once for every run of a model (`api.prepare`): load, settings, data, reference.

    [load, when the default method depends on the model] -> settings -> load -> calibration data
          -> the original's outputs -> trace

`PREPARE_PASSES` fill one `PrepareState` and leave a `PreparedRun`, from which each run (`pipeline.run`) restarts
at the method: a search's probes share the load, the data, the original's outputs and the trace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from .. import ir, recover
from ..analysis.model import Analysis, analyze_loaded, unmatched_excludes, warned
from ..analysis.plan import check_ratio
from ..calib import cache as calib_cache
from ..calib import memory
from ..calib.split import held_out_count, split_holdout
from ..errors import CalibrationError, UsageError
from ..judge import validate
from ..judge.evaluation import EvalData, load_eval
from ..judge.verdict import Gates, check_gates_have_data
from ..methods import builtin  # noqa: F401  (fills the method registry)
from ..methods.base import MethodSpec, Options, check_options, get_method
from ..methods.defaults import DefaultMethod, default_method
from ..planning.parts import VerdictPart, eval_part, held_part
from ..progress import Stage, StageClock
from ..roundto import Rounding
from ..settings import RunSettings
from . import judging
from .core import Pass, PassManager, PassResult
from .judging import Measure
from .run import PruneResult, run_prepared

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]


def load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return ir.load_model(model)


def path_of(model: ModelLike) -> str | None:
    """The file `model` was given as (its proto is then exactly the file: readers may read the file instead)."""
    return None if isinstance(model, onnx.ModelProto) else os.fspath(model)


def load_checked(model: ModelLike, path: str | None) -> onnx.ModelProto:
    """The one parse of the input: everything after reads this proto (or the file, in C++).

    A large model read from a file with its weights inside is held as a view of that file (`ir.file_view`):
    the weights the loaded proto held are freed, and the run's graph holds the only copy in memory.
    """
    original = load(model)
    ir.check_model(original, full=False, what="input model", path=path)
    return original if path is None else ir.file_view(original, path)


def with_default_method(settings: RunSettings, model: onnx.ModelProto | None) -> tuple[RunSettings, DefaultMethod | None]:
    """`settings` with a method named: without one, the default for `model`'s kind (`methods.defaults`) and why.

    Only a run with calibration data reads `model` (None is enough without: the data-free default).
    """
    if settings.method is not None:
        return settings, None
    with_data = settings.calib is not None
    if with_data and model is None:
        raise ValueError("the default method with calibration data depends on the model: load it first")
    chosen = default_method(model if model is not None else onnx.ModelProto(), with_data=with_data)
    log.info("method: %s (%s)", chosen.name, chosen.reason)
    return replace(settings, method=chosen.name), chosen


@dataclass(eq=False)
class PreparedRun:
    """A loaded, checked and traced model with its calibration data and the original's outputs (`prepare`)."""

    model: ModelLike
    path: str | None
    original: onnx.ModelProto
    spec: MethodSpec
    options: Options
    checked: list[str]  # the options' warnings
    data_notes: list[str]  # the split's
    evaluation: EvalData | None
    calibration: Any
    shapes_in: dict[str, tuple[int, ...]]
    fit: Any
    held: Any
    settings: RunSettings  # as given (the method named); `options` is what the method reads of them
    gates: Gates
    progress: Callable[[int, int], None] | None
    started: float
    clock: StageClock
    #: the original's statistics across runs (None: a single run, which holds nothing more than before)
    memo: calib_cache.Memo | None = None
    #: the method chosen for a run that named none, and why (None: the method was named)
    default: DefaultMethod | None = None
    analysis: Analysis | None = None  # None: traced by each run (block pruning changes the graph first)
    excluded: list[str] = field(default_factory=list)  # --exclude patterns that name no node
    measures: dict[VerdictPart, Measure] = field(default_factory=dict)  # the original's outputs per part
    #: the original's parameters, MACs and size at the traced input shapes, measured once
    before: dict[tuple[tuple[str, tuple[int, ...]], ...], validate.ModelStats] = field(default_factory=dict)
    #: what each pass of `prepare` did (`PREPARE_PASSES`)
    prepare_passes: tuple[PassResult, ...] = ()

    def stats_before(self, input_shapes: Mapping[str, tuple[int, ...]]) -> validate.ModelStats:
        """`validate.model_stats` of the original, once per input shapes: measured while the run holds little (its
        shape reads run the whole model once), and not again by every run of a search."""
        key = tuple(sorted((name, tuple(shape)) for name, shape in input_shapes.items()))
        if key not in self.before:
            self.before[key] = validate.model_stats(self.original, input_shapes)
        return self.before[key]

    def measure(self, part: VerdictPart, clock: StageClock | None = None) -> Measure:
        """The verdict's samples of `part` and the original's outputs on them, measured once."""
        if part not in self.measures:
            evaluation, held = self.evaluation, self.held
            if part is not VerdictPart.ALL:
                with (clock or self.clock).stage(Stage.CALIBRATION):
                    evaluation, held = search_part(evaluation, held, self.fit, part, self.options.seed, self.original)
            sessions = judging.Sessions(self.original, self.path)
            with (clock or self.clock).stage(Stage.REFERENCE), memory.limited(self.settings.calib_memory):
                # the original's outputs need no pruning: measured first, so bad data (labels past the classes) fails
                # before the work
                measured = judging.reference_outputs(self.original, self.shapes_in, self.options.seed + part.seed_offset, evaluation,
                                      held, self.fit, self.progress, sessions)
            self.measures[part] = replace(measured, sessions=None)
        return self.measures[part]

    def run(self, params: Mapping[str, Any] | None = None, *, ratio: float | None = None,
            part: VerdictPart = VerdictPart.ALL, latency: bool | None = None, consume: bool = False) -> PruneResult:
        """Prune with the prepared settings, `params` (method settings, e.g. ``group_ratios``) and `ratio` replaced.

        `part`: the half of the held-out samples the verdict is measured on (`planning.parts`); `latency`: None keeps
        the prepared setting. `consume`: the traced graph itself is pruned (no copy; the last run, as `prune`'s).
        """
        options, notes = self.options, list(self.checked)
        if params is not None or ratio is not None:
            options = replace(options, ratio=options.ratio if ratio is None else ratio,
                              params=options.params if params is None else {**options.params, **params})
            notes = checked_options(options) if options != self.options else notes
        notes.extend(self.data_notes)
        return run_prepared(self, options, notes, part, self.settings.latency if latency is None else latency, consume)


def split_calibration(
    calibration: Any, evaluation: EvalData | None, holdout: float, seed: int, model: onnx.ModelProto, notes: list[str]
) -> tuple[Any, Any]:
    """(fit part, held-out part) of the calibration data: see `calib.split`."""
    if calibration is None or calibration.is_random or evaluation is not None:
        return calibration, None
    parts = split_holdout(calibration, holdout, seed, ir.static_batch(model))
    if parts.holdout is None:
        notes.extend(warned([
            "--holdout 0: the verdict is measured on samples the method fitted to; it is optimistic and proves little "
            "(give --eval data or a held-out fraction)"
        ]))
    else:
        log.info("calibration: %d samples fitted, %d held out for the verdict", parts.fit.num_samples, parts.holdout.num_samples)
    return parts.fit, parts.holdout


def search_part(
    evaluation: EvalData | None, held: Any, fit: Any, part: VerdictPart, seed: int, model: onnx.ModelProto
) -> tuple[EvalData | None, Any]:
    """The search's half of the held-out samples (`planning.parts`); a search needs held-out data."""
    if evaluation is None and held is None and fit is not None and not fit.is_random:
        raise UsageError("a search needs held-out samples: give --eval data or a --holdout above 0")
    static = ir.static_batch(model)
    if evaluation is not None:
        return eval_part(evaluation, part, seed, static), held
    return evaluation, held_part(held, part, seed, static)


def patterns(exclude: Sequence[str] | str) -> tuple[str, ...]:
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)  # a string is one pattern, not its characters


def checked_options(options: Options) -> list[str]:
    """Raise for bad options (see `methods.check_options`); log and return the warnings."""
    check_ratio(options.ratio)
    return warned(list(check_options(options)))


def calibration_of(
    options: Options, model: onnx.ModelProto, evaluation: EvalData | None, preprocess: Any
) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The calibration set (None without --calib) and the input shapes to trace with.

    A dynamic non-batch dim is never traced at 1: its size comes from --input-shape, else
    from the calibration data, else from the --eval data, else from --size (image inputs),
    else the run stops naming the flags.
    """
    from ..calib import input_specs, load_calibration

    user = dict(options.input_shapes)
    calibration = None
    if options.calib is not None and options.calib != "random":
        calibration = load_calibration(options.calib, input_specs(model, user), samples=options.calib_samples,
                                       seed=options.seed, preprocess=preprocess)
    shapes = resolve_input_shapes(model, user, calibration, evaluation, preprocess)
    if options.calib == "random":
        calibration = load_calibration("random", input_specs(model, shapes), samples=options.calib_samples, seed=options.seed)
    return calibration, shapes


def resolve_input_shapes(
    model: onnx.ModelProto, user: Mapping[str, tuple[int, ...]], calibration: Any = None,
    evaluation: EvalData | None = None, preprocess: Any = None,
) -> dict[str, tuple[int, ...]]:
    """Static shapes of the graph inputs (see `calibration_of` for where dynamic dims come from)."""
    shapes = ir.fixed_input_shapes(model, user)
    dynamic = ir.dynamic_non_batch_dims(model, user)
    for name, axes in dynamic.items():
        batch = shapes[name][:1]
        resolved: tuple[int, ...] | None = None
        where = ""
        if calibration is not None and name in calibration.sample_shapes:
            resolved, where = (*batch, *calibration.sample_shapes[name]), f"calibration data {calibration.source}"
        elif evaluation is not None and evaluation.input_name == name:
            resolved, where = (*batch, *evaluation.images.shape[1:]), "--eval data"
        elif preprocess is not None and getattr(preprocess, "size", None) and len(shapes[name]) == 4:
            hw_axes = (2, 3) if preprocess.layout == "NCHW" else (1, 2)
            if set(axes) <= set(hw_axes):
                dims = list(shapes[name])
                dims[hw_axes[0]], dims[hw_axes[1]] = preprocess.size
                resolved, where = tuple(dims), "--size"
        if resolved is None:
            text = ["?" if i in axes else str(d) for i, d in enumerate(shapes[name])]
            hint = " (or --size HxW for an image input)" if len(shapes[name]) == 4 else ""
            raise UsageError(
                f"input {name!r} has dynamic dims {'x'.join(text)}: give --input-shape {name}:{'x'.join(text).replace('?', 'N')} "
                f"with real sizes{hint}; tracing at size 1 would prune a different network"
            )
        log.info("input %r: dynamic dims %s set from %s: %s", name, axes, where, "x".join(map(str, resolved)))
        shapes[name] = resolved
    return shapes


@dataclass(eq=False)
class PrepareState:
    """What `prepare` knows so far: the request, then what the passes read and decide."""

    model: ModelLike
    path: str | None
    settings: RunSettings
    progress: Callable[[int, int], None] | None
    part: VerdictPart  # the verdict's samples measured now (other parts when a run asks)
    remember: bool  # the original's statistics kept in memory across runs
    clock: StageClock
    started: float
    original: onnx.ModelProto | None = None
    default: DefaultMethod | None = None
    spec: MethodSpec | None = None
    options: Options | None = None
    gates: Gates | None = None
    checked: list[str] | None = None  # the options' warnings
    evaluation: EvalData | None = None
    calibration: Any = None
    shapes_in: dict[str, tuple[int, ...]] | None = None
    fit: Any = None
    held: Any = None
    data_notes: list[str] | None = None
    prepared: PreparedRun | None = None


class LoadPass(Pass[PrepareState]):
    """The one parse of the input, checked (unless the default's load read it already)."""

    stage = Stage.LOAD
    requires = frozenset({"options"})
    ensures = frozenset({"original"})

    def applies(self, state: PrepareState) -> bool:
        return state.original is None

    def call(self, state: PrepareState) -> None:
        state.original = load_checked(state.model, state.path)


class LoadForDefaultPass(LoadPass):
    """Without ``--method`` but with data, the default depends on the model's kind: the run's one load happens
    first, before the settings are checked (and `LoadPass` then has nothing to do)."""

    requires = frozenset()

    def applies(self, state: PrepareState) -> bool:
        return state.settings.method is None and state.settings.calib is not None


class SettingsPass(Pass[PrepareState]):
    """The method named (the default chosen, with its reason) and every setting checked before any work: the
    options, the held-out fraction, data the method needs, labels and data the gates need, the ``--recover``
    extra."""

    ensures = frozenset({"spec", "options", "gates", "checked"})

    def call(self, state: PrepareState) -> None:
        settings, state.default = with_default_method(state.settings, state.original)
        state.settings = settings
        method, calib, eval_data = settings.method, settings.calib, settings.eval_data
        assert method is not None
        gates = settings.gates or Gates()
        spec = get_method(method)
        options = Options(
            method=method, ratio=settings.ratio, round_to=Rounding.of(settings.round_to),
            exclude=patterns(settings.exclude), input_shapes=dict(settings.input_shapes or {}), seed=settings.seed,
            criterion=settings.criterion or spec.default_criterion, calib=None if calib is None else str(calib),
            calib_samples=settings.calib_samples, batch_size=settings.batch_size, params=dict(settings.params or {}),
        )
        state.checked = checked_options(options)
        held_out_count(1, settings.holdout)  # the fraction is checked before any work
        if spec.needs_data and calib is None:
            raise CalibrationError(f"method {method!r} needs calibration data: pass --calib PATH (or --calib random)")
        if gates.max_drop is not None and eval_data is None:
            raise UsageError("--max-drop needs labelled --eval data (an .npz with the inputs and 'labels')")
        check_gates_have_data(gates, calib, eval_data)  # no random figure can pass a gate: refused before any work
        # checked before any work (a missing extra is a usage error); each run asks again with its own settings
        recover.requested(spec.params.parse(options.params), calib=options.calib, seed=options.seed,
                          batch_size=options.batch_size)
        state.spec, state.options, state.gates = spec, options, gates


class CalibrationPass(Pass[PrepareState]):
    """The ``--eval`` and calibration data loaded, the input shapes resolved, and the data split (seeded) into the
    part the method fits and the part the verdict is measured on."""

    stage = Stage.CALIBRATION
    requires = frozenset({"original", "options", "gates"})
    ensures = frozenset({"shapes_in", "data_notes"})

    def call(self, state: PrepareState) -> None:
        settings, original, options, gates = state.settings, state.original, state.options, state.gates
        assert original is not None and options is not None and gates is not None
        eval_data = settings.eval_data
        evaluation = load_eval(eval_data, original, settings.input_shapes) if eval_data is not None else None
        if evaluation is not None and evaluation.labels is None and gates.max_drop is not None:
            raise UsageError(f"--max-drop needs labelled --eval data: {eval_data} has no 'labels' "
                             "(--min-top1-agreement and --min-correlation need none)")
        calibration, state.shapes_in = calibration_of(options, original, evaluation, settings.preprocess)
        data_notes: list[str] = []
        state.fit, state.held = split_calibration(calibration, evaluation, settings.holdout, options.seed, original,
                                                  data_notes)
        state.evaluation, state.calibration, state.data_notes = evaluation, calibration, data_notes


class ReferencePass(Pass[PrepareState]):
    """The prepared run, and the original's outputs on the verdict's samples, measured before any pruning work (bad
    data fails first); `PreparedRun.measure` times them in the reference stage (a run asks for other parts)."""

    requires = frozenset({"original", "spec", "options", "gates", "checked", "shapes_in", "data_notes"})
    ensures = frozenset({"prepared"})

    def call(self, state: PrepareState) -> None:
        original, spec, options, gates = state.original, state.spec, state.options, state.gates
        assert original is not None and spec is not None and options is not None and gates is not None
        assert state.checked is not None and state.shapes_in is not None and state.data_notes is not None
        prepared = PreparedRun(
            state.model, state.path, original, spec, options, state.checked, state.data_notes, state.evaluation,
            state.calibration, state.shapes_in, state.fit, state.held, state.settings, gates, state.progress,
            state.started, state.clock, memo=calib_cache.Memo(original) if state.remember else None,
            default=state.default,
        )
        prepared.measure(state.part)
        state.prepared = prepared


class AnalysePass(Pass[PrepareState]):
    """The original normalised and traced once, with its parameters, MACs and size (block pruning changes the
    graph first: then each run traces its own)."""

    stage = Stage.TRACE
    requires = frozenset({"prepared"})

    def applies(self, state: PrepareState) -> bool:
        return state.prepared is not None and not state.prepared.spec.blocks_to_remove(state.prepared.options)

    def call(self, state: PrepareState) -> None:
        run = state.prepared
        assert run is not None
        exclude = run.options.exclude
        # the original was checked at load
        run.analysis = analyze_loaded(run.original, run.shapes_in, exclude, check=False, path=run.path)
        run.stats_before(run.analysis.input_shapes)
        run.excluded = unmatched_excludes([n.name for n in run.analysis.graph.nodes], exclude)


#: the passes of `prepare`, in order
PREPARE_PASSES: tuple[Pass[PrepareState], ...] = (
    LoadForDefaultPass(), SettingsPass(), LoadPass(), CalibrationPass(), ReferencePass(), AnalysePass(),
)


def prepare_run(model: ModelLike, settings: RunSettings, progress: Callable[[int, int], None] | None,
                part: VerdictPart, remember: bool) -> PreparedRun:
    """`PREPARE_PASSES` over `model` and `settings` (`api.prepare`)."""
    state = PrepareState(model, path_of(model), settings, progress, part, remember, StageClock(progress),
                         time.perf_counter())
    passes = PassManager(PREPARE_PASSES).run(state, state.clock)
    assert state.prepared is not None
    state.prepared.prepare_passes = passes
    return state.prepared
