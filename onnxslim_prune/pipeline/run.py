"""The passes of one run, from a prepared model to a judged one (`PreparedRun.run`).

    trace -> method -> (nothing pruned | apply -> finish) -> recover -> release the original
          -> validate -> verdict -> latency -> report

Each pass reads and writes one `RunState`; `RUN_PASSES` is their order and `PassManager` runs them
(`pipeline.core`). The stages the progress display names, and the report's stage seconds, are the passes'.
What the passes before the run did once for every run (load, check, calibration data, the original's outputs,
the trace of the original) is `pipeline.prepare`'s (`PREPARE_PASSES`).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import onnx

from .. import ir, recover
from ..analysis.apply import apply_plan
from ..analysis.model import Analysis, analyze_loaded, nothing_prunable_reason, unmatched_excludes
from ..analysis.plan import Plan
from ..calib import cache as calib_cache
from ..calib import memory
from ..channels import Trace
from ..graph import qdq
from ..judge import validate
from ..judge.latency import Latency, with_speed_gates
from ..judge.report import Report, group_rows
from ..judge.verdict import Gates, Verdict
from ..methods import reconstruct
from ..methods.base import Context, MethodOutcome, MethodSpec, Options
from ..methods.defaults import DefaultMethod
from ..planning.parts import VerdictPart
from ..progress import Stage, StageClock
from . import judging
from .core import Pass, PassManager, PassResult

if TYPE_CHECKING:
    from .prepare import PreparedRun

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunState:
    """What one run knows so far: set by `RunState.start`, then filled in by the passes."""

    prepared: PreparedRun
    options: Options
    notes: list[str]
    part: VerdictPart
    latency: bool
    consume: bool  # the last run: the prepared trace itself is pruned, the original's outputs closed after
    recovering: Any  # recover.RecoverSettings, None without --recover
    measure: judging.Measure
    sessions: judging.Sessions
    clock: StageClock
    started: float
    resources: ExitStack  # scratch files held from validation to the report
    #: the model the method prunes: the original, or the original with residual blocks removed
    working: onnx.ModelProto | None = None
    original: onnx.ModelProto | None = None  # the input; its weights are dropped once nothing reads them
    analysis: Analysis | None = None  # the working model's trace, with the graph the method rewrites
    trace: Trace | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    outcome: MethodOutcome | None = None  # the method's, until its notes are taken (its overrides and finish are freed)
    plan: Plan | None = None  # the groups' kept channels, for recovery and the report
    pruned: onnx.ModelProto | None = None
    unchanged: bool = False  # nothing was pruned: the written model is the input
    serialized: bytes | None = None
    verdict: Verdict | None = None
    timing: Latency | None = None
    report: Report | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the report's extra records (recovery's)

    @property
    def spec(self) -> MethodSpec:
        return self.prepared.spec

    @property
    def gates(self) -> Gates:
        return self.prepared.gates

    @classmethod
    def start(cls, prepared: PreparedRun, options: Options, notes: list[str], part: VerdictPart, latency: bool,
              consume: bool, resources: ExitStack) -> RunState:
        if consume:
            started, clock = prepared.started, prepared.clock
        else:
            started, clock = time.perf_counter(), StageClock(prepared.progress)
        recovering = recover.requested(prepared.spec.params.parse(options.params), calib=options.calib,
                                       seed=options.seed, batch_size=options.batch_size)
        measure = prepared.measure(part, clock)
        sessions = judging.Sessions(prepared.original, prepared.path)
        return cls(prepared, options, notes, part, latency, consume, recovering, replace(measure, sessions=sessions),
                   sessions, clock, started, resources, original=prepared.original)


class TracePass(Pass[RunState]):
    """The working model and its trace: residual blocks removed first (block pruning) and the result traced, or a
    copy of the prepared trace (each run rewrites its own graph; the last run takes the prepared one)."""

    stage = Stage.TRACE
    requires = frozenset({"original"})
    ensures = frozenset({"working", "analysis", "trace", "input_shapes"})

    def call(self, state: RunState) -> None:
        prepared, options, original = state.prepared, state.options, state.original
        assert original is not None
        memory.give_back()
        working = original
        block_fraction = state.spec.blocks_to_remove(options)
        if block_fraction:
            from ..methods.blocks import prune_blocks

            working, block_notes = prune_blocks(original, float(block_fraction), prepared.fit, prepared.shapes_in, options)
            state.notes.extend(block_notes)
        if prepared.analysis is None or block_fraction:
            # the original was checked at load; a block-pruned model is checked here
            analysis = analyze_loaded(working, prepared.shapes_in, options.exclude, check=working is not original,
                                      path=prepared.path if working is original else None)
            excluded = unmatched_excludes([n.name for n in analysis.graph.nodes], options.exclude)
        elif state.consume:
            analysis, prepared.analysis, excluded = prepared.analysis, None, prepared.excluded
        else:  # the method and apply rewrite the graph: each run prunes a copy
            analysis = replace(prepared.analysis, graph=ir.working_copy(prepared.analysis.graph))
            excluded = prepared.excluded
        state.notes.extend(analysis.notes)
        state.notes.extend(excluded)
        state.working, state.analysis = working, analysis
        state.trace, state.input_shapes = analysis.trace, dict(analysis.input_shapes)


class MethodPass(Pass[RunState]):
    """The method's plan (scores, statistics, selection) and, with calibration data, its refit."""

    stage = Stage.METHOD
    requires = frozenset({"working", "analysis"})
    ensures = frozenset({"outcome", "plan"})

    def call(self, state: RunState) -> None:
        prepared, analysis, settings = state.prepared, state.analysis, state.prepared.settings
        assert analysis is not None and state.working is not None
        ctx = Context(state.working, analysis.graph, analysis.trace, state.options, analysis.input_shapes,
                      analysis.opset, prepared.fit, prepared.progress)
        with memory.limited(settings.calib_memory), calib_cache.using(settings.cache), \
                calib_cache.remembered(prepared.memo):
            outcome = state.spec(ctx)
            if prepared.fit is not None:
                outcome = reconstruct.with_reconstruction(ctx, outcome)  # no-op with --no-reconstruct
        state.notes.extend(ctx.notes)
        state.outcome, state.plan = outcome, outcome.plan
        del ctx, outcome
        memory.give_back()


