"""Sensitivity, non-uniform allocation, and the smallest model that keeps the gate.

Every candidate is one run of the pipeline from the method on (the method's selection, its
compensation, validation, the verdict) with a per-group allocation (the ``group_ratios``
setting) in place of the uniform ratio: a *probe*. The model is loaded, traced and its data
prepared once (`api.prepare`), the original's statistics kept in memory across probes, and the
sensitivity profile's probes run side by side in worker processes or on Ray (`planning.workers`).
Probes are measured on the selection half of the held-out samples, the written model on the
final half (`planning.parts`).

Damage. A probe's verdict gives one continuous figure of how far it is from the original,

    damage = (1 - top-1 agreement) + (1 - correlation)    (the worst output's; a non-classifier: 1 - correlation)

(``correlation`` is the sample-centred cosine of the outputs: `verdict`). It orders probes that
flip the same number of predictions, which the gate figures alone (a count of flips, an
accuracy drop of a few samples) cannot.

Sensitivity (``--sensitivity``). Each prunable group ``g`` alone is cut at each ratio ``r``
(default 0.25, 0.5, 0.75) with the method's compensation: the table gives the MACs and
parameters saved (fractions of the original), the damage, the top-1 agreement and the accuracy
drop (with labelled ``--eval`` data), sorted by cost-effectiveness ``saved MACs / damage``.
Data-free runs (no ``--calib``) measure on seeded random inputs: a proxy, labelled as such. A search
(a gate) needs real samples: a gate without them is a usage error before any probe (`verdict`).

Allocation (`Allocation.AUTO`, the default): DAMAGE where the method's ``--target-macs`` is shared by the
closed-form predicted damage (`resolved`), else SENSITIVITY. `Allocation.DAMAGE`: no profile; each probe is the
method's ``--target-macs`` (per group and width, the refit residual predicted from the statistics its selection
holds: `methods.datadriven.damage_table`), searched as a `Line` beside the plain uniform ``--ratio`` line
(`_damage_lines`); lines depend on their own probes only and run side by side, a round at a time.

`Allocation.SENSITIVITY`: a greedy knapsack over the profile. Per
group, the points ``(saved_g(r), damage_g(r))`` with the origin (damage made non-decreasing in
``r``) are reduced to their lower convex hull; each hull edge is a *step* of slope
``Δdamage / Δsaved``. All groups' steps in one order of increasing slope (ties: group, then
ratio) make one global budget: its first ``k`` steps allocate to each group the ratio of its
last step taken. This minimises the summed single-group damages for the MACs (or parameters)
saved, exactly on the hull (the classic Lagrangian relaxation), and never cuts a group that
its profile shows to be fragile before a robust one; the damages are assumed additive, which
the probes then test. `Allocation.RANKING`: the global normalised ranking of
`methods.budget` (one order of every channel, scores divided by their group's mean) under a
bisected ``--target-macs``: no sensitivity probes, but it ranks channels, not their effect on
the output, and can empty a residual stream whose channels all score alike.

Search. The global budget (``k`` steps, or the target fraction) is bisected: a probe that
passes every gate moves the lower end, one that misses moves the upper, for at most
``max_probes`` probes. The written model is the smallest probe (by the objective) that passed
on the selection half; its verdict, and the exit code, come from the final half. The report
lists every probe (the Pareto table: MACs kept, parameters kept, verdict), the profile, and
the final verdict; when no probe passes, the original is written unchanged with a warning
("nothing can be removed within the gate without fine-tuning").

Plain candidates. After the bisection the plain uniform ``--ratio`` and the global ranking's
``--target-macs`` are probed at the size of the smallest passing probe and below it (`_baselines`);
the written model is the smallest passing candidate of all (of those within `EQUAL_SIZE`, the least
damaged), so a probed plain run never dominates it on the selection half.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import onnx

from .. import ir
from ..channels import Group, Role, Trace
from ..errors import UsageError, ValidationError
from ..analysis.plan import removed_count
from ..roundto import Rounding
from ..settings import RunSettings
from ..progress import StageListener
from ..judge.verdict import Z95, Gates, Verdict
from .parts import VerdictPart

log = logging.getLogger(__name__)

#: the ratios each group is cut at alone (``--sensitivity-ratios``)
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
#: probes of the bisection (``--max-probes``); the sensitivity probes come on top
DEFAULT_MAX_PROBES = 10
#: the ranking search stops when the bisected target fraction is known to this width
TARGET_RESOLUTION = 0.01
#: standard errors a probe's gate figures must spare (``--search-margin``)
DEFAULT_MARGIN = 1.0
#: probes of each plain line the search compares with (`SearchSettings.baseline_probes`; module docstring)
DEFAULT_BASELINE_PROBES = 3
#: the first step below the search's result along a plain line (a share of the original), halved after a miss
BASELINE_STEP = 0.1
#: candidates within this share of the original count as equally small: the least damaged of them is written
EQUAL_SIZE = 0.005
#: a sensitivity table or search expected to take longer than this says so before it starts (a warning)
LONG_SECONDS = 30.0
#: damage below this counts as none in the cost-effectiveness ratio
DAMAGE_FLOOR = 1e-6

Allocation_ = tuple[tuple[int, float], ...]


class Allocation(str, Enum):
    """How the global budget is spread over the groups (module docstring)."""

    #: DAMAGE for a method whose budget is shared by closed-form predicted damage on this model, else SENSITIVITY
    AUTO = "auto"
    SENSITIVITY = "sensitivity"
    RANKING = "ranking"
    #: the method's ``--target-macs`` shared by predicted damage (`methods.budget`): no profile probes
    DAMAGE = "damage"

    @property
    def spec(self) -> AllocationSpec:
        if self is Allocation.AUTO:
            raise ValueError("Allocation.AUTO has no spec: resolve it first (`resolved`)")
        return ALLOCATIONS[self]


class Objective(str, Enum):
    """What the search makes smallest; what each one reads is data (`ObjectiveSpec`, `OBJECTIVES`)."""

    MACS = "macs"
    PARAMS = "params"
    LATENCY = "latency"  # measured onnxruntime latency (`planning.latency_search`)

    @property
    def spec(self) -> ObjectiveSpec:
        return OBJECTIVES[self]

    @property
    def target_key(self) -> str:
        """The method setting that asks for a kept fraction of the objective's static size (``target_macs``)."""
        return f"target_{self.spec.size}"


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective reads: the measured figure it makes smallest, and the static size (``macs`` or ``params``)
    by which the search's steps, targets and uniform lines move towards it."""

    kept: str  # the `Measurement` field: the kept fraction (a ratio of latencies for latency; missing: infinite)
    size: str  # "macs" or "params": `SensitivityRow.<size>_saved`, ``target_<size>``, the uniform line's cost


#: a new objective is one member of `Objective` and its row here
OBJECTIVES: dict[Objective, ObjectiveSpec] = {
    Objective.MACS: ObjectiveSpec(kept="macs", size="macs"),
    Objective.PARAMS: ObjectiveSpec(kept="params", size="params"),
    # the latency search sets its own steps by MACs (`latency_search`); params only where a generic path asks
    Objective.LATENCY: ObjectiveSpec(kept="latency_ratio", size="params"),
}


