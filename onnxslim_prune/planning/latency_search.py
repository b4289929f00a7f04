"""``--objective latency``: the least-pruned model whose *measured* onnxruntime latency meets a target.

Budget. The search walks one global budget ``s``, the share of the original's MACs to remove,
with the allocation of the gated search (`planning.search`):

* `Allocation.SENSITIVITY` (calibration or ``--eval`` data): the greedy order of the sensitivity
  profile; ``s`` takes the shortest prefix of steps whose summed single-group MACs savings reach
  ``s`` (so ``s`` is close to the MACs actually removed);
* `Allocation.RANKING` (the default without data: a data-free profile would cost a probe per
  group and ratio and rank on random inputs): the global normalised ranking under ``--target-macs 1 - s``;
* `Allocation.DAMAGE` (``auto`` for a method whose budget is shared by predicted damage, `search.resolved`): the
  method's own ``--target-macs 1 - s``, as with RANKING, with no profile probes.

Each probe is one `api.prune` run (validated like any output: a probe that fails validation is
skipped, never written) followed by a latency measurement of the probe against the original:
interleaved rounds, median of each, one sample of the calibration shapes (`latency.measure`), with
``intra_op_num_threads = 1`` and each run timed by the CPU time of the calling thread (`Clock`): the
kernels' time, which other processes on the machine do not inflate as they do wall time (`Clock.WALL`
is the alternative for a quiet machine). ``r(s)`` = pruned / original latency.

Search (``--target-latency F``). ``r`` falls with ``s`` but is noisy and not linear (channel
multiples, per-op overhead), so the budget is bracketed between a probe that is too slow
(``r > F``; at first the original, ``s = 0, r = 1``) and one that meets the target, and the next
``s`` is the linear interpolation of the two towards the aim ``F (1 - TOLERANCE / 2)``, kept at
least a tenth of the bracket from its ends; after two probes on the same side of the target the
next one halves the bracket instead (the Illinois-like guard against a stalling end: latency is a
staircase in the channel counts). Before a fast probe exists the line through the original and the
slow probe is extrapolated (first probe: ``s = 1 - F``). It stops when a probe meets the target
within ``TOLERANCE`` below it, when the bracket is narrower than ``RESOLUTION``, or after
``--max-probes`` probes. The written model is the probe that met the target with the most MACs
kept.

Gates. With ``--max-drop`` / ``--min-*`` a probe must also pass the gate (on the selection half,
as in the gated search; gates need real samples, `verdict.check_gates_have_data`). Without a target the search is the gate's bisection over ``s`` and writes
the *fastest* probe that passes; with a target, when the probe meeting it misses the gate, the gate
is bisected below it and the fastest passing probe is written with a warning that the target is
out of reach within the gate.

Never slower. The written model is measured once more against the original in the same run
(the report's latency) and the speed gates of every run are checked on that measurement
(`latency.speed_gates`: not slower, ``--min-speedup``): a missed one is a missed gate (exit 3, not
written without ``--keep-failed``). When no probe is faster than the original, the original is
written unchanged with a warning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any


from ..errors import UsageError, ValidationError
from ..roundto import Rounding
from ..judge.latency import Latency, with_speed_gates
from ..judge.latency import measure as measure_latency
from ..judge.verdict import Gates
from .parts import VerdictPart
from .search import (
    LONG_SECONDS, Allocation, Measurement, Objective, Probe, Prober, SearchOutcome, SearchSettings, SensitivityRow, Step, _duration,
    _quiet, _with_search_report, allocation_at, baseline, check_searchable, greedy_steps, resolved, sensitivity,
)

log = logging.getLogger(__name__)

#: a probe meeting the target within this fraction below it ends the search (the aim is half of it below)
TOLERANCE = 0.08
#: the search stops when the bracket of the budget is narrower than this (share of MACs)
RESOLUTION = 0.005
#: the largest share of MACs the ranking allocation is asked to remove
MAX_SHARE = 0.95
#: intra-op threads of the latency sessions (1: the kernels' time, less disturbed by other processes)
DEFAULT_THREADS = 1



class Clock(str, Enum):
    """What times each run of a latency measurement."""

    #: CPU time of the calling thread (`time.thread_time`): with one intra-op thread the whole run, and not the
    #: time other processes hold the core (on a loaded 2-core machine wall-clock ratios of one pair swung 0.58-0.79
    #: between repeats, CPU-time ratios 0.655-0.666)
    THREAD_CPU = "thread-cpu"
    WALL = "wall"  # `time.perf_counter`: what a user waits for; needs a quiet machine

    def function(self) -> Callable[[], float]:
        return time.thread_time if self is Clock.THREAD_CPU else time.perf_counter


#: measures a probe against the original: the probe's result -> `Latency` (injected by tests: no timing)
Meter = Callable[[Any], Latency]


@dataclass(frozen=True)
class LatencySettings:
    """The latency objective of a search (``--target-latency``; None: the fastest model within the gate)."""

    target: float | None = None
    threads: int = DEFAULT_THREADS
    tolerance: float = TOLERANCE
    clock: Clock = Clock.THREAD_CPU

    def __post_init__(self) -> None:
        if self.target is not None and not (math.isfinite(self.target) and 0.0 < self.target < 1.0):
            raise UsageError(f"--target-latency must be a fraction in (0, 1) of the original's latency, got {self.target!r}")
        if self.threads < 0:
            raise UsageError(f"latency threads must be >= 0, got {self.threads}")
        if self.clock is Clock.THREAD_CPU and self.threads != 1:
            raise UsageError("the thread CPU clock times single-threaded sessions only: threads=1, or Clock.WALL")
        if not 0.0 < self.tolerance < 1.0:
            raise UsageError(f"the latency tolerance must be in (0, 1), got {self.tolerance}")

    @property
    def aim(self) -> float | None:
        return None if self.target is None else self.target * (1.0 - self.tolerance / 2.0)


class InterleavedMeter:
    """`latency.measure` of a probe against the original: one session of the original reused, `threads` intra-op threads."""

    def __init__(self, prober: Prober, threads: int = DEFAULT_THREADS, clock: Clock = Clock.THREAD_CPU) -> None:
        self.prober, self.threads, self.clock = prober, threads, clock
        self._original: Any = None
        self._feed: dict[str, Any] | None = None

    def feed(self) -> dict[str, Any]:
        """One sample (one static batch) of the probes' verdict data: the shapes of the calibration or inputs."""
        if self._feed is None:
            from ..pipeline import judging

            measures = self.prober.prepared().measures
            measured = measures.get(VerdictPart.SELECTION) or measures.get(VerdictPart.FINAL)
            if measured is None:
                raise UsageError("latency is measured after a probe has run (its verdict data gives the shapes)")
            self._feed = judging.latency_feed(measured, self.prober.model)
        return self._feed

    def __call__(self, result: Any) -> Latency:
        from ..judge import validate

        if self._original is None:
            self._original = validate.session(self.prober.model, self.threads)
        pruned = validate.session(result.model, self.threads, serialized=result.serialized)
        return measure_latency(self.prober.model, result.model, self.feed(), sessions=(self._original, pruned),
                               clock=self.clock.function(), threads=self.threads)