def _prunes(state: RunState) -> bool:
    outcome = state.outcome
    return outcome is not None and bool(outcome.plan.groups or outcome.overrides or outcome.finish is not None)


class NothingPrunedPass(Pass[RunState]):
    """An empty plan: the working model is the result, and a model that was not block-pruned says why."""

    requires = frozenset({"working", "trace"})
    ensures = frozenset({"pruned"})

    def applies(self, state: RunState) -> bool:
        return not _prunes(state)

    def call(self, state: RunState) -> None:
        assert state.trace is not None
        if state.working is state.original:
            reason = nothing_prunable_reason(state.trace, state.original)
            log.warning("nothing was pruned: %s; the model is written unchanged", reason)
            state.notes.append(f"nothing was pruned: {reason}")
        state.pruned = state.working


class ApplyPass(Pass[RunState]):
    """The plan written into the graph (initializers, attributes, shape constants) and exported."""

    stage = Stage.APPLY
    requires = frozenset({"working", "analysis", "outcome"})
    ensures = frozenset({"pruned"})

    def applies(self, state: RunState) -> bool:
        return _prunes(state)

    def call(self, state: RunState) -> None:
        analysis, outcome = state.analysis, state.outcome
        assert analysis is not None and outcome is not None and state.working is not None
        apply_plan(analysis.graph, analysis.trace, outcome.plan, analysis.opset, outcome.overrides)
        state.pruned = ir.to_model(analysis.graph, like=state.working)
        # the finish and everything after read the pruned model: the method's graph (a second copy of its
        # weights, a reference cycle) is freed first
        state.analysis = None
        del analysis
        memory.give_back()


class FinishPass(Pass[RunState]):
    """The method's work on the pruned model itself (a reconstruction after apply, a low-rank split)."""

    stage = Stage.RECONSTRUCT
    requires = frozenset({"pruned", "outcome"})
    ensures = frozenset({"pruned"})

    def applies(self, state: RunState) -> bool:
        return state.outcome is not None and state.outcome.finish is not None

    def call(self, state: RunState) -> None:
        settings, outcome = state.prepared.settings, state.outcome
        assert outcome is not None and outcome.finish is not None and state.pruned is not None
        with memory.limited(settings.calib_memory), calib_cache.using(settings.cache), \
                calib_cache.remembered(state.prepared.memo), ir.ScratchFile() as scratch:
            # a large model's weights wait in a temporary file while the finish holds them in its graph
            pruned = scratch.hold(state.pruned)
            state.pruned = None
            state.pruned = ir.materialized(outcome.finish(pruned))


