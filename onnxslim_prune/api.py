"""Python API: `analyze` (trace only) and `prune` (trace, plan, apply, validate).

    result = prune("model.onnx", method="l1", ratio=0.5)
    result.model   # onnx.ModelProto, validated
    result.report  # Report: params, MACs, the verdict, groups

    result = prune("model.onnx", RunSettings("ldrf", 0.5, calib="calib.npz"))  # the settings as one value
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from . import ir, recover, validate
from .graph import qdq
from .errors import CalibrationError, UsageError
from .calib import cache as calib_cache
from .calib import memory
from .calib.split import held_out_count, split_holdout
from .evaluation import EvalData, accuracy_from, correct_of, eval_feeds, load_eval, release_pages
from .latency import SPEED_FIGURES, Latency, with_speed_gates
from .latency import measure as measure_latency
from .methods import builtin  # noqa: F401  (fills the method registry)
from .methods.defaults import DefaultMethod, default_method
from .methods.base import Context, MethodSpec, Options, check_options, get_method
from .passes import reconstruct
from .passes.apply import apply_plan
from .passes.plan import Plan, check_ratio
from .channels import Trace
from .passes.trace import trace
from .planning.parts import VerdictPart
from .progress import Stage, StageClock
from .report import Report, group_rows
from .roundto import Rounding
from .settings import RunSettings
from .verdict import (FUNCTION_UNKNOWN, Gates, Verdict, VerdictSource, check_gates_have_data, class_score_outputs,
                      classes_of, summarise)

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class Analysis:
    model: onnx.ModelProto
    graph: Any  # gs.Graph, normalised; tracing never modifies it
    trace: Trace
    input_shapes: Mapping[str, tuple[int, ...]]
    opset: int
    #: what normalising did that a user should know (run-time shape reads folded)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class PruneResult:
    model: onnx.ModelProto
    report: Report
    trace: Trace
    plan: Plan
    #: `model` serialized (what the verdict ran and `ir.save_model(..., serialized=)` writes); None past protobuf's limit
    #: and past `KEEP_BYTES_UP_TO` (not held through the verdict: the writer serializes the model again)
    serialized: bytes | None = None
    #: the method chosen for a run that named none, and why (None: the method was named)
    default: DefaultMethod | None = None


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return ir.load_model(model)


def _path_of(model: ModelLike) -> str | None:
    """The file `model` was given as (its proto is then exactly the file: readers may read the file instead)."""
    return None if isinstance(model, onnx.ModelProto) else os.fspath(model)


def analyze(
    model: ModelLike,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    exclude: Sequence[str] = (),
) -> Analysis:
    """Load, check, normalise and trace; nothing is modified."""
    return _analyze(_load(model), input_shapes, exclude, path=_path_of(model))


def _analyze(
    proto: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None, exclude: Sequence[str], *,
    check: bool = True, path: str | None = None,
) -> Analysis:
    """`analyze` of a loaded model; `check=False` when the caller has run the checker on it already."""
    if check:
        ir.check_model(proto, full=False, what="input model", path=path)
    shapes_in = ir.fixed_input_shapes(proto, input_shapes)
    opset = ir.opset_version(proto)
    notes: list[str] = []
    graph = ir.to_graph(proto, source=path, input_shapes=shapes_in, notes=notes)
    # shape inference needs no weights: the folded graph's skeleton (the full export only if onnxruntime must run)
    skeleton = ir.export_skeleton(graph, proto)
    shapes = ir.static_shapes(skeleton, shapes_in, runnable=lambda: _export_plain(graph, proto))
    # graph-surgeon's graph copies (constant folding, the skeleton) are reference cycles that share the weight
    # arrays; collected now, not whenever the collector next runs, pruning cannot hold the unpruned weights twice
    memory.give_back()
    return Analysis(proto, graph, trace(graph, shapes, exclude, opset), shapes_in, opset, tuple(notes))


def _export_plain(graph: Any, like: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    out = gs.export_onnx(graph.copy(), do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    return out


@dataclass(frozen=True, eq=False)
class _Measure:
    """The verdict's samples and the original's outputs on them (computed before any pruning work)."""

    source: VerdictSource
    feeds: validate.Feeds
    reference: validate.HeldOutputs
    labels: np.ndarray | None = None
    correct_before: np.ndarray | None = None  # per sample, whether the original classifies it right (labelled data)
    sessions: _Sessions | None = None  # the run's onnxruntime sessions, reused by the verdict
    #: fitted samples for the verdict's companion figures; the original's outputs on them follow the verdict's
    #: batches in `reference` (measured here too, so that no session of the original is needed beside the pruned one)
    fitted_feeds: tuple[dict[str, np.ndarray], ...] = ()


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
    settings = RunSettings.of(method, ratio, **overrides)
    started = time.perf_counter()
    clock = StageClock(progress)
    path = _path_of(model)
    original: onnx.ModelProto | None = None
    if settings.method is None and settings.calib is not None:
        # the default with data depends on the model's kind: read from the run's one load, before the checks
        with clock.stage(Stage.LOAD):
            original = _load_checked(model, path)
    settings, chosen = with_default_method(settings, original)
    assert settings.method is not None
    method, calib, eval_data, seed, batch_size = (settings.method, settings.calib, settings.eval_data, settings.seed,
                                                  settings.batch_size)
    gates = settings.gates or Gates()
    spec = get_method(method)
    options = Options(
        method=method, ratio=settings.ratio, round_to=Rounding.of(settings.round_to), exclude=_patterns(settings.exclude),
        input_shapes=dict(settings.input_shapes or {}), seed=seed, criterion=settings.criterion or spec.default_criterion,
        calib=None if calib is None else str(calib), calib_samples=settings.calib_samples, batch_size=batch_size,
        params=dict(settings.params or {}),
    )
    exclude = options.exclude
    checked = _checked(options)
    held_out_count(1, settings.holdout)  # the fraction is checked before any work
    if spec.needs_data and calib is None:
        raise CalibrationError(f"method {method!r} needs calibration data: pass --calib PATH (or --calib random)")
    if gates.max_drop is not None and eval_data is None:
        raise UsageError("--max-drop needs labelled --eval data (an .npz with the inputs and 'labels')")
    check_gates_have_data(gates, calib, eval_data)  # no random figure can pass a gate: refused before any work
    # checked before any work (a missing extra is a usage error); each run asks again with its own settings
    recover.requested(spec.params.parse(options.params), calib=options.calib, seed=seed, batch_size=batch_size)
    if original is None:
        with clock.stage(Stage.LOAD):
            original = _load_checked(model, path)
    with clock.stage(Stage.CALIBRATION):
        evaluation = load_eval(eval_data, original, settings.input_shapes) if eval_data is not None else None
        if evaluation is not None and evaluation.labels is None and gates.max_drop is not None:
            raise UsageError(f"--max-drop needs labelled --eval data: {eval_data} has no 'labels' "
                             "(--min-top1-agreement and --min-correlation need none)")
        calibration, shapes_in = _calibration(options, original, evaluation, settings.preprocess)
        data_notes: list[str] = []
        fit, held = _split(calibration, evaluation, settings.holdout, seed, original, data_notes)
    run = PreparedRun(
        model, path, original, spec, options, checked, data_notes, evaluation, calibration, shapes_in, fit, held,
        settings, gates, progress, started, clock, memo=calib_cache.Memo(original) if remember else None,
        default=chosen,
    )
    run.measure(part)
    if not spec.blocks_to_remove(options):
        with clock.stage(Stage.TRACE):
            # the original was checked at load
            run.analysis = _analyze(original, shapes_in, exclude, check=False, path=path)
            run.stats_before(run.analysis.input_shapes)
        run.excluded = _unmatched_excludes([n.name for n in run.analysis.graph.nodes], exclude)
    return run


def _load_checked(model: ModelLike, path: str | None) -> onnx.ModelProto:
    """The one parse of the input: everything after reads this proto (or the file, in C++).

    A large model read from a file with its weights inside is held as a view of that file (`ir.file_view`):
    the weights the loaded proto held are freed, and the run's graph holds the only copy in memory.
    """
    original = _load(model)
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
    measures: dict[VerdictPart, _Measure] = field(default_factory=dict)  # the original's outputs per part
    #: the original's parameters, MACs and size at the traced input shapes, measured once
    before: dict[tuple[tuple[str, tuple[int, ...]], ...], validate.ModelStats] = field(default_factory=dict)

    def stats_before(self, input_shapes: Mapping[str, tuple[int, ...]]) -> validate.ModelStats:
        """`validate.model_stats` of the original, once per input shapes: measured while the run holds little (its
        shape reads run the whole model once), and not again by every run of a search."""
        key = tuple(sorted((name, tuple(shape)) for name, shape in input_shapes.items()))
        if key not in self.before:
            self.before[key] = validate.model_stats(self.original, input_shapes)
        return self.before[key]

    def measure(self, part: VerdictPart, clock: StageClock | None = None) -> _Measure:
        """The verdict's samples of `part` and the original's outputs on them, measured once."""
        if part not in self.measures:
            evaluation, held = self.evaluation, self.held
            if part is not VerdictPart.ALL:
                with (clock or self.clock).stage(Stage.CALIBRATION):
                    evaluation, held = _search_part(evaluation, held, self.fit, part, self.options.seed, self.original)
            sessions = _Sessions(self.original, self.path)
            with (clock or self.clock).stage(Stage.REFERENCE), memory.limited(self.settings.calib_memory):
                # the original's outputs need no pruning: measured first, so bad data (labels past the classes) fails
                # before the work
                measured = _reference(self.original, self.shapes_in, self.options.seed + part.seed_offset, evaluation,
                                      held, self.fit, self.progress, sessions)
            self.measures[part] = replace(measured, sessions=None)
        return self.measures[part]

    def run(self, params: Mapping[str, Any] | None = None, *, ratio: float | None = None,
            part: VerdictPart = VerdictPart.ALL, latency: bool | None = None, consume: bool = False) -> PruneResult:
        """Prune with the prepared settings, `params` (method settings, e.g. ``group_ratios``) and `ratio` replaced.

        `part`: the half of the held-out samples the verdict is measured on (`planning.parts`); `latency`: None keeps
        the prepared setting. `consume`: the traced graph itself is pruned (no copy; the last run, as `prune`'s).
        """
        return _run(self, params, ratio, part, latency, consume)


def _run(prepared: PreparedRun, params: Mapping[str, Any] | None, ratio: float | None, part: VerdictPart,
         latency: bool | None, consume: bool) -> PruneResult:
    """`PreparedRun.run`: the method, apply, validation, the verdict and the report (`prune`'s second half)."""
    if consume:
        started, clock = prepared.started, prepared.clock
    else:
        started, clock = time.perf_counter(), StageClock(prepared.progress)
    options, notes = prepared.options, list(prepared.checked)
    if params is not None or ratio is not None:
        options = replace(options, ratio=options.ratio if ratio is None else ratio,
                          params=options.params if params is None else {**options.params, **params})
        notes = _checked(options) if options != prepared.options else notes
    notes.extend(prepared.data_notes)
    spec, original, path, fit, gates = prepared.spec, prepared.original, prepared.path, prepared.fit, prepared.gates
    settings, progress = prepared.settings, prepared.progress
    calib_memory, cache, eval_data = settings.calib_memory, settings.cache, settings.eval_data
    latency = settings.latency if latency is None else latency
    recovering = recover.requested(spec.params.parse(options.params), calib=options.calib, seed=options.seed,
                                   batch_size=options.batch_size)
    measure = prepared.measure(part, clock)
    sessions = _Sessions(original, path)
    measure = replace(measure, sessions=sessions)
    shapes_in, exclude = prepared.shapes_in, options.exclude
    memory.give_back()
    working = original
    block_fraction = spec.blocks_to_remove(options)
    with clock.stage(Stage.TRACE):
        if block_fraction:
            from .passes.blocks import prune_blocks

            working, block_notes = prune_blocks(original, float(block_fraction), fit, shapes_in, options)
            notes.extend(block_notes)
        if prepared.analysis is None or block_fraction:
            # the original was checked at load; a block-pruned model is checked here
            analysis = _analyze(working, shapes_in, exclude, check=working is not original,
                                path=path if working is original else None)
            excluded = _unmatched_excludes([n.name for n in analysis.graph.nodes], exclude)
        elif consume:
            analysis, prepared.analysis, excluded = prepared.analysis, None, prepared.excluded
        else:  # the method and apply rewrite the graph: each run prunes a copy
            analysis, excluded = replace(prepared.analysis, graph=ir.working_copy(prepared.analysis.graph)), prepared.excluded
    graph = analysis.graph
    notes.extend(analysis.notes)
    notes.extend(excluded)
    ctx = Context(working, graph, analysis.trace, options, analysis.input_shapes, analysis.opset, fit, progress)
    with clock.stage(Stage.METHOD), memory.limited(calib_memory), calib_cache.using(cache), \
            calib_cache.remembered(prepared.memo):
        outcome = spec(ctx)
        if fit is not None:
            outcome = reconstruct.with_reconstruction(ctx, outcome)  # no-op with --no-reconstruct
    notes.extend(ctx.notes)
    traced, input_shapes = analysis.trace, analysis.input_shapes
    memory.give_back()
    if not outcome.plan.groups and not outcome.overrides and outcome.finish is None:
        if working is original:
            reason = nothing_prunable_reason(traced, original)
            log.warning("nothing was pruned: %s; the model is written unchanged", reason)
            notes.append(f"nothing was pruned: {reason}")
        pruned = working
    else:
        with clock.stage(Stage.APPLY):
            apply_plan(graph, analysis.trace, outcome.plan, analysis.opset, outcome.overrides)
            pruned = ir.to_model(graph, like=working)
        # the finish and everything after read the pruned model: the method's graph (a second copy of its
        # weights, a reference cycle) is freed first
        del graph, ctx, analysis
        memory.give_back()
        if outcome.finish is not None:
            with clock.stage(Stage.RECONSTRUCT), memory.limited(calib_memory), calib_cache.using(cache), \
                    calib_cache.remembered(prepared.memo), ir.ScratchFile() as scratch:
                # a large model's weights wait in a temporary file while the finish holds them in its graph
                pruned = scratch.hold(pruned)
                pruned = ir.materialized(outcome.finish(pruned))
    extra: dict[str, Any] = {}
    if recovering is not None and pruned is not working and fit is not None:
        with clock.stage(Stage.RECOVER), memory.limited(calib_memory):
            pruned, recovered, extra = recover.run(original, pruned, fit, recovering, progress,
                                                   recover.kept_channels(traced, outcome.plan))
        notes.extend(recovered)
    notes.extend(outcome.notes)
    notes.extend(qdq.report_notes(original, pruned))
    plan = outcome.plan
    before = prepared.stats_before(input_shapes)
    if path is not None and pruned is not original:
        # nothing after this reads the original's weights (its sessions are built from its file): a loaded
        # model's weights are freed before the pruned model's bytes and session exist beside them
        original = _weightless(original)
        sessions.forget_weights(original)
    working = original
    del outcome
    memory.give_back()
    unchanged = pruned is original
    pruned = ir.materialized(pruned)  # a view of the input file (nothing pruned) is read back: the output holds its weights
    with ir.ScratchFile() as held:
        with clock.stage(Stage.VALIDATE):
            if pruned is not original and ir.payload_bytes(pruned) > KEEP_BYTES_UP_TO:
                # held as a view of a copy through validation, the verdict and the timing (`_validated`): the
                # proto's weights are freed before the checker and the session read the copy
                pruned = held.hold(pruned)
                memory.give_back()
            pruned, serialized = _validated(original, pruned, sessions)
        with clock.stage(Stage.VERDICT), memory.limited(calib_memory):
            verdict = _verdict(original, pruned, measure, fit, gates, progress)
        if consume:
            measure.reference.close()  # the last run: the original's outputs (and their folder on disk) are not read again
        timing = None
        if latency:
            with clock.stage(Stage.LATENCY):
                sessions.close()  # the verdict's sessions (all threads) are freed before the timed ones are built
                timing = _timed(original, path, pruned, serialized, _latency_feed(measure, original), gates)
            verdict = with_speed_gates(verdict, timing, gates, unchanged=unchanged)
        sessions.close()
        memory.give_back()  # the sessions' weights and arenas, before the model is read back
        # measured on the view: the shape run's session maps the copy, not a second set of weights beside the proto
        after = validate.model_stats(pruned, input_shapes, file_bytes=None if serialized is None else len(serialized))
        pruned = ir.materialized(pruned)  # read back before its file goes: the caller gets the model whole
    _warn_verdict(verdict)
    report = Report(
        method=options.method,
        ratio=options.ratio,
        before=before,
        after=after,
        verdict=verdict,
        groups=group_rows(traced, {g.group: g.kept for g in plan.groups}, options.round_to),
        seconds=0.0,
        notes=tuple(notes),
        request=_request(spec, options),
        accuracy_before=verdict.accuracy_before,
        accuracy_after=verdict.accuracy_after,
        settings={**_settings(options, settings.holdout, gates, eval_data, settings.preprocess), "calib_memory": calib_memory,
                  **({} if part is VerdictPart.ALL else {"verdict_part": part.value})},
        input_path=None if isinstance(prepared.model, onnx.ModelProto) else str(prepared.model),
        latency=timing,
        stage_seconds=dict(clock.seconds),
        extra=extra,
    )
    report = replace(report, seconds=time.perf_counter() - started)
    return PruneResult(pruned, report, traced, plan, serialized, prepared.default)


class _Sessions:
    """The run's onnxruntime sessions: each model's is built once and reused.

    The original's is built from its file when it was given as one (nothing serialized),
    the pruned model's from the bytes that will be written. The original's is freed once its
    outputs are measured (those past the budget wait on disk, `validate.HeldOutputs`), so its
    weights are not held twice while pruning nor beside the pruned model's in the verdict. The
    speed measurement times sessions of its own (`_timed`).
    """

    def __init__(self, original: onnx.ModelProto, path: str | None) -> None:
        self._model, self._path = original, path
        self._original: Any = None
        self._pruned: Any = None
        self._pruned_model: onnx.ModelProto | None = None
        self._pruned_bytes: bytes | None = None

    def original(self) -> Any:
        if self._original is None:
            self._original = validate.open_session(self._model, "input model", path=self._path)
        return self._original

    def use_pruned(self, model: onnx.ModelProto, serialized: bytes | None) -> None:
        """The pruned model and its bytes (`ir.serialize`), from which its session is built."""
        self._pruned_model, self._pruned_bytes, self._pruned = model, serialized, None

    def use_bytes(self, serialized: bytes | None) -> None:
        """Forget (None) the pruned model's bytes: its session, if built, stays."""
        self._pruned_bytes = serialized

    def pruned(self, model: onnx.ModelProto | None = None) -> Any:
        if model is not None and model is not self._pruned_model:
            self.use_pruned(model, None)
        if self._pruned is None:
            assert self._pruned_model is not None
            self._pruned = validate.open_session(self._pruned_model, "pruned model", serialized=self._pruned_bytes)
        return self._pruned

    def forget_weights(self, original: onnx.ModelProto) -> None:
        """Hold `original` (`_weightless`) instead of the loaded model: the session is built from the file."""
        assert self._path is not None
        self._model = original

    def done_with_original(self) -> None:
        """The original's outputs are measured: free its session."""
        self._original = None

    def close(self) -> None:
        self._original = self._pruned = self._pruned_model = self._pruned_bytes = None


def _validated(original: onnx.ModelProto, pruned: onnx.ModelProto, sessions: _Sessions) -> tuple[onnx.ModelProto, bytes | None]:
    """`pruned` checked (`validate.check_structure`) and given to `sessions`; returns it and its bytes for the writer.

    A view of a whole copy of the model (`ir.ScratchFile.hold`: a model past `KEEP_BYTES_UP_TO`) is checked from
    that file and its session maps it: its proto holds none of the weights beside the session through the verdict
    and the timing (no bytes are kept: the writer serializes the model again).
    """
    file = ir.view_file(pruned) if pruned is not original else None
    if file is not None:
        validate.check_structure(original, pruned, path=file)
        sessions.use_pruned(pruned, None)
        sessions.pruned()
        return pruned, None
    # serialized once: the checker, onnxruntime, the file size and the written file all take these bytes
    serialized = ir.serialize(pruned)
    validate.check_structure(original, pruned, serialized=serialized)
    sessions.use_pruned(pruned, serialized)
    if serialized is not None and len(serialized) > KEEP_BYTES_UP_TO:
        # not held beside the proto and session through the verdict: the session is built now, and the writer
        # serializes the proto again (the same bytes)
        sessions.pruned()
        serialized = None
        sessions.use_bytes(None)
        memory.give_back()
    return pruned, serialized


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every initializer's name, type and dims but none of its values (the graph as it is).

    What the run reads of the original once the method is done (its inputs, outputs, nodes and the
    initializers' names) is there; its parameters, MACs and size are measured before.
    """
    out = ir.without_initializers(model)
    for init in model.graph.initializer:
        out.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return out


#: a pruned model's bytes are kept for the writer (and returned in `PruneResult.serialized`) up to this size
KEEP_BYTES_UP_TO = 256 << 20

#: intra-op threads of the speed measurement: one thread's kernels, timed by their CPU time (`latency` module)
LATENCY_THREADS = 1


def _timed(original: onnx.ModelProto, path: str | None, pruned: onnx.ModelProto, serialized: bytes | None,
           feed: Mapping[str, np.ndarray], gates: Gates) -> Latency:
    """Both models timed in single-threaded sessions by the calling thread's CPU time: the kernels' time, which
    other processes on a busy machine inflate far less than wall time (as ``--objective latency`` measures); the
    rounds stop once the speed gates are decided."""
    from .latency import gate_ratios

    before = validate.session(original, LATENCY_THREADS, path=path)
    after = validate.session(pruned, LATENCY_THREADS, serialized=serialized)
    return measure_latency(original, pruned, feed, sessions=(before, after), clock=time.thread_time,
                           threads=LATENCY_THREADS, decided_at=gate_ratios(gates))


def _settings(options: Options, holdout: float, gates: Gates, eval_data: Any, preprocess: Any) -> dict[str, Any]:
    """Every setting of the run, as plain JSON data (the report records them)."""
    data: dict[str, Any] = asdict(options)
    data["round_to"] = options.round_to.multiple
    data["round_to_auto"] = options.round_to.adaptive
    data["exclude"] = list(options.exclude)
    data["input_shapes"] = {k: list(v) for k, v in options.input_shapes.items()}
    data.update(holdout=holdout, eval=None if eval_data is None else str(eval_data), gates=asdict(gates))
    if preprocess is not None and options.calib not in (None, "random") and os.path.isdir(str(options.calib)):
        data["preprocess"] = asdict(preprocess)
    return data


def _split(
    calibration: Any, evaluation: EvalData | None, holdout: float, seed: int, model: onnx.ModelProto, notes: list[str]
) -> tuple[Any, Any]:
    """(fit part, held-out part) of the calibration data: see `calib.split`."""
    if calibration is None or calibration.is_random or evaluation is not None:
        return calibration, None
    parts = split_holdout(calibration, holdout, seed, ir.static_batch(model))
    if parts.holdout is None:
        notes.extend(_warned([
            "--holdout 0: the verdict is measured on samples the method fitted to; it is optimistic and proves little "
            "(give --eval data or a held-out fraction)"
        ]))
    else:
        log.info("calibration: %d samples fitted, %d held out for the verdict", parts.fit.num_samples, parts.holdout.num_samples)
    return parts.fit, parts.holdout


def _search_part(
    evaluation: EvalData | None, held: Any, fit: Any, part: VerdictPart, seed: int, model: onnx.ModelProto
) -> tuple[EvalData | None, Any]:
    """The search's half of the held-out samples (`planning.parts`); a search needs held-out data."""
    from .planning.parts import eval_part, held_part

    if evaluation is None and held is None and fit is not None and not fit.is_random:
        raise UsageError("a search needs held-out samples: give --eval data or a --holdout above 0")
    static = ir.static_batch(model)
    if evaluation is not None:
        return eval_part(evaluation, part, seed, static), held
    return evaluation, held_part(held, part, seed, static)


def _reference(
    original: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int, evaluation: EvalData | None,
    held: Any, fit: Any, progress: Callable[[int, int], None] | None, sessions: _Sessions | None = None,
) -> _Measure:
    """The verdict's samples and the original's outputs on them."""
    labels = None
    if evaluation is not None:
        source = VerdictSource.EVAL
        feeds, labels = eval_feeds(evaluation, original)
    elif held is not None:
        source, feeds = VerdictSource.CALIB_HOLDOUT, validate.calibration_feeds(original, held)
    elif fit is not None and not fit.is_random:
        source, feeds = VerdictSource.CALIB_FIT, validate.calibration_feeds(original, fit, FITTED_SAMPLES * 2)
    else:
        source, feeds = VerdictSource.RANDOM, validate.random_feeds(original, shapes, seed, validate.random_samples_for(original))
    if not feeds:
        raise CalibrationError("no samples to measure the verdict on (a static batch larger than the data?)")
    feeds = _bounded_batches(feeds, original, shapes)
    fitted: validate.Feeds = []
    if source.held_out and fit is not None and not fit.is_random:
        # the companion figures on fitted samples (never the verdict): the gap to the verdict shows overfitting
        fitted = validate.calibration_feeds(original, fit, FITTED_SAMPLES)
        fitted = _bounded_batches(fitted, original, {k: v.shape for k, v in fitted[0].items()}) if fitted else fitted
    # held while they fit a share of the budget (the method's passes run while they are held), the rest on disk
    reference = validate.HeldOutputs(memory.calibration_budget() // REFERENCE_SHARE)
    hits: list[np.ndarray] = []
    done = 0
    own = sessions if sessions is not None else _Sessions(original, None)
    for index, feed in enumerate(feeds, start=1):
        outputs = validate.outputs_of(original, [feed], "input model", sess=own.original(), shrink=True)[0]
        if labels is not None:  # checks the labels before the work
            hits.append(correct_of([outputs], labels[done : done + validate.feed_samples([feed])]))
        done += validate.feed_samples([feed])
        reference.add(outputs)
        del outputs
        for array in feed.values():
            release_pages(array)
        if progress is not None:
            progress(index, len(feeds))
    for feed in fitted:
        reference.add(validate.outputs_of(original, [feed], "input model", sess=own.original(), shrink=True)[0])
    own.done_with_original()
    if reference.kept < len(reference):
        log.info("verdict: the original's outputs on %d of %d batches are held (%d MiB), %d MiB on disk",
                 reference.kept, len(reference), reference.nbytes >> 20, reference.spilled_bytes >> 20)
    correct_before = None if labels is None else np.concatenate(hits)
    return _Measure(source, feeds, reference, labels, correct_before, sessions, tuple(fitted))


def _bounded_batches(feeds: validate.Feeds, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> validate.Feeds:
    """`feeds` split so that one batch's activations and outputs fit `VERDICT_BATCH_SHARE` of the budget.

    Only a dynamic batch is split, and only when a batch is over the share (EfficientNet-Lite1's
    --eval batches of 256 hold about 3 GB in onnxruntime, a language model's 32 windows 0.8 GB of
    logits): within the share the batches, and so the verdict's numbers, are unchanged.
    """
    if ir.static_batch(model) is not None:
        return feeds
    largest = max(validate.feed_samples([f]) for f in feeds)
    cost = memory.sample_cost(model, shapes)
    if cost is None:
        return feeds
    most = cost.samples_within(memory.calibration_budget() // VERDICT_BATCH_SHARE)
    if most >= largest:
        return feeds
    log.info("verdict: batches of %d samples (about %d MiB a sample, within %d MiB)", most,
             (cost.working + cost.outputs) >> 20, memory.calibration_budget() // VERDICT_BATCH_SHARE >> 20)
    return validate.rebatched(feeds, most)


#: the verdict's batches take at most this share of the budget (1 / share) ...
VERDICT_BATCH_SHARE = 2
#: ... and the original's outputs held for it at most this one (the rest are recomputed)
REFERENCE_SHARE = 8

#: fitted samples the verdict's companion figures are measured on (never the verdict)
FITTED_SAMPLES = 32


def _verdict(original: onnx.ModelProto, pruned: onnx.ModelProto, m: _Measure, fit: Any, gates: Gates,
             progress: Callable[[int, int], None] | None = None) -> Verdict:
    sessions = m.sessions if m.sessions is not None else _Sessions(original, None)
    pruned_session = sessions.pruned(pruned)
    # one batch of each model's outputs at a time: the original's are held or read back from disk (`HeldOutputs`)
    acc = validate.AgreementOf(original, pruned)
    hits: list[np.ndarray] = []
    done = 0
    for index, feed in enumerate(m.feeds, start=1):
        outputs = validate.outputs_of(pruned, [feed], "pruned model", sess=pruned_session, shrink=True)[0]
        acc.add(m.reference.get(index - 1), outputs, feed)
        if m.labels is not None:
            count = validate.feed_samples([feed])
            hits.append(correct_of([outputs], m.labels[done : done + count]))
            done += count
        del outputs
        for array in feed.values():
            release_pages(array)
        if progress is not None:
            progress(index, len(m.feeds))
    agreement = acc.results()
    accuracy_after = discordant = None
    if m.correct_before is not None and m.labels is not None:
        before, after = m.correct_before, np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
        accuracy_after = accuracy_from(after)
        discordant = (int(np.sum(before & ~after)), int(np.sum(after & ~before)))
    fitted: tuple[Any, ...] = ()
    if m.fitted_feeds:
        # the same figures on samples the method fitted to (their reference follows the verdict's batches)
        companion = validate.AgreementOf(original, pruned)
        for index, feed in enumerate(m.fitted_feeds, start=len(m.feeds)):
            outputs = validate.outputs_of(pruned, [feed], "pruned model", sess=pruned_session, shrink=True)[0]
            companion.add(m.reference.get(index), outputs, feed)
            del outputs
        fitted = companion.results()
    shapes = {o.name: shape for o, shape in zip(original.graph.output, m.reference.first_shapes)}
    accuracy_before = None if m.correct_before is None else accuracy_from(m.correct_before)
    return summarise(m.source, validate.feed_samples(m.feeds), agreement, accuracy_before=accuracy_before,
                     accuracy_after=accuracy_after, classes=classes_of(shapes), gates=gates, fitted=fitted,
                     discordant=discordant, class_outputs=class_score_outputs(original))


def _warn_verdict(verdict: Verdict) -> None:
    if not verdict.function_known:
        log.warning("%s: %d seeded samples prove that the pruned model runs, not that it still works "
                    "(give --calib or --eval data for a verdict)", FUNCTION_UNKNOWN, verdict.samples)
    if verdict.degraded:
        log.warning("the pruned model is DEGRADED on %d %s: %s", verdict.samples, verdict.source.description,
                    "; ".join(verdict.degraded_reasons))
    for gate in verdict.gates:
        if not gate.passed:
            log.warning("gate missed: %s", gate.message)
    if any(g.figure not in SPEED_FIGURES for g in verdict.gates) and not verdict.held_out:
        log.warning("the gates were checked on %s, not on held-out data", verdict.source.description)
    if verdict.imprecise and verdict.source is not VerdictSource.RANDOM:
        log.warning("the verdict rests on %d samples; 95%% intervals: %s. About %d held-out samples give +-5 points "
                    "(--eval, or more --calib)", verdict.samples, "; ".join(verdict.imprecise), verdict.advised_samples)


def _latency_feed(m: _Measure, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """One sample (one static batch) of the verdict's data: what an edge runtime runs."""
    first = m.feeds[0]
    keep = ir.static_batch(model) or 1
    return {k: np.ascontiguousarray(v[:keep]) for k, v in first.items()}


def _patterns(exclude: Sequence[str] | str) -> tuple[str, ...]:
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)  # a string is one pattern, not its characters


def _checked(options: Options) -> list[str]:
    """Raise for bad options (see `methods.check_options`); log and return the warnings."""
    check_ratio(options.ratio)
    return _warned(list(check_options(options)))


def _warned(messages: list[str]) -> list[str]:
    """Log each warning; the same lines go into the report's notes."""
    for message in messages:
        log.warning("%s", message)
    return messages


def _request(spec: MethodSpec, options: Options) -> str:
    """The report's words for what was asked, when it is not a uniform ratio."""
    if spec.request is not None:
        return spec.request(options)
    params = options.params
    targets = [f"{name} {params[key]:g}" for key, name in (("target_macs", "MACs"), ("target_params", "params"))
               if params.get(key) is not None]
    if spec.default_macs is not None and not targets:
        targets = [f"MACs {spec.default_macs(options.ratio):g}"]
    also = f", residual blocks {params['blocks']:g}" if params.get("blocks") else ""
    return f"target {' and '.join(targets)}{also}" if targets else (f"ratio {options.ratio:g}{also}" if also else "")


def _unmatched_excludes(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """A warning for each --exclude pattern that names no node (a typo protects nothing)."""
    from fnmatch import fnmatchcase

    return _warned([f"--exclude {p!r} matches no node name" for p in patterns if not any(fnmatchcase(n, p) for n in names)])


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
    proto = _load(model) if settings.method is None and settings.calib is not None else None
    settings, chosen = with_default_method(settings, proto)
    assert settings.method is not None
    spec = get_method(settings.method)
    options = Options(method=settings.method, ratio=settings.ratio, round_to=Rounding.of(settings.round_to),
                      exclude=_patterns(settings.exclude), seed=settings.seed,
                      criterion=settings.criterion or spec.default_criterion, params=dict(settings.params or {}))
    _checked(options)
    if proto is None:
        proto = _load(model)
    shapes = resolve_input_shapes(proto, dict(settings.input_shapes or {}), preprocess=settings.preprocess)
    analysis = _analyze(proto, shapes, options.exclude, path=_path_of(model))
    _unmatched_excludes([n.name for n in analysis.graph.nodes], options.exclude)
    if not spec.plan_only:
        return DryRun(analysis, None, settings.method, chosen)
    ctx = Context(analysis.model, analysis.graph, analysis.trace, options, analysis.input_shapes, analysis.opset)
    return DryRun(analysis, spec.plan(ctx), settings.method, chosen)


#: QOperator ops of quantized models: not pruned (`ops.quant`; QDQ weights are, see `graph.qdq`)
QUANTIZED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
                           "QGemm", "QLinearAdd", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The QOperator op types of `model`'s graph, if any."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})


def nothing_prunable_reason(tr: Trace, model: onnx.ModelProto | None = None) -> str:
    quantized = quantized_ops(model) if model is not None else []
    if quantized and not any(not g.is_frozen for g in tr.groups):
        return (f"the model is quantized in QOperator form ({', '.join(quantized)}), which is not pruned: quantize "
                "with QuantFormat.QDQ (its weights are pruned), or prune the float model and quantize it afterwards")
    if not tr.groups:
        return "no Conv, Gemm or MatMul with constant weights was found"
    reasons = sorted({r for g in tr.groups for r in g.reasons})
    if all(g.is_frozen for g in tr.groups):
        return "every channel group is frozen (" + "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "") + ")"
    return "the ratio removes no channel from any group"


def _calibration(
    options: Options, model: onnx.ModelProto, evaluation: EvalData | None, preprocess: Any
) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The calibration set (None without --calib) and the input shapes to trace with.

    A dynamic non-batch dim is never traced at 1: its size comes from --input-shape, else
    from the calibration data, else from the --eval data, else from --size (image inputs),
    else the run stops naming the flags.
    """
    from .calib import input_specs, load_calibration

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
    """Static shapes of the graph inputs (see `_calibration` for where dynamic dims come from)."""
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