# ----------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """The global budget ``s`` (share of MACs to remove) as probe settings (module docstring)."""

    allocation: Allocation
    steps: tuple[Step, ...] = ()

    @property
    def stepped(self) -> bool:
        """The budget walks the profile's greedy steps; otherwise it is the method's ``--target-macs``."""
        return self.allocation.spec.profiled

    @property
    def most(self) -> float:
        """The largest share the allocation can remove."""
        if not self.stepped:
            return MAX_SHARE
        return min(sum(s.saved for s in self.steps), 1.0)

    def prefix(self, share: float) -> int:
        total = 0.0
        for k, step in enumerate(self.steps):
            if total >= share - 1e-12:
                return k
            total += step.saved
        return len(self.steps)

    def params(self, share: float) -> dict[str, Any]:
        if not self.stepped:
            return {"target_macs": round(1.0 - share, 4)} if share > 0 else {"group_ratios": ()}
        return {"group_ratios": allocation_at(self.steps, self.prefix(share))}

    def label(self, share: float) -> str:
        if not self.stepped:
            return f"target MACs {round(1.0 - share, 4):g}"
        return f"steps {self.prefix(share)}/{len(self.steps)}"


@dataclass(frozen=True)
class Point:
    """One probe of the latency search: its budget, figures, and whether it met the target and the gate."""

    share: float
    probe: Probe

    @property
    def ratio(self) -> float:
        r = self.probe.measurement.latency_ratio
        return math.inf if r is None else r

    @property
    def valid(self) -> bool:
        return self.probe.measurement.failed is None

    @property
    def passed(self) -> bool:
        return self.valid and self.probe.measurement.passed


