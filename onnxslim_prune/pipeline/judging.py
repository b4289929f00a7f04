"""Judging a run: the onnxruntime sessions, the original's outputs, validation, the verdict and the timing.

The pipeline's judging passes (`pipeline.run`) and `prepare.PreparedRun.measure` call these; tests replace them here
(``monkeypatch.setattr(judging, "timed", ...)``). Nothing here knows a method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .. import ir
from ..calib import memory
from ..errors import CalibrationError
from ..judge import validate
from ..judge.evaluation import EvalData, accuracy_from, correct_of, eval_feeds, release_pages
from ..judge.latency import SPEED_FIGURES, Latency, gate_ratios
from ..judge.latency import measure as measure_latency
from ..judge.verdict import FUNCTION_UNKNOWN, Gates, Verdict, VerdictSource, class_score_outputs, classes_of, summarise

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Measure:
    """The verdict's samples and the original's outputs on them (computed before any pruning work)."""

    source: VerdictSource
    feeds: validate.Feeds
    reference: validate.HeldOutputs
    labels: np.ndarray | None = None
    correct_before: np.ndarray | None = None  # per sample, whether the original classifies it right (labelled data)
    sessions: Sessions | None = None  # the run's onnxruntime sessions, reused by the verdict
    #: fitted samples for the verdict's companion figures; the original's outputs on them follow the verdict's
    #: batches in `reference` (measured here too, so that no session of the original is needed beside the pruned one)
    fitted_feeds: tuple[dict[str, np.ndarray], ...] = ()


class Sessions:
    """The run's onnxruntime sessions: each model's is built once and reused.

    The original's is built from its file when it was given as one (nothing serialized),
    the pruned model's from the bytes that will be written. The original's is freed once its
    outputs are measured (those past the budget wait on disk, `validate.HeldOutputs`), so its
    weights are not held twice while pruning nor beside the pruned model's in the verdict. The
    speed measurement times sessions of its own (`timed`).
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
        """Hold `original` (`weightless`) instead of the loaded model: the session is built from the file."""
        assert self._path is not None
        self._model = original

    def done_with_original(self) -> None:
        """The original's outputs are measured: free its session."""
        self._original = None

    def close(self) -> None:
        self._original = self._pruned = self._pruned_model = self._pruned_bytes = None


def validated(original: onnx.ModelProto, pruned: onnx.ModelProto, sessions: Sessions) -> tuple[onnx.ModelProto, bytes | None]:
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


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
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


def timed(original: onnx.ModelProto, path: str | None, pruned: onnx.ModelProto, serialized: bytes | None,
           feed: Mapping[str, np.ndarray], gates: Gates) -> Latency:
    """Both models timed in single-threaded sessions by the calling thread's CPU time: the kernels' time, which
    other processes on a busy machine inflate far less than wall time (as ``--objective latency`` measures); the
    rounds stop once the speed gates are decided. The two sessions are built at once, one a core: onnxruntime builds
    a session without the GIL, and both are held together for the rounds anyway (VGG-16: 2.2 s instead of 2.8)."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="latency-session") as pool:
        building = pool.submit(validate.session, pruned, LATENCY_THREADS, serialized=serialized)
        before = validate.session(original, LATENCY_THREADS, path=path)
        after = building.result()
    return measure_latency(original, pruned, feed, sessions=(before, after), clock=time.thread_time,
                           threads=LATENCY_THREADS, decided_at=gate_ratios(gates))


def reference_outputs(
    original: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int, evaluation: EvalData | None,
    held: Any, fit: Any, progress: Callable[[int, int], None] | None, sessions: Sessions | None = None,
) -> Measure:
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
    feeds = bounded_batches(feeds, original, shapes)
    fitted: validate.Feeds = []
    if source.held_out and fit is not None and not fit.is_random:
        # the companion figures on fitted samples (never the verdict): the gap to the verdict shows overfitting
        fitted = validate.calibration_feeds(original, fit, FITTED_SAMPLES)
        fitted = bounded_batches(fitted, original, {k: v.shape for k, v in fitted[0].items()}) if fitted else fitted
    # held while they fit a share of the budget (the method's passes run while they are held), the rest on disk
    reference = validate.HeldOutputs(memory.calibration_budget() // REFERENCE_SHARE)
    hits: list[np.ndarray] = []
    done = 0
    own = sessions if sessions is not None else Sessions(original, None)
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
    return Measure(source, feeds, reference, labels, correct_before, sessions, tuple(fitted))


def bounded_batches(feeds: validate.Feeds, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> validate.Feeds:
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


def verdict_of(original: onnx.ModelProto, pruned: onnx.ModelProto, m: Measure, fit: Any, gates: Gates,
             progress: Callable[[int, int], None] | None = None) -> Verdict:
    sessions = m.sessions if m.sessions is not None else Sessions(original, None)
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


def warn_verdict(verdict: Verdict) -> None:
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


def latency_feed(m: Measure, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """One sample (one static batch) of the verdict's data: what an edge runtime runs."""
    first = m.feeds[0]
    keep = ir.static_batch(model) or 1
    return {k: np.ascontiguousarray(v[:keep]) for k, v in first.items()}