class RecoverPass(Pass[RunState]):
    """``--recover``: gradient steps on each block's weights against the original's block outputs."""

    stage = Stage.RECOVER
    requires = frozenset({"original", "pruned", "trace", "plan"})
    ensures = frozenset({"pruned"})

    def applies(self, state: RunState) -> bool:
        return state.recovering is not None and state.pruned is not state.working and state.prepared.fit is not None

    def call(self, state: RunState) -> None:
        assert state.original is not None and state.pruned is not None and state.trace is not None
        assert state.plan is not None
        with memory.limited(state.prepared.settings.calib_memory):
            state.pruned, recovered, state.extra = recover.run(
                state.original, state.pruned, state.prepared.fit, state.recovering, state.prepared.progress,
                recover.kept_channels(state.trace, state.plan))
        state.notes.extend(recovered)


class ReleaseOriginalPass(Pass[RunState]):
    """The method's notes collected and the original's weights dropped: nothing after reads them (its sessions are
    built from its file), so a loaded model's weights are freed before the pruned model's bytes and session exist."""

    requires = frozenset({"original", "pruned", "outcome", "input_shapes"})

    def call(self, state: RunState) -> None:
        outcome, original, pruned = state.outcome, state.original, state.pruned
        assert outcome is not None and original is not None and pruned is not None and state.input_shapes is not None
        state.notes.extend(outcome.notes)
        state.notes.extend(qdq.report_notes(original, pruned))
        state.prepared.stats_before(state.input_shapes)  # measured (once) before the pruned model's bytes exist
        if state.prepared.path is not None and pruned is not original:
            original = judging.weightless(original)
            state.sessions.forget_weights(original)
        state.original = state.working = original
        # the method's overrides, its finish and (when nothing was pruned) its graph are not read again
        state.outcome = state.analysis = None
        del outcome
        memory.give_back()
        state.unchanged = pruned is original
        # a view of the input file (nothing pruned) is read back: the output holds its weights
        state.pruned = ir.materialized(pruned)


class ValidatePass(Pass[RunState]):
    """The pruned model checked (full checker, strict shapes, names, dtypes and shapes of the graph's inputs and
    outputs) and given to the run's sessions; a large one is held as a view of a copy until the report."""

    stage = Stage.VALIDATE
    requires = frozenset({"original", "pruned"})
    ensures = frozenset({"pruned"})

    def call(self, state: RunState) -> None:
        original, pruned = state.original, state.pruned
        assert original is not None and pruned is not None
        if pruned is not original and ir.payload_bytes(pruned) > judging.KEEP_BYTES_UP_TO:
            # held as a view of a copy through validation, the verdict and the timing (`judging.validated`): the
            # proto's weights are freed before the checker and the session read the copy
            state.pruned = None
            pruned = state.resources.enter_context(ir.ScratchFile()).hold(pruned)
            memory.give_back()
        state.pruned, state.serialized = judging.validated(original, pruned, state.sessions)


class VerdictPass(Pass[RunState]):
    """The verdict: both models' outputs compared on samples no fitting saw, and the gates."""

    stage = Stage.VERDICT
    requires = frozenset({"original", "pruned"})
    ensures = frozenset({"verdict"})

    def call(self, state: RunState) -> None:
        assert state.original is not None and state.pruned is not None
        with memory.limited(state.prepared.settings.calib_memory):
            state.verdict = judging.verdict_of(state.original, state.pruned, state.measure, state.prepared.fit,
                                               state.gates, state.prepared.progress)
        if state.consume:
            state.measure.reference.close()  # the last run: the original's outputs (and their folder on disk) go