@dataclass(frozen=True, eq=False)
class LatencyOutcome:
    """The searched model and how its latency compares with the target and the original."""

    search: SearchOutcome
    points: tuple[Point, ...]
    settings: LatencySettings
    final: Latency | None  # the written model against the original, measured after the search
    slower: bool  # the written model is slower than the original (the CLI treats it as a missed gate)
    notes: tuple[str, ...] = field(default=())

    @property
    def result(self) -> Any:
        return self.search.result

    @property
    def final_ratio(self) -> float | None:
        return None if self.final is None else self.final.after_ms / max(self.final.before_ms, 1e-12)


class _Walk:
    """The probes of one latency search, memoised by their settings."""

    def __init__(self, prober: Prober, budget: Budget, meter: Meter, max_probes: int) -> None:
        self.prober, self.budget, self.meter, self.max_probes = prober, budget, meter, max_probes
        self.points: list[Point] = []
        self.seen: dict[str, Point] = {}

    @property
    def left(self) -> int:
        return self.max_probes - len(self.points)

    def probe(self, share: float, phase: str) -> Point:
        params = self.budget.params(share)
        key = repr(sorted(params.items()))
        if key in self.seen:  # a share that makes an earlier probe's model (a discrete budget): no new probe
            return replace(self.seen[key], share=share)
        index = len(self.points) + 1
        label = self.budget.label(share)
        self.prober.stage(f"latency: probe {index}/{self.max_probes} ({phase}, {label}): pruning and measuring",
                          index - 1, self.max_probes)
        started = time.perf_counter()
        with _quiet():
            try:
                result = self.prober.run(params, VerdictPart.SELECTION)
            except ValidationError as exc:
                result = None
                reason = str(exc)
        if result is None:
            m = Measurement.invalid(reason, time.perf_counter() - started)
            log.warning("latency probe %d produced no valid model: %s", index, reason)
        else:
            timing = self.meter(result)
            m = replace(Measurement.of(result, 0.0, self.prober.margin),
                        latency_ratio=timing.after_ms / max(timing.before_ms, 1e-12), seconds=time.perf_counter() - started)
        self.prober._count(m.seconds)
        if index == 1 and self.max_probes > 1:
            level = logging.WARNING if m.seconds * self.max_probes > LONG_SECONDS else logging.INFO
            log.log(level, "latency search: at most %d probes, about %.0f s each: about %s more", self.max_probes,
                    m.seconds, _duration(m.seconds * (self.max_probes - 1)))
        point = Point(share, Probe(index, label, params, m))
        log.info("latency probe %d (%s): MACs kept %.3f, latency %.3f of the original%s", index, label, m.macs,
                 point.ratio, "" if point.passed else " (gate missed)" if point.valid else " (invalid)")
        self.points.append(point)
        self.seen[key] = point
        return point


def _next_share(slow: Point | None, fast: Point | None, aim: float, most: float, halve: bool = False) -> float:
    """The safeguarded interpolation of the module docstring (slow: r > F at `slow.share`; fast: r <= F).

    `halve`: the last two probes fell on the same side of the target, so the interpolation is stalling
    at one end (latency is a staircase in the channel counts): this step halves the bracket instead.
    """
    s0, r0 = (0.0, 1.0) if slow is None else (slow.share, slow.ratio)
    if fast is None:
        if s0 <= 0:
            return min(1.0 - aim, most)
        slope = (1.0 - r0) / s0  # latency saved per share removed, through the original
        guess = s0 + (r0 - aim) / slope if slope > 1e-6 else (s0 + most) / 2
        return min(max(guess, s0 + 0.05), most)
    s1, r1 = fast.share, fast.ratio
    width = s1 - s0
    if halve:
        return s0 + width / 2
    guess = s0 + (r0 - aim) * width / (r0 - r1) if r0 - r1 > 1e-9 else s0 + width / 2
    return min(max(guess, s0 + 0.1 * width), s1 - 0.1 * width)