@dataclass(frozen=True)
class SearchSettings:
    """How a sensitivity table or a gated search is run."""

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    max_probes: int = DEFAULT_MAX_PROBES
    allocation: Allocation = Allocation.AUTO
    objective: Objective = Objective.MACS
    #: a probe passes only when every gate holds with this many standard errors of its figure to spare (the
    #: smallest of many probes that pass on the selection half is partly the luckiest; the final half judges it)
    margin: float = DEFAULT_MARGIN
    #: probes of each plain line (uniform ``--ratio``, ``--target-macs``) tried at and below the search's result
    baseline_probes: int = DEFAULT_BASELINE_PROBES

    def __post_init__(self) -> None:
        if self.baseline_probes < 0:
            raise UsageError(f"baseline probes must be >= 0, got {self.baseline_probes}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise UsageError(f"--search-margin must be a number >= 0, got {self.margin!r}")
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios) or list(self.ratios) != sorted(set(self.ratios)):
            raise UsageError(f"--sensitivity-ratios must be increasing fractions in (0, 1), got {self.ratios!r}")
        if self.max_probes < 1:
            raise UsageError(f"--max-probes must be a positive integer, got {self.max_probes}")


# ----------------------------------------------------------------------------- one probe


def standard_error(verdict: Verdict, figure: str) -> float:
    """One standard error of a gate's figure, from the verdict's 95% interval (0 when it has none: cosine)."""
    interval = {"accuracy_drop_points": verdict.accuracy_drop_interval, "top1_agreement": verdict.top1_interval,
                "correlation": verdict.correlation_interval}.get(figure)
    return 0.0 if interval is None else (interval[1] - interval[0]) / (2.0 * Z95)


def passes_with_margin(verdict: Verdict, margin: float) -> bool:
    """Every gate passes with `margin` standard errors to spare (`SearchSettings.margin`), and the probe is not
    flagged `degraded`: a gate on one figure (top-1 of the class scores) must not let a probe through whose other
    outputs have collapsed (a detector's box regression)."""
    if verdict.degraded:
        return False
    for gate in verdict.gates:
        if not gate.passed or gate.value is None:
            return False
        spare = margin * standard_error(verdict, gate.figure)
        minimum = gate.figure != "accuracy_drop_points"
        if (gate.value - spare < gate.threshold) if minimum else (gate.value + spare > gate.threshold):
            return False
    return True


def gate_slack(verdict: Verdict, margin: float) -> float | None:
    """How far the worst gate is from failing with `margin` standard errors spared, as a fraction (accuracy points
    / 100): >= 0 exactly when `passes_with_margin`; None when the probe is degraded or a gate's figure is missing."""
    if verdict.degraded or not verdict.gates:
        return None
    worst = math.inf
    for gate in verdict.gates:
        if gate.value is None:
            return None
        spare = margin * standard_error(verdict, gate.figure)
        drop = gate.figure == "accuracy_drop_points"
        room = (gate.threshold - gate.value - spare) / 100.0 if drop else gate.value - spare - gate.threshold
        worst = min(worst, room)
    return worst if math.isfinite(worst) else None


def original_slack(gates: Gates) -> float:
    """`gate_slack` of the original itself (no figure moved, no error): the room each gate leaves."""
    return min(((g.threshold / 100.0) if g.figure == "accuracy_drop_points" else 1.0 - g.threshold)
               for g in gates.gates())


def damage_of(verdict: Verdict) -> float:
    """The continuous distance of a probe from the original (module docstring)."""
    correlation = verdict.correlation if verdict.correlation is not None else verdict.cosine
    damage = 1.0 - correlation
    if verdict.top1_agreement is not None:
        damage += 1.0 - verdict.top1_agreement
    return max(float(damage), 0.0)


@dataclass(frozen=True)
class Measurement:
    """A probe's figures on the selection half (or the final model's on the final half)."""

    macs: float  # fraction of the original kept
    params: float
    passed: bool
    damage: float
    top1_agreement: float | None
    correlation: float | None
    accuracy_drop: float | None  # points
    samples: int
    seconds: float
    latency_ratio: float | None = None  # pruned / original, when measured
    failed: str | None = None  # why the probe produced no valid model
    slack: float | None = None  # `gate_slack`: how far from failing (negative: missed)

    @staticmethod
    def of(result: Any, seconds: float, margin: float = 0.0) -> Measurement:
        report = result.report
        verdict = report.verdict
        assert verdict is not None
        timing = report.latency
        return Measurement(
            macs=report.after.macs / max(report.before.macs, 1), params=report.after.params / max(report.before.params, 1),
            passed=passes_with_margin(verdict, margin), damage=damage_of(verdict), top1_agreement=verdict.top1_agreement,
            correlation=verdict.correlation, accuracy_drop=verdict.accuracy_drop_points, samples=verdict.samples,
            seconds=seconds, latency_ratio=None if timing is None else timing.after_ms / max(timing.before_ms, 1e-12),
            slack=gate_slack(verdict, margin),
        )

    @staticmethod
    def invalid(reason: str, seconds: float) -> Measurement:
        return Measurement(1.0, 1.0, False, math.inf, None, None, None, 0, seconds, failed=reason)

    def kept(self, objective: Objective) -> float:
        value: float | None = getattr(self, objective.spec.kept)
        return math.inf if value is None else value