class LatencyPass(Pass[RunState]):
    """Both models timed in the same run; the never-slower and speed-up gates join the verdict's."""

    stage = Stage.LATENCY
    requires = frozenset({"original", "pruned", "verdict"})
    ensures = frozenset({"timing", "verdict"})

    def applies(self, state: RunState) -> bool:
        return state.latency

    def call(self, state: RunState) -> None:
        original, pruned, verdict = state.original, state.pruned, state.verdict
        assert original is not None and pruned is not None and verdict is not None
        state.sessions.close()  # the verdict's sessions (all threads) are freed before the timed ones are built
        state.timing = judging.timed(original, state.prepared.path, pruned, state.serialized,
                                     judging.latency_feed(state.measure, original), state.gates)
        state.verdict = with_speed_gates(verdict, state.timing, state.gates, unchanged=state.unchanged)


class ReportPass(Pass[RunState]):
    """The pruned model's parameters, MACs and size, and the report of the run."""

    requires = frozenset({"pruned", "verdict", "trace", "plan", "input_shapes"})
    ensures = frozenset({"report", "pruned"})

    def call(self, state: RunState) -> None:
        pruned, verdict, plan, input_shapes = state.pruned, state.verdict, state.plan, state.input_shapes
        assert pruned is not None and verdict is not None and plan is not None and input_shapes is not None
        assert state.trace is not None
        prepared, options = state.prepared, state.options
        state.sessions.close()
        memory.give_back()  # the sessions' weights and arenas, before the model is read back
        # measured on the view: the shape run's session maps the copy, not a second set of weights beside the proto
        after = validate.model_stats(pruned, input_shapes,
                                     file_bytes=None if state.serialized is None else len(state.serialized))
        state.pruned = ir.materialized(pruned)  # read back before its file goes: the caller gets the model whole
        judging.warn_verdict(verdict)
        settings = prepared.settings
        report = Report(
            method=options.method,
            ratio=options.ratio,
            before=prepared.stats_before(input_shapes),
            after=after,
            verdict=verdict,
            groups=group_rows(state.trace, {g.group: g.kept for g in plan.groups}, options.round_to),
            seconds=0.0,
            notes=tuple(state.notes),
            request=request_words(state.spec, options),
            accuracy_before=verdict.accuracy_before,
            accuracy_after=verdict.accuracy_after,
            settings={**run_settings(options, settings.holdout, state.gates, settings.eval_data, settings.preprocess),
                      "calib_memory": settings.calib_memory,
                      **({} if state.part is VerdictPart.ALL else {"verdict_part": state.part.value})},
            input_path=None if isinstance(prepared.model, onnx.ModelProto) else str(prepared.model),
            latency=state.timing,
            stage_seconds=dict(state.clock.seconds),
            extra=state.extra,
        )
        state.report = replace(report, seconds=time.perf_counter() - state.started)


@dataclass(frozen=True, eq=False)
class PruneResult:
    model: onnx.ModelProto
    report: Report
    trace: Trace
    plan: Plan
    #: `model` serialized (what the verdict ran and `ir.save_model(..., serialized=)` writes); None past protobuf's limit
    #: and past `judging.KEEP_BYTES_UP_TO` (not held through the verdict: the writer serializes the model again)
    serialized: bytes | None = None
    #: the method chosen for a run that named none, and why (None: the method was named)
    default: DefaultMethod | None = None
    #: what each pass of the run did, in order (`RUN_PASSES`)
    passes: tuple[PassResult, ...] = ()


#: the passes of a run, in order
RUN_PASSES: tuple[Pass[RunState], ...] = (
    TracePass(), MethodPass(), NothingPrunedPass(), ApplyPass(), FinishPass(), RecoverPass(), ReleaseOriginalPass(),
    ValidatePass(), VerdictPass(), LatencyPass(), ReportPass(),
)


def run_prepared(prepared: PreparedRun, options: Options, notes: list[str], part: VerdictPart, latency: bool,
                 consume: bool) -> PruneResult:
    """`PreparedRun.run`: `RUN_PASSES` over a new `RunState` (scratch files held by a pass are gone after)."""
    with ExitStack() as resources:
        state = RunState.start(prepared, options, notes, part, latency, consume, resources)
        passes = PassManager(RUN_PASSES).run(state, state.clock)
    assert state.pruned is not None and state.report is not None and state.trace is not None and state.plan is not None
    return PruneResult(state.pruned, state.report, state.trace, state.plan, state.serialized, prepared.default, passes)


def run_settings(options: Options, holdout: float, gates: Gates, eval_data: Any, preprocess: Any) -> dict[str, Any]:
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


def request_words(spec: MethodSpec, options: Options) -> str:
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