def _toward_target(walk: _Walk, settings: LatencySettings) -> None:
    target, aim = settings.target, settings.aim
    assert target is not None and aim is not None
    most = walk.budget.most
    slow: Point | None = None
    fast: Point | None = None
    sides: list[bool] = []  # whether each valid probe met the target
    while walk.left > 0:
        if fast is not None and fast.ratio >= target * (1.0 - settings.tolerance):
            return  # within the tolerance below the target
        low = 0.0 if slow is None else slow.share
        if fast is not None and fast.share - low < RESOLUTION:
            return
        if fast is None and low >= most - 1e-9:
            return  # the allocation cannot remove more
        halve = len(sides) >= 2 and sides[-1] == sides[-2]
        point = walk.probe(_next_share(slow, fast, aim, most, halve), "target")
        if not point.valid:
            most = point.share - RESOLUTION  # the budget is capped below an invalid probe
            if fast is not None and fast.share > most:
                return
            continue
        sides.append(point.ratio <= target)
        if point.ratio <= target:
            if fast is None or point.share < fast.share:
                fast = point
        elif slow is None or point.share > slow.share:
            slow = point
        if fast is not None and slow is not None and slow.share >= fast.share:
            return  # noise inverted the bracket: the fast probe stands


def _within_gate(walk: _Walk, high: float) -> None:
    """Bisection of the gate over shares in [0, high] (every probe also measured)."""
    low = 0.0
    while walk.left > 0 and high - low > RESOLUTION:
        mid = (low + high) / 2
        point = walk.probe(mid, "gate")
        if point.passed:
            low = mid
        else:
            high = mid


def _choose(points: Sequence[Point], settings: LatencySettings, gated: bool) -> tuple[Point | None, list[str]]:
    notes: list[str] = []
    usable = [p for p in points if p.passed or (not gated and p.valid)]
    faster = [p for p in usable if p.ratio < 1.0]
    if settings.target is not None:
        meeting = [p for p in faster if p.ratio <= settings.target]
        if meeting:
            return max(meeting, key=lambda p: (p.probe.measurement.macs, -p.probe.index)), notes
    if not faster:
        notes.append("no probe was faster than the original" + (" within the gate" if gated else "") +
                     ": the model is written unchanged")
        return None, notes
    best = min(faster, key=lambda p: (p.ratio, p.probe.index))
    if settings.target is not None:
        notes.append(f"the target latency {settings.target:g} was not reached" + (" within the gate" if gated else "") +
                     f" in {len(points)} probes: the fastest probe is written ({best.ratio:.3f} of the original)")
    return best, notes