class Prober:
    """Runs the pipeline once per candidate: a run of the prepared model (`api.prepare`) with an allocation.

    The model is loaded, its calibration data split, the original's outputs measured and the model
    traced once (`api.PreparedRun`); each probe restarts from the method. Independent probes (the
    sensitivity profile's) go to `workers` local processes or to a Ray cluster (`planning.workers`),
    each of which prepares once; their figures are those of the serial run, in the same order.
    """

    def __init__(self, model: onnx.ModelProto, settings: RunSettings,
                 progress: Callable[[int, int], None] | None = None, margin: float = DEFAULT_MARGIN,
                 workers: int = 1, ray_address: str | None = None) -> None:
        from .. import api
        from .workers import check_workers

        self.margin = margin
        #: a run without a method gets the default for the model's kind, chosen here, from the one load
        settings, self.default = api.with_default_method(settings, model)
        assert settings.method is not None
        self.model, self.method = model, settings.method
        self.params = dict(settings.params or {})
        #: --target-macs / --target-params of the run: probes allocate per group, so they never pass them on
        self.targets = {k: self.params.pop(k) for k in ("target_macs", "target_params") if self.params.get(k) is not None}
        self.latency = settings.latency
        #: the probes' settings: the run's without its targets, and never timed (`run` asks for the final model's)
        self.settings = replace(settings, params=self.params, latency=False)
        self.progress = progress
        self.workers, self.ray_address = check_workers(workers, ray_address), ray_address
        self.count = 0
        self.seconds = 0.0
        self._prepared: Any = None
        self._pool: Any = None

    def prepared(self) -> Any:
        """The model prepared once (`api.PreparedRun`), its selection half measured first."""
        if self._prepared is None:
            from .. import api

            with _quiet():
                self._prepared = api.prepare(self.model, self.settings, part=VerdictPart.SELECTION)
        return self._prepared

    def run(self, params: Mapping[str, Any], part: VerdictPart, *, latency: bool = False) -> Any:
        """One run; a ``ratio`` among `params` is the run's uniform ratio (`--ratio`), the rest method settings."""
        settings = {k: v for k, v in params.items() if k != "ratio"}
        return self.prepared().run(settings, ratio=params.get("ratio"), part=part, latency=latency)

    def probe(self, params: Mapping[str, Any]) -> tuple[Measurement, Any]:
        """One probe on the selection half; a probe whose model fails validation is a miss, never written."""
        started = time.perf_counter()
        with _quiet():
            try:
                result = self.run(params, VerdictPart.SELECTION)
            except ValidationError as exc:
                seconds = time.perf_counter() - started
                self._count(seconds)
                log.warning("probe %d produced no valid model: %s", self.count, exc)
                return Measurement.invalid(str(exc), seconds), None
        seconds = time.perf_counter() - started
        self._count(seconds)
        return Measurement.of(result, seconds, self.margin), result

    def probe_all(self, jobs: Sequence[Mapping[str, Any]], label: Callable[[int], str]) -> list[Measurement]:
        """Independent probes, in order: here one after another, else in the worker pool or on the Ray cluster."""
        if (self.workers > 1 or self.ray_address is not None) and self._pool is None and ir.exceeds_proto_limit(self.model):
            log.warning("the model is past protobuf's 2 GiB limit and cannot be sent to workers: probes run here")
            self.workers, self.ray_address = 1, None
        if self.workers <= 1 and self.ray_address is None or len(jobs) <= 1:
            out = []
            for i, params in enumerate(jobs):
                self.stage(label(i), i, len(jobs))
                out.append(self.probe(params)[0])
            return out
        from .workers import Pool

        if self._pool is None:
            from ..calib import memory

            settings = self.settings
            if self.ray_address is None:  # the machine's calibration budget is shared by its workers
                settings = replace(settings, calib_memory=(settings.calib_memory or memory.calibration_budget()) // self.workers)
            self._pool = Pool(self.model, settings, self.margin, self.workers, self.ray_address)
        started = time.perf_counter()
        out = self._pool.measure(jobs, lambda done: self.stage(label(done), done, len(jobs)))
        for m in out:  # the probes' own seconds (run side by side: their sum exceeds the wall time)
            self._count(m.seconds)
        log.info("%d probes on %s in %.1f s", len(jobs), self._pool.where, time.perf_counter() - started)
        return out

    def close(self) -> None:
        """Stop the worker pool (if one was started)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _count(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds

    @property
    def data_free(self) -> bool:
        """No calibration or --eval data: probes are measured on seeded random inputs (a proxy)."""
        return self.settings.calib in (None, "random") and self.settings.eval_data is None

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.count if self.count else 0.0

    def stage(self, text: str, done: int, total: int) -> None:
        """Progress: which probe is being measured (the CLI's bar, else the log)."""
        listener = self.progress
        if isinstance(listener, StageListener):
            listener.stage(text)
        elif listener is None:
            log.info("%s", text)
        if listener is not None:
            listener(done, total)


@contextmanager
def _quiet() -> Iterator[None]:
    """A probe's own warnings (gate missed, degraded, nothing pruned) stay in its notes: the search reports probes."""
    logger = logging.getLogger("onnxslim_prune")
    level = logger.level
    logger.setLevel(max(logging.ERROR, level))
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------- sensitivity


@dataclass(frozen=True)
class SensitivityRow:
    group: int
    node: str  # the group's first producing node
    size: int
    ratio: float
    removed: int
    macs_saved: float  # fraction of the original
    params_saved: float
    damage: float
    top1_agreement: float | None
    accuracy_drop: float | None
    correlation: float | None
    failed: str | None = None

    def saved(self, objective: Objective) -> float:
        saved: float = getattr(self, f"{objective.spec.size}_saved")
        return saved

    @property
    def efficiency(self) -> float:
        """MACs saved per unit of damage (higher: cut it first)."""
        return self.macs_saved / max(self.damage, DAMAGE_FLOOR)


def _producer(trace: Trace, group: Group) -> str:
    out = [m.node for m in group.members if m.role == Role.OUT]
    return (out or [m.node for m in group.members] or ["?"])[0]


def sensitivity(prober: Prober, trace: Trace, settings: SearchSettings, round_to: int | Rounding) -> tuple[SensitivityRow, ...]:
    """Each prunable group cut alone at each ratio (module docstring); probes whose count repeats are skipped."""
    jobs: list[tuple[Group, float, int]] = []
    for group in trace.groups:
        if group.is_frozen:
            continue
        last = 0
        for ratio in settings.ratios:
            n = removed_count(group, ratio, Rounding.of(round_to).classes(group, trace))
            if n > last:
                jobs.append((group, ratio, n))
                last = n
    started = time.perf_counter()
    if jobs:
        log.log(logging.WARNING if prober.mean_seconds * len(jobs) > LONG_SECONDS else logging.INFO,
                "sensitivity: %d probes%s", len(jobs),
                f", about {_duration(prober.mean_seconds * len(jobs))} one after another" if prober.count else "")
    measured = prober.probe_all([{"group_ratios": ((group.index, ratio),)} for group, ratio, _n in jobs],
                                lambda i: f"sensitivity: probe {min(i + 1, len(jobs))}/{len(jobs)}"
                                          f" (group {jobs[min(i, len(jobs) - 1)][0].index} at {jobs[min(i, len(jobs) - 1)][1]:g})")
    prober.close()  # the workers' prepared models are freed: the other probes depend on each other
    rows = [SensitivityRow(group.index, _producer(trace, group), group.size, ratio, n, 1.0 - m.macs, 1.0 - m.params,
                           m.damage, m.top1_agreement, m.accuracy_drop, m.correlation, m.failed)
            for (group, ratio, n), m in zip(jobs, measured)]
    if jobs:
        prober.stage(f"sensitivity: {len(jobs)} probes in {_duration(time.perf_counter() - started)}", len(jobs), len(jobs))
    return tuple(rows)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def sorted_rows(rows: Sequence[SensitivityRow]) -> list[SensitivityRow]:
    """Most cost-effective first (saved MACs per damage), then group and ratio."""
    return sorted(rows, key=lambda r: (-r.efficiency, r.group, r.ratio))


def sensitivity_table(rows: Sequence[SensitivityRow], proxy: bool = False) -> str:
    title = "sensitivity (each group cut alone" + ("; data-free proxy: output error on seeded random inputs" if proxy else "") + \
        "; damage = (1 - top-1 agreement) + (1 - correlation), sorted by MACs saved per damage):"
    lines = [title, f"{'group':>5} {'node':<24} {'size':>5} {'ratio':>5} {'cut':>4} {'MACs saved':>10} {'params saved':>12} "
                    f"{'damage':>8} {'top-1':>7} {'acc drop':>8}"]
    for r in sorted_rows(rows):
        top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.2%}"
        drop = "-" if r.accuracy_drop is None else f"{r.accuracy_drop:+.2f}"
        damage = "invalid" if r.failed else f"{r.damage:.4f}"
        lines.append(f"{r.group:>5} {r.node[:24]:<24} {r.size:>5} {r.ratio:>5.2f} {r.removed:>4} {r.macs_saved:>10.2%} "
                     f"{r.params_saved:>12.2%} {damage:>8} {top1:>7} {drop:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Step:
    """One edge of a group's hull: cut `group` to `ratio`, saving `saved` more for `damage` more."""

    group: int
    ratio: float
    saved: float
    damage: float

    @property
    def slope(self) -> float:
        return self.damage / self.saved if self.saved > 0 else math.inf


def greedy_steps(rows: Sequence[SensitivityRow], objective: Objective = Objective.MACS) -> tuple[Step, ...]:
    """Every group's lower-hull steps in one order of increasing damage per saving (module docstring)."""
    by_group: dict[int, list[SensitivityRow]] = {}
    for r in rows:
        if r.failed is None and math.isfinite(r.damage):
            by_group.setdefault(r.group, []).append(r)
    steps: list[Step] = []
    for group, grows in sorted(by_group.items()):
        points = [(0.0, 0.0, 0.0)]  # (saved, damage, ratio)
        worst = 0.0
        for r in sorted(grows, key=lambda r: r.ratio):
            worst = max(worst, r.damage)
            points.append((r.saved(objective), worst, r.ratio))
        hull: list[tuple[float, float, float]] = []
        for p in sorted(points, key=lambda p: (p[0], p[1])):
            if hull and p[0] <= hull[-1][0]:
                continue  # saves no more than a point already on the hull (its damage is no lower)
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            hull.append(p)
        for a, b in zip(hull, hull[1:]):
            steps.append(Step(group, b[2], b[0] - a[0], b[1] - a[1]))
    return tuple(sorted(steps, key=lambda s: (s.slope, s.group, s.ratio)))


def _cross(o: tuple[float, float, float], a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """> 0 when o -> a -> b turns left (the lower hull keeps left turns)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def allocation_at(steps: Sequence[Step], k: int) -> Allocation_:
    """The per-group ratios of the first `k` steps (each group at the ratio of its last step taken)."""
    out: dict[int, float] = {}
    for s in steps[:k]:
        out[s.group] = s.ratio
    return tuple(sorted(out.items()))


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Probe:
    index: int
    budget: str  # which point of the global budget ("steps 12/40", "target MACs 0.41")
    params: Mapping[str, Any]  # the settings that made it (group_ratios or target_macs/target_params)
    measurement: Measurement

    def to_dict(self) -> dict[str, Any]:
        m = self.measurement
        return {"index": self.index, "budget": self.budget, "macs_kept": m.macs, "params_kept": m.params,
                "passed": m.passed, "damage": m.damage if math.isfinite(m.damage) else None,
                "top1_agreement": m.top1_agreement, "correlation": m.correlation, "accuracy_drop": m.accuracy_drop,
                "samples": m.samples, "seconds": m.seconds, "failed": m.failed,
                "group_ratios": [list(p) for p in self.params.get("group_ratios", ())] or None,
                "target": {k: v for k, v in self.params.items() if k.startswith("target_")} or None,
                **({"ratio": self.params["ratio"]} if "ratio" in self.params else {}),
                **({} if m.latency_ratio is None else {"latency_ratio": m.latency_ratio})}


@dataclass(frozen=True, eq=False)
class SearchOutcome:
    result: Any  # api.PruneResult: the written model, its verdict on the final half
    probes: tuple[Probe, ...]
    sensitivity: tuple[SensitivityRow, ...]
    chosen: int | None  # index of the written probe; None: none passed, the original is written
    settings: SearchSettings
    notes: tuple[str, ...] = field(default=())
    seconds: float = 0.0  # of the probes (the final run's own seconds are in its report)
    data_free: bool = False  # probes measured on seeded random inputs


def pareto(probes: Sequence[Probe], objective: Objective) -> set[int]:
    """Indices of passing probes no other passing probe beats on both size and damage."""
    passing = [p for p in probes if p.measurement.passed]
    out = set()
    for p in passing:
        a = p.measurement
        if not any((b.measurement.kept(objective) <= a.kept(objective) and b.measurement.damage <= a.damage)
                   and (b.measurement.kept(objective), b.measurement.damage) != (a.kept(objective), a.damage)
                   for b in passing):
            out.add(p.index)
    return out


def probe_table(outcome: SearchOutcome) -> str:
    objective = outcome.settings.objective
    front = pareto(outcome.probes, objective)
    lines = [f"search ({outcome.settings.allocation.value} allocation, {len(outcome.probes)} probes on the selection half; "
             "* Pareto, > written):",
             f"{'':2}{'probe':>5} {'budget':<20} {'MACs kept':>9} {'params kept':>11} {'damage':>8} {'top-1':>7} "
             f"{'acc drop':>8}  verdict"]
    for p in sorted(outcome.probes, key=lambda p: p.measurement.kept(objective)):
        m = p.measurement
        mark = (">" if p.index == outcome.chosen else " ") + ("*" if p.index in front else " ")
        top1 = "-" if m.top1_agreement is None else f"{m.top1_agreement:.2%}"
        drop = "-" if m.accuracy_drop is None else f"{m.accuracy_drop:+.2f}"
        damage = "-" if not math.isfinite(m.damage) else f"{m.damage:.4f}"
        word = "invalid" if m.failed else ("passed" if m.passed else "missed")
        lines.append(f"{mark}{p.index:>5} {p.budget[:20]:<20} {m.macs:>9.1%} {m.params:>11.1%} {damage:>8} {top1:>7} {drop:>8}  {word}")
    return "\n".join(lines)


def search(prober: Prober, trace: Trace, settings: SearchSettings, round_to: int | Rounding, gates: Gates,
           sensitivity_rows: tuple[SensitivityRow, ...] | None = None) -> SearchOutcome:
    """The smallest probe that passes `gates` on the selection half, rerun and judged on the final half."""
    if not gates.any:
        raise UsageError("a search needs a gate: --max-drop, --min-top1-agreement, --min-cosine or --min-correlation")
    settings = resolved(prober, settings)
    spec = settings.allocation.spec
    rows: tuple[SensitivityRow, ...] = ()
    if sensitivity_rows is not None:
        rows = sensitivity_rows
    elif spec.profiled:
        rows = sensitivity(prober, trace, settings, round_to)
    probes: list[Probe] = []
    spec.explore(Exploration(prober, trace, settings, gates, round_to, rows, probes))
    if settings.baseline_probes and settings.objective is not Objective.LATENCY and spec.plain_candidates:
        _baselines(prober, trace, settings, probes, round_to)
    notes: list[str] = []
    chosen = choose(probes, settings.objective)
    if chosen is None:
        message = ("no probe kept the gate on the selection half: nothing can be removed within it without fine-tuning; "
                   "the model is written unchanged")
        log.warning("%s", message)
        notes.append(message)
        params: Mapping[str, Any] = {"group_ratios": ()}
    else:
        params = chosen.params
    prober.stage(f"search: the chosen model, judged on the final half ({len(probes)} probes done)", len(probes), len(probes))
    result = prober.run(params, VerdictPart.FINAL, latency=prober.latency)
    outcome = SearchOutcome(result, tuple(probes), rows, None if chosen is None else chosen.index, settings, tuple(notes),
                            prober.seconds, prober.data_free)
    return replace(outcome, result=_with_search_report(outcome))


# ----------------------------------------------------------------------------- the damage allocation: lines of runs


def resolved(prober: Prober, settings: SearchSettings) -> SearchSettings:
    """`settings` with `Allocation.AUTO` made concrete: DAMAGE when the method shares a ``--target-macs`` by
    closed-form predicted damage (`methods.datadriven.by_damage`: a reconstruction method, real data, unless
    ``--budget-allocation ranking`` says otherwise), else SENSITIVITY."""
    if settings.allocation is Allocation.AUTO:
        return replace(settings, allocation=Allocation.DAMAGE if shares_by_damage(prober) else Allocation.SENSITIVITY)
    if settings.allocation is Allocation.DAMAGE and not damage_capable(prober.method):
        from ..methods.datadriven import DAMAGE_METHODS

        raise UsageError(f"--allocation damage needs a method whose statistics predict the damage ({', '.join(DAMAGE_METHODS)})")
    return settings


def damage_capable(method: str) -> bool:
    from ..methods.datadriven import DAMAGE_METHODS

    return method in DAMAGE_METHODS


def shares_by_damage(prober: Prober) -> bool:
    """Whether the method's own ``--target-macs`` run shares the budget by predicted damage."""
    from ..methods.base import BudgetAllocation, get_method
    from ..methods.datadriven import DEFAULT_ALLOCATION

    if prober.data_free or not damage_capable(prober.method):
        return False
    params = get_method(prober.method).params.parse(prober.params)
    return params.allocation(DEFAULT_ALLOCATION) is BudgetAllocation.DAMAGE


#: where a line's first probe is (the fraction kept), its bracket's resolution, and the least it asks for
LINE_START = 0.6
LINE_RESOLUTION = 0.02
LINE_LOWEST = 0.05
#: the lost slack grows as a power of the share removed: assumed before two points measure it, and its bounds
LINE_POWER = (3.0, 1.0, 6.0)
#: each estimate stays this share of the bracket inside it (a safeguard against a poor fit)
LINE_GUARD = 0.15


@dataclass(eq=False)
class Line:
    """One line of runs (the kept fraction -> a run's settings) searched for its smallest member within the gate.

    The original passes with `origin` slack (`original_slack`); each probe adds (kept, `gate_slack`). The next
    fraction is the root of ``origin - slack = a (1 - kept)^p`` fitted to the two probes nearest the boundary
    (one: ``p`` assumed), kept `LINE_GUARD` inside the bracket of the smallest pass and the largest miss below it;
    the line stops when that bracket is `LINE_RESOLUTION` wide, after `limit` probes, or when the fraction asked
    for maps to a run already probed (a staircase of rounded widths). Its probes depend on its own figures only, so
    lines run side by side give the probes of lines run one after another.
    """

    name: str
    at: Callable[[float], tuple[dict[str, Any], str]]  # kept fraction -> (the run's settings, its label)
    limit: int
    origin: float
    objective: Objective
    start: float = LINE_START
    points: list[tuple[float, float | None, bool]] = field(default_factory=list)  # (kept, slack, passed)
    asked: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def next(self) -> tuple[dict[str, Any], str] | None:
        if self.done or len(self.points) >= self.limit:
            return None
        for kept in [self.start] if not self.points else self.estimates():
            params, label = self.at(kept)
            if params not in self.asked:
                self.asked.append(params)
                return params, label
        self.done = True  # resolved, or no other run of this line lies in the bracket
        return None

    def record(self, m: Measurement) -> None:
        self.points.append((m.kept(self.objective), m.slack, m.passed))

    def estimates(self) -> list[float]:
        """The next fraction kept: the fit's, else the bracket's middle (none: the bracket is resolved)."""
        high = min((k for k, _, ok in self.points if ok), default=1.0)
        misses = [k for k, _, ok in self.points if not ok and k < high]
        low = max(misses, default=None)
        floor = LINE_LOWEST if low is None else low
        width = high - floor
        if width <= LINE_RESOLUTION:
            return []
        lost = sorted((1.0 - k, self.origin - s) for k, s, _ in self.points
                      if s is not None and k < 1.0 and self.origin - s > 0)
        guess: float | None = None
        if lost:
            near = sorted(lost, key=lambda cd: abs((1.0 - cd[0]) - (high + floor) / 2))[:2]
            power = LINE_POWER[0]
            if len(near) == 2 and near[0][0] != near[1][0] and near[0][1] != near[1][1]:
                (c1, d1), (c2, d2) = near
                power = math.log(d2 / d1) / math.log(c2 / c1)
                power = min(max(power, LINE_POWER[1]), LINE_POWER[2]) if math.isfinite(power) else LINE_POWER[0]
            c, d = near[0]
            guess = 1.0 - c * (self.origin / d) ** (1.0 / power)
        middle = (high + floor) / 2
        if guess is None or not math.isfinite(guess):
            guess = middle  # no slack lost yet (or none measured): halve the bracket
        # below every probe that missed, at most halfway down to the floor: an extrapolation is not trusted further
        guard = LINE_GUARD * width if low is not None else width / 2
        return [min(max(guess, floor + guard), high - max(LINE_GUARD * width, LINE_RESOLUTION / 2)), middle]


def _search_lines(prober: Prober, lines: Sequence[Line], probes: list[Probe]) -> None:
    """The lines side by side: each round takes every unfinished line's next run (independent probes: the worker
    pool or Ray measures them together), in the order of `lines`."""
    started = time.perf_counter()
    rounds = 0
    while True:
        jobs = [(line, job) for line in lines if (job := line.next()) is not None]
        if not jobs:
            break
        rounds += 1
        first = len(probes)
        measured = prober.probe_all([params for _, (params, _) in jobs],
                                    lambda i: f"search: round {rounds}, probe {first + min(i, len(jobs) - 1) + 1} "
                                              f"({jobs[min(i, len(jobs) - 1)][1][1]})")
        for (line, (params, label)), m in zip(jobs, measured):
            probes.append(Probe(len(probes) + 1, label, params, m))
            line.record(m)
    prober.close()
    log.info("search: %d probes in %d rounds, %s", len(probes), rounds, _duration(time.perf_counter() - started))


def _damage_lines(prober: Prober, trace: Trace, settings: SearchSettings, gates: Gates,
                  round_to: int | Rounding) -> list[Line]:
    """The method's ``--target-macs`` by predicted damage (the search's own line), beside the plain uniform ``--ratio``
    (`SearchSettings.baseline_probes` probes) and, when the method's plain target run shares by the global ranking,
    that one too: the written model is the smallest passing run of all (`choose`)."""
    objective = settings.objective
    key = objective.target_key
    default = shares_by_damage(prober)
    extra = {} if default else {"budget_allocation": "damage"}
    origin = original_slack(gates)

    def damage(kept: float) -> tuple[dict[str, Any], str]:
        return {key: round(kept, 4), **extra}, f"target {key[7:]} {round(kept, 4):g}"

    lines = [Line("damage", damage, settings.max_probes, origin, objective)]
    if settings.baseline_probes:
        uniform = _uniform_line(prober, trace, objective, round_to)
        lines.append(Line("uniform", uniform, settings.baseline_probes, origin, objective))
        if not default:
            def ranked(kept: float) -> tuple[dict[str, Any], str]:
                return {key: round(kept, 4)}, f"target {key[7:]} {round(kept, 4):g} (ranking)"

            lines.append(Line("ranking", ranked, settings.baseline_probes, origin, objective))
    return lines


def _uniform_line(prober: Prober, trace: Trace, objective: Objective, round_to: int | Rounding) -> Callable[[float], tuple[dict[str, Any], str]]:
    """Kept fraction -> the least uniform ``--ratio`` whose materialised model keeps no more (`AllocationCost`); two
    ratios of one model (rounded widths are a staircase) give the first one's settings, so a line sees the repeat."""
    cost: AllocationCost | None = None
    unfrozen = [g.index for g in trace.groups if not g.is_frozen]
    seen: dict[tuple[float, float], float] = {}  # (MACs, params) kept -> the first ratio that gave them

    def uniform(size: float) -> tuple[dict[str, Any], str]:
        nonlocal cost
        cost = cost or AllocationCost(prober, trace, round_to)
        at = cost

        def kept(ratio: float) -> float:
            macs, params = at.kept(tuple((g, ratio) for g in unfrozen))
            return macs if objective.spec.size == "macs" else params

        low, high = 0.0, MAX_UNIFORM
        for _ in range(UNIFORM_STEPS):
            mid = (low + high) / 2
            if kept(mid) <= size + 1e-9:
                high = mid
            else:
                low = mid
        ratio = seen.setdefault(at.kept(tuple((g, round(high, 4)) for g in unfrozen)), round(high, 4))
        return {"ratio": ratio}, f"uniform ratio {ratio:g}"

    return uniform


def choose(probes: Sequence[Probe], objective: Objective) -> Probe | None:
    """The smallest passing probe; of those within `EQUAL_SIZE` of it, the least damaged (then the first)."""
    passing = [p for p in probes if p.measurement.passed]
    if not passing:
        return None
    smallest = min(p.measurement.kept(objective) for p in passing)
    near = [p for p in passing if p.measurement.kept(objective) <= smallest + EQUAL_SIZE]
    return min(near, key=lambda p: (p.measurement.damage, p.measurement.kept(objective), p.index))


def _baselines(prober: Prober, trace: Trace, settings: SearchSettings, probes: list[Probe], round_to: int | Rounding) -> None:
    """The plain runs at the search's size and below it: uniform ``--ratio`` and the global ranking's target.

    A searched allocation must beat what a user gets without a search: each plain line is probed at the
    size of the smallest passing probe so far (the uniform ratio found on the materialised costs), then
    `BASELINE_STEP` smaller while it passes (the step halved after a miss), `baseline_probes` probes a line.
    `choose` then takes the smallest passing candidate of all, so none of these dominates the written one.
    """
    objective = settings.objective
    passing = [p.measurement.kept(objective) for p in probes if p.measurement.passed]
    start = min(passing) if passing else 1.0
    uniform = _uniform_line(prober, trace, objective, round_to)

    def ranked(size: float) -> tuple[dict[str, Any], str]:
        key = objective.target_key
        return {key: round(size, 4)}, f"target {key[7:]} {round(size, 4):g}"

    lines: list[Callable[[float], tuple[dict[str, Any], str]]] = [uniform]
    if not settings.allocation.spec.ranked:  # the ranking's own search is that line already
        lines.append(ranked)
    for line in lines:
        if start >= 1.0:
            size = 1.0 - BASELINE_STEP
        else:
            size = start
        step = BASELINE_STEP
        for _ in range(settings.baseline_probes):
            if size <= 0:
                break
            params, label = line(size)
            if any(p.params == params for p in probes):
                break  # a discrete line (rounded channel counts) gives the same run again: nothing new to learn
            prober.stage(f"search: plain run at {size:.3f} ({label})", len(probes), len(probes) + 1)
            m, _ = prober.probe(params)
            probes.append(Probe(len(probes) + 1, label, params, m))
            if m.passed:
                size = min(size, m.kept(objective)) - step
            else:
                step /= 2
                size += step


#: the largest uniform ratio a plain candidate takes, and the bisection steps that find it for a size
MAX_UNIFORM = 0.95
UNIFORM_STEPS = 12


def _bisect_steps(prober: Prober, steps: Sequence[Step], settings: SearchSettings, probes: list[Probe],
                  trace: Trace | None = None, round_to: int | Rounding = 1) -> None:
    """Bisection over the prefix length of the greedy order: k = 0 is the original (passes), k = len + 1 past the end."""
    lo, hi = 0, len(steps) + 1
    budget = _budget_probes(len(steps) + 1)
    total = min(settings.max_probes, budget + 2)
    log.log(logging.WARNING if prober.mean_seconds * total > LONG_SECONDS else logging.INFO,
            "search: %d greedy steps, at most %d probes%s", len(steps), total,
                f", about {_duration(prober.mean_seconds * total)}" if prober.count else "")
    seen: dict[Allocation_, Measurement] = {}
    while hi - lo > 1 and len(probes) < settings.max_probes:
        mid = (lo + hi) // 2
        allocation = allocation_at(steps, mid)
        prober.stage(f"search: probe {len(probes) + 1}/{total} ({mid}/{len(steps)} steps)", len(probes), total)
        if allocation in seen:
            m = seen[allocation]
        else:
            m, _ = prober.probe({"group_ratios": allocation})
            seen[allocation] = m
            probes.append(Probe(len(probes) + 1, f"steps {mid}/{len(steps)}", {"group_ratios": allocation}, m))
        if m.passed:
            lo = mid
        else:
            hi = mid
    if hi == lo + 1 and hi <= len(steps) and trace is not None:
        _refine(prober, trace, steps, lo, settings, probes, round_to)


def _refine(prober: Prober, trace: Trace, steps: Sequence[Step], lo: int, settings: SearchSettings, probes: list[Probe],
            round_to: int | Rounding) -> None:
    """With probes left, bisect the channel count of the first step that missed (between its two ratios)."""
    step = steps[lo]
    base = dict(allocation_at(steps, lo))
    group = trace.groups[step.group]
    multiple = Rounding.of(round_to).classes(group, trace)
    low = removed_count(group, base.get(step.group, 0.0), multiple)
    high = removed_count(group, step.ratio, multiple)
    unit = max(group.block, 1) * multiple
    while high - low > unit and len(probes) < settings.max_probes:
        n = removed_count(group, ((low + high) // 2) / group.size, multiple)
        if n <= low or n >= high:
            break
        ratio = n / group.size
        allocation = tuple(sorted({**base, step.group: ratio}.items()))
        prober.stage(f"search: probe {len(probes) + 1}/{settings.max_probes} (group {step.group}: {n} of {group.size})",
                     len(probes), settings.max_probes)
        m, _ = prober.probe({"group_ratios": allocation})
        probes.append(Probe(len(probes) + 1, f"steps {lo}/{len(steps)} + g{step.group} {n}/{group.size}",
                            {"group_ratios": allocation}, m))
        if m.passed:
            low = n
            base[step.group] = ratio
        else:
            high = n


def _budget_probes(n: int) -> int:
    return max(1, math.ceil(math.log2(max(n, 2))))


def _bisect_target(prober: Prober, settings: SearchSettings, probes: list[Probe]) -> None:
    """Bisection over the target fraction of the global ranking (`methods.budget`)."""
    key = settings.objective.target_key
    lo, hi = 1.0, 0.0  # lo: kept fraction known to pass (the original); hi: assumed to miss
    total = min(settings.max_probes, _budget_probes(int(1 / TARGET_RESOLUTION)))
    while lo - hi > TARGET_RESOLUTION and len(probes) < settings.max_probes:
        mid = round((lo + hi) / 2, 4)
        prober.stage(f"search: probe {len(probes) + 1}/{total} (target {key[7:]} {mid:g})", len(probes), total)
        m, _ = prober.probe({key: mid})
        probes.append(Probe(len(probes) + 1, f"target {key[7:]} {mid:g}", {key: mid}, m))
        if m.passed:
            lo = mid
        else:
            hi = mid


# ----------------------------------------------------------------------------- allocations as data


@dataclass(frozen=True, eq=False)
class Exploration:
    """What an allocation's probes work with (`AllocationSpec.explore`); they are appended to `probes`."""

    prober: Prober
    trace: Trace
    settings: SearchSettings
    gates: Gates
    round_to: int | Rounding
    rows: tuple[SensitivityRow, ...]  # the sensitivity profile (empty unless the allocation is `profiled`)
    probes: list[Probe]


def _explore_steps(e: Exploration) -> None:
    _bisect_steps(e.prober, greedy_steps(e.rows, e.settings.objective), e.settings, e.probes, e.trace, e.round_to)


def _explore_lines(e: Exploration) -> None:
    _search_lines(e.prober, _damage_lines(e.prober, e.trace, e.settings, e.gates, e.round_to), e.probes)


def _explore_target(e: Exploration) -> None:
    _bisect_target(e.prober, e.settings, e.probes)


@dataclass(frozen=True)
class AllocationSpec:
    """How an allocation spends a search's probes (module docstring), as data: `ALLOCATIONS`."""

    #: the sensitivity profile (a probe per group and ratio) comes first; the latency search then walks its steps
    profiled: bool
    #: spends the gated search's probes
    explore: Callable[[Exploration], None]
    #: the plain uniform and target runs are probed beside the result (`_baselines`); DAMAGE's lines hold them already
    plain_candidates: bool
    #: its probes are the method's own ``--target-<size>`` (the global ranking, or shares by predicted damage)
    ranked: bool


#: a new allocation is one member of `Allocation` and its row here (AUTO is resolved before use: `resolved`)
ALLOCATIONS: dict[Allocation, AllocationSpec] = {
    Allocation.SENSITIVITY: AllocationSpec(profiled=True, explore=_explore_steps, plain_candidates=True, ranked=False),
    Allocation.DAMAGE: AllocationSpec(profiled=False, explore=_explore_lines, plain_candidates=False, ranked=True),
    Allocation.RANKING: AllocationSpec(profiled=False, explore=_explore_target, plain_candidates=True, ranked=True),
}


def _with_search_report(outcome: SearchOutcome) -> Any:
    """The final result with the probes, the profile and the search's notes in its report."""
    result = outcome.result
    report = result.report
    extra = dict(report.extra)
    extra["search"] = {
        "allocation": outcome.settings.allocation.value, "objective": outcome.settings.objective.value,
        "max_probes": outcome.settings.max_probes, "probes": [p.to_dict() for p in outcome.probes],
        "pareto": sorted(pareto(outcome.probes, outcome.settings.objective)), "chosen": outcome.chosen,
        "selection": "probes measured on the selection half of the held-out samples; the verdict on the final half",
    }
    if outcome.sensitivity:
        extra["sensitivity"] = sensitivity_dict(outcome.sensitivity, outcome.settings, outcome.data_free)
    chosen = next((p for p in outcome.probes if p.index == outcome.chosen), None)
    request = f"searched: smallest of {len(outcome.probes)} probes within the gate" if chosen is not None \
        else f"searched: none of {len(outcome.probes)} probes kept the gate, unchanged"
    if chosen is not None:
        request += f" ({chosen.budget})"
    report = replace(report, extra=extra, request=request, notes=tuple(report.notes) + outcome.notes,
                     seconds=report.seconds + outcome.seconds)
    return replace(result, report=report)


def sensitivity_dict(rows: Sequence[SensitivityRow], settings: SearchSettings, proxy: bool = False) -> dict[str, Any]:
    return {
        "ratios": list(settings.ratios), "proxy": proxy,
        "damage": "(1 - top-1 agreement) + (1 - correlation) of the worst output, on the selection half",
        "rows": [{"group": r.group, "node": r.node, "size": r.size, "ratio": r.ratio, "removed": r.removed,
                  "macs_saved": r.macs_saved, "params_saved": r.params_saved,
                  "damage": r.damage if math.isfinite(r.damage) else None, "top1_agreement": r.top1_agreement,
                  "accuracy_drop": r.accuracy_drop, "correlation": r.correlation, "failed": r.failed,
                  "efficiency": r.efficiency if math.isfinite(r.efficiency) else None}
                 for r in sorted_rows(rows)],
    }


# ----------------------------------------------------------------------------- entry


@dataclass(frozen=True, eq=False)
class SensitivityOutcome:
    rows: tuple[SensitivityRow, ...]
    proxy: bool
    report: dict[str, Any]


def searchable(method: str | None) -> bool:
    """Whether `method` plans through the per-group planner (a search can allocate its channels).

    None, the default for the model's kind (chosen once the model is loaded): whether every default is.
    """
    from ..methods.base import get_method
    from ..methods.defaults import DEFAULT_METHODS

    if method is None:
        return all(searchable(name) for name in DEFAULT_METHODS)
    spec = get_method(method)
    return spec.default_macs is None and spec.block_fraction is None


def check_searchable(method: str | None, params: Mapping[str, Any]) -> None:
    """A search allocates channels per group: the method's plan must go through the per-group planner."""
    if not searchable(method):
        raise UsageError(f"--method {method} chooses its own allocation; a search or --sensitivity takes a channel method "
                         "(l1, l2, bn, fpgm, random, merge, thinet, cp, ldrf, nisp, mean_act, apoz)")
    if params.get("blocks"):
        raise UsageError("--blocks with a search or --sensitivity is not supported: prune the blocks first, then search")
    if params.get("group_ratios") is not None:
        raise UsageError("group_ratios is the search's own setting")


def baseline(prober: Prober) -> Trace:
    """The trace of the model the channel stage sees: the prepared one (else from a probe that removes nothing)."""
    analysis = prober.prepared().analysis
    if analysis is not None:
        return analysis.trace
    with _quiet():
        result = prober.run({"group_ratios": ()}, VerdictPart.SELECTION)
    return result.trace


def run_sensitivity(prober: Prober, settings: SearchSettings, round_to: int | Rounding, proxy: bool) -> SensitivityOutcome:
    check_searchable(prober.method, prober.params)
    trace = baseline(prober)
    rows = sensitivity(prober, trace, settings, round_to)
    return SensitivityOutcome(rows, proxy, sensitivity_dict(rows, settings, proxy))


def run_search(prober: Prober, settings: SearchSettings, round_to: int | Rounding, gates: Gates, *, with_sensitivity: bool) -> SearchOutcome:
    """The gated search; with `with_sensitivity` the profile is measured (and reported) even for the ranking allocation."""
    check_searchable(prober.method, prober.params)
    trace = baseline(prober)
    rows = sensitivity(prober, trace, settings, round_to) if with_sensitivity else None
    return search(prober, trace, settings, round_to, gates, rows)


# ----------------------------------------------------------------------------- a budget with the same allocation


class AllocationCost:
    """Kept MACs and parameters of an allocation: its plan materialised (the cost depends on the counts only)."""

    def __init__(self, prober: Prober, trace: Trace, round_to: int | Rounding) -> None:
        from .. import api
        from ..judge import validate

        user = dict(prober.settings.input_shapes or {})
        shapes = api.resolve_input_shapes(prober.model, user, preprocess=prober.settings.preprocess)
        self.analysis = api.analyze(prober.model, input_shapes=shapes, exclude=prober.settings.exclude)
        if [g.size for g in self.analysis.trace.groups] != [g.size for g in trace.groups]:
            raise UsageError("the traced groups differ from the pipeline's (dynamic shapes?): give --input-shape")
        self.round_to = round_to
        self.before = validate.model_stats(prober.model, self.analysis.input_shapes)

    def kept(self, allocation: Allocation_) -> tuple[float, float]:
        import numpy as np

        from ..judge import validate
        from ..analysis.materialize import materialize
        from ..analysis.plan import uniform_plan

        a = self.analysis
        scores = {g.index: np.zeros(g.size) for g in a.trace.groups if not g.is_frozen}
        plan = uniform_plan(a.trace, scores, 0.0, self.round_to, dict(allocation))
        stats = validate.model_stats(materialize(a.graph, a.model, a.trace, plan, a.opset), a.input_shapes)
        return stats.macs / max(self.before.macs, 1), stats.params / max(self.before.params, 1)


#: bisection steps of the last greedy step's ratio (a group's channel count is found to 1/2**8 of the step)
REFINE_STEPS = 8


def _refined_last_step(steps: Sequence[Step], k: int, meets: Callable[[Allocation_], bool]) -> Allocation_:
    """The first `k` steps, with the group of the last one cut only as far as the target needs.

    One hull step can move a group from 0.25 to 0.5 of its channels, so the shortest prefix that meets a target
    may overshoot it by that group's whole step; the ratio of that last step is bisected between the group's
    previous ratio (which misses) and the step's (which meets) so the target is met with the most kept.
    """
    last = steps[k - 1]
    before = dict(allocation_at(steps, k - 1))
    low, high = before.get(last.group, 0.0), last.ratio

    def at(ratio: float) -> Allocation_:
        return tuple(sorted({**before, last.group: ratio}.items()))

    for _ in range(REFINE_STEPS):
        mid = (low + high) / 2
        if meets(at(mid)):
            high = mid
        else:
            low = mid
    return at(high)


def run_targeted(prober: Prober, settings: SearchSettings, round_to: int | Rounding) -> SearchOutcome:
    """--target-macs / --target-params with the sensitivity allocation: the shortest greedy prefix meeting the target.

    The profile is measured on the selection half, the written model judged on the final half (as a search's).
    """
    check_searchable(prober.method, prober.params)
    if not prober.targets:
        raise UsageError("run_targeted needs --target-macs or --target-params")
    trace = baseline(prober)
    rows = sensitivity(prober, trace, settings, round_to)
    objective = Objective.MACS if "target_macs" in prober.targets else Objective.PARAMS
    steps = greedy_steps(rows, objective)
    cost = AllocationCost(prober, trace, round_to)

    def meets_allocation(allocation: Allocation_) -> bool:
        macs, params = cost.kept(allocation)
        return all(kept <= prober.targets[key] + 1e-9 for key, kept in (("target_macs", macs), ("target_params", params))
                   if key in prober.targets)

    def meets(k: int) -> bool:
        return meets_allocation(allocation_at(steps, k))

    notes: list[str] = []
    lo, hi = 0, len(steps)  # invariant: k = lo misses (unless 0 meets), k = hi meets (checked)
    if meets(0):
        hi = 0
    elif not meets(hi):
        message = (f"target {prober.targets} is not reachable with the profile's ratios (at most "
                   f"{max(settings.ratios):g} of a group): every step is taken")
        log.warning("%s", message)
        notes.append(message)
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
    allocation = _refined_last_step(steps, hi, meets_allocation) if 0 < hi and meets(hi) else allocation_at(steps, hi)
    prober.stage(f"target: {hi}/{len(steps)} greedy steps, judged on the final half", 1, 1)
    result = prober.run({"group_ratios": allocation}, VerdictPart.FINAL, latency=prober.latency)
    macs, params = cost.kept(allocation)
    probe = Probe(1, f"steps {hi}/{len(steps)}", {"group_ratios": allocation},
                  Measurement.of(result, 0.0, prober.margin))
    outcome = SearchOutcome(result, (probe,), rows, 1, settings, tuple(notes), prober.seconds, prober.data_free)
    outcome = replace(outcome, result=_with_search_report(outcome))
    report = outcome.result.report
    words = " and ".join(f"{k[7:]} {v:g}" for k, v in prober.targets.items())
    report = replace(report, request=f"target {words}, sensitivity allocation ({hi}/{len(steps)} greedy steps; "
                                     f"MACs {macs:.3f}, params {params:.3f})")
    return replace(outcome, result=replace(outcome.result, report=report))


# ----------------------------------------------------------------------------- the Python API


def find_smallest(model: onnx.ModelProto | str | os.PathLike[str], method: str | None | RunSettings, gates: Gates, *,
                  settings: SearchSettings = SearchSettings(), workers: int = 1, ray_address: str | None = None,
                  progress: Callable[[int, int], None] | None = None, **prune_kwargs: Any) -> SearchOutcome:
    """The smallest model within `gates` (the CLI's gate without ``--ratio``): profile, allocation, search.

        outcome = find_smallest("model.onnx", "ldrf", Gates(max_drop=1.0), calib="calib.npz", eval_data="eval.npz")
        outcome.result.model        # the written model, judged on the final half (outcome.result.report.verdict)
        outcome.probes, outcome.sensitivity

    `method` and `prune_kwargs` are `api.prune`'s (a `RunSettings`, or ``calib``, ``eval_data``, ``round_to``,
    ``params`` ...); `workers` local processes or the Ray cluster at `ray_address` measure the sensitivity profile
    (`planning.workers`).
    """
    run = RunSettings.of(method, gates=gates, **prune_kwargs)
    prober = Prober(_proto(model), run, progress=progress, margin=settings.margin, workers=workers,
                    ray_address=ray_address)
    try:
        return run_search(prober, settings, Rounding.of(run.round_to), gates, with_sensitivity=settings.allocation is Allocation.SENSITIVITY)
    finally:
        prober.close()


def sensitivity_profile(model: onnx.ModelProto | str | os.PathLike[str], method: str | None | RunSettings, *,
                        settings: SearchSettings = SearchSettings(), workers: int = 1, ray_address: str | None = None,
                        progress: Callable[[int, int], None] | None = None, **prune_kwargs: Any) -> SensitivityOutcome:
    """Each prunable group cut alone at `settings.ratios` (the CLI's ``--sensitivity``); no model is written.

        profile = sensitivity_profile("model.onnx", "ldrf", calib="calib.npz", workers=2)
        print(sensitivity_table(profile.rows))
    """
    run = RunSettings.of(method, **prune_kwargs)
    prober = Prober(_proto(model), run, progress=progress, workers=workers, ray_address=ray_address)
    try:
        return run_sensitivity(prober, settings, Rounding.of(run.round_to), prober.data_free)
    finally:
        prober.close()


def _proto(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    from .. import ir

    return model if isinstance(model, onnx.ModelProto) else ir.load_model(model)