def run_latency_search(prober: Prober, settings: SearchSettings, round_to: int | Rounding, gates: Gates,
                       latency: LatencySettings, meter: Meter | None = None) -> LatencyOutcome:
    """The latency objective (module docstring); `meter` replaces the measurement (tests)."""
    check_searchable(prober.method, prober.params)
    if latency.target is None and not gates.any:
        raise UsageError("--objective latency needs --target-latency F or a gate (--max-drop, --min-*)")
    settings = replace(settings, objective=Objective.LATENCY)
    trace = baseline(prober)
    settings = resolved(prober, settings)
    rows: tuple[SensitivityRow, ...] = ()
    if settings.allocation.spec.profiled:
        rows = sensitivity(prober, trace, settings, round_to)
        budget = Budget(settings.allocation, greedy_steps(rows, Objective.MACS))
    else:
        budget = Budget(settings.allocation)  # the method's --target-macs (shared by predicted damage with DAMAGE)
    meter = meter or InterleavedMeter(prober, latency.threads, latency.clock)
    walk = _Walk(prober, budget, meter, settings.max_probes)
    if latency.target is not None:
        _toward_target(walk, latency)
    if gates.any:
        chosen, _ = _choose(walk.points, latency, gated=True)
        meets = chosen is not None and latency.target is not None and chosen.ratio <= latency.target
        if not meets:
            shares = [p.share for p in walk.points if p.valid and latency.target is not None and p.ratio <= latency.target]
            _within_gate(walk, min(shares) if shares else budget.most)
    chosen, notes = _choose(walk.points, latency, gated=gates.any)
    for note in notes:
        log.warning("%s", note)
    params: Mapping[str, Any] = {"group_ratios": ()} if chosen is None else chosen.probe.params
    prober.stage(f"latency: the chosen model, judged on the final half and measured ({len(walk.points)} probes done)",
                 len(walk.points), len(walk.points))
    result = prober.run(params, VerdictPart.FINAL)
    final = meter(result)
    ratio = final.after_ms / max(final.before_ms, 1e-12)
    slower = chosen is not None and final.slower  # the not-slower gate's rule (`latency.speed_gates`)
    if slower:
        message = (f"the written model is SLOWER than the original here: {final.after_ms:.3f} ms against "
                   f"{final.before_ms:.3f} ms (median of {final.rounds} interleaved runs)")
        log.warning("%s", message)
        notes.append(message)
    elif chosen is not None and latency.target is not None and ratio > latency.target:
        message = (f"measured again, the written model runs at {ratio:.3f} of the original's latency, above the target "
                   f"{latency.target:g} (it measured {chosen.ratio:.3f} as a probe: noise of a loaded machine?)")
        log.warning("%s", message)
        notes.append(message)
    verdict = result.report.verdict
    result = replace(result, report=replace(result.report, latency=final,
                                            verdict=None if verdict is None else
                                            with_speed_gates(verdict, final, gates, unchanged=chosen is None)))
    probes = tuple(p.probe for p in walk.points)
    outcome = SearchOutcome(result, probes, rows, None if chosen is None else chosen.probe.index, settings,
                            tuple(notes), prober.seconds, prober.data_free)
    searched = _with_search_report(outcome)
    report = searched.report
    extra = dict(report.extra)
    extra["latency_search"] = {
        "target": latency.target, "aim": latency.aim, "tolerance": latency.tolerance, "threads": latency.threads,
        "clock": latency.clock.value,
        "budget": budget.allocation.value, "final_ratio": ratio, "slower": slower,
        "measure": "interleaved rounds, median of each (latency.measure), one sample of the verdict data's shapes",
        "points": [{"probe": p.probe.index, "share": p.share, "latency_ratio": p.ratio if math.isfinite(p.ratio) else None,
                    "macs_kept": p.probe.measurement.macs, "passed": p.passed} for p in walk.points],
    }
    target = "fastest within the gate" if latency.target is None else f"latency <= {latency.target:g} of the original"
    request = (f"latency search ({target}): " + ("none of the probes qualified, unchanged" if chosen is None else
               f"probe {chosen.probe.index} of {len(probes)} ({chosen.probe.budget}), measured {ratio:.3f}"))
    report = replace(report, extra=extra, request=request)
    outcome = replace(outcome, result=replace(searched, report=report))
    return LatencyOutcome(outcome, tuple(walk.points), latency, final, slower, tuple(notes))


def latency_table(outcome: LatencyOutcome) -> str:
    """The probes of a latency search, in budget order (> the written one)."""
    target = outcome.settings.target
    lines = [f"latency search ({'target ' + format(target, 'g') if target is not None else 'fastest within the gate'}; "
             f"{len(outcome.points)} probes, latency measured against the original; > written):",
             f"{'':1}{'probe':>5} {'budget':<20} {'MACs kept':>9} {'params kept':>11} {'latency':>8}  verdict"]
    for p in sorted(outcome.points, key=lambda p: p.share):
        m = p.probe.measurement
        mark = ">" if p.probe.index == outcome.search.chosen else " "
        word = "invalid" if not p.valid else ("passed" if p.passed else "gate missed")
        lat = "-" if not math.isfinite(p.ratio) else f"{p.ratio:.3f}"
        lines.append(f"{mark}{p.probe.index:>5} {p.probe.budget[:20]:<20} {m.macs:>9.1%} {m.params:>11.1%} {lat:>8}  {word}")
    if outcome.final_ratio is not None:
        lines.append(f"written model measured again: {outcome.final_ratio:.3f} of the original's latency"
                     + (" (SLOWER than the original)" if outcome.slower else ""))
    return "\n".join(lines)
