"""Latency of the original and the pruned model, measured in the same run (onnxruntime CPU).

Both sessions are built with the same options and fed the same single batch. After
`WARMUP` runs each (fewer for a slow model, see `WARMUP_SECONDS`), the two are timed in
interleaved rounds (the order alternating each round, so neither always runs on a warmer
cache or a quieter core) until `MAX_ROUNDS` rounds or `BUDGET_SECONDS` have passed, and at
least `MIN_ROUNDS`; the figure is each model's median. A caller that only needs a decision
(the speed gates of a run) passes the ratios where it flips (`decided_at`): the rounds then
stop as soon as the interval below lies on one side of each, after `MIN_ROUNDS`, or after `CLEAR_ROUNDS` when
every round is twice clear of each (`_clear`: VGG-16 at half its channels, every ratio near 0.25, stops after 3
rounds of 0.45 s). It is a ratio in one run, not a benchmark: other load on the machine
moves both medians alike. The per-round ratios (pruned / original, the two runs of one round
paired) also give a distribution-free 95% interval of their median (`median_interval`: the
order statistics of a sign test).

Never slower. Every run that measures latency gates on it (`speed_gates`, beside the verdict's
gates: a missed one is exit 3 and the model is not written without ``--keep-failed``):

    not-slower    missed when  after / before > 1 + SLOWER_TOLERANCE  and  the interval's low end > 1
    --min-speedup missed when  before / after < F

``after / before`` is the ratio of the two medians (the report's ``speedup`` inverted). A model is
called slower only when it measurably is: by more than `SLOWER_TOLERANCE` (3%, above the up to
2.5% by which two identical models' medians differed on this project's busy 2-core machine, the A/A
column of ``benchmarks/bench_never_slower.py``) and with the whole interval above 1, so noise of a loaded
machine does not refuse a model that is as fast as the original, while the models of issue 21
(1.7x-2.0x slower) are refused. ``--min-speedup`` is a plain threshold on the point estimate, as
the other gates. Without a measurement (``--no-latency``) no speed gate is checked and the report
says the speed is unknown.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from .verdict import Gates, GateResult, Verdict

WARMUP = 3
#: a model's warm-up stops after this many seconds, at one run at least (the first run allocates; VGG-16 takes 0.3 s
#: a run on one thread, and three warm-up runs of it were a second of a plain run)
WARMUP_SECONDS = 0.25
MIN_ROUNDS = 5
#: a decision may stop after this many rounds when every one of them is `CLEAR_FACTOR` away from every ratio where it
#: flips (`_clear`): VGG-16 at half its channels measures about 0.25 in every round against gates at 1.0 and 1.03
CLEAR_ROUNDS = 3
CLEAR_FACTOR = 2.0
MAX_ROUNDS = 50
BUDGET_SECONDS = 3.0
#: a model is slower only when its median latency is more than this fraction above the original's (module docstring)
SLOWER_TOLERANCE = 0.03
#: the figures of the speed gates (`GateResult.figure`): not in the verdict, measured after it
SPEED_FIGURES = frozenset({"latency_ratio", "speedup"})
NOT_SLOWER = "not-slower"


@dataclass(frozen=True)
class Latency:
    before_ms: float
    after_ms: float
    rounds: int
    batch: int
    #: ~95% interval of the median per-round ratio after / before (`median_interval`)
    ratio_interval: tuple[float, float] | None = None
    clock: str = "wall"  # what timed each run: "wall" or "thread-cpu"
    threads: int = 0  # intra-op threads of the sessions (0: onnxruntime's default)

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms if self.after_ms > 0 else float("inf")

    @property
    def ratio(self) -> float:
        """The pruned model's median latency over the original's."""
        return self.after_ms / self.before_ms if self.before_ms > 0 else float("inf")

    @property
    def slower(self) -> bool:
        """Measurably slower than the original (module docstring)."""
        low = 0.0 if self.ratio_interval is None else self.ratio_interval[0]
        return self.ratio > 1.0 + SLOWER_TOLERANCE and (self.ratio_interval is None or low > 1.0)

    def to_dict(self) -> dict[str, object]:
        return {"before_ms": self.before_ms, "after_ms": self.after_ms, "speedup": self.speedup, "ratio": self.ratio,
                "ratio_ci95": None if self.ratio_interval is None else list(self.ratio_interval),
                "slower": self.slower, "slower_tolerance": SLOWER_TOLERANCE,
                "rounds": self.rounds, "batch": self.batch, "clock": self.clock, "threads": self.threads}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval of the median of `values`: the sign test's order statistics k and n - k + 1, k the
    largest with ``2 P(Bin(n, 1/2) <= k - 1) <= 1 - level``; below 6 values no k reaches 95% and the extremes are
    taken (coverage ``1 - 2^(1-n)``: 93.8% with 5). None without values."""
    n = len(values)
    if n == 0:
        return None
    k, tail = 1, 1.0 / 2.0**n  # tail = P(X <= k - 1)
    while k < (n + 1) // 2 and 2.0 * (tail + math.comb(n, k) / 2.0**n) <= 1.0 - level:
        tail += math.comb(n, k) / 2.0**n
        k += 1
    ordered = sorted(values)
    return (ordered[k - 1], ordered[n - k])


def speed_gates(timing: Latency | None, gates: Gates, *, unchanged: bool = False) -> tuple[GateResult, ...]:
    """The speed gates of a measurement (module docstring); none without one (the speed is then unknown).

    `unchanged`: the written model is the original (nothing was pruned): it is not slower than itself, whatever
    the noise of its measurement says.
    """
    if timing is None:
        return ()
    ratio = timing.ratio
    interval = "" if timing.ratio_interval is None else \
        f", 95% interval {timing.ratio_interval[0]:.3f}-{timing.ratio_interval[1]:.3f}"
    slower = timing.slower and not unchanged
    how = (f"takes {ratio:.3f}x the original's time (median of {timing.rounds} interleaved runs{interval}; slower "
           f"means above {1 + SLOWER_TOLERANCE:g} with the interval above 1)")
    if unchanged:
        how = "the model is the original, unchanged (nothing was pruned)"
    elif slower:
        how = (f"the pruned model is slower than the original: it {how}; odd channel counts defeat the CPU's blocked "
               "kernels (keep --round-to auto) and tiny models are dominated by per-op overhead")
    else:
        how = f"the pruned model {how}"
    out = [GateResult(NOT_SLOWER, "latency_ratio", 1.0 + SLOWER_TOLERANCE, ratio, not slower, f"{NOT_SLOWER}: {how}")]
    if gates.min_speedup is not None:
        speedup = timing.speedup
        passed = speedup >= gates.min_speedup
        missed = "" if passed else f", missed by {gates.min_speedup - speedup:.3g}"
        out.append(GateResult("--min-speedup", "speedup", gates.min_speedup, speedup, passed,
                              f"--min-speedup {gates.min_speedup:g}: speedup is {speedup:.3f}x (needs at least "
                              f"{gates.min_speedup:g}){missed}"))
    return tuple(out)


def with_speed_gates(verdict: Verdict, timing: Latency | None, gates: Gates, *, unchanged: bool = False) -> Verdict:
    """`verdict` with its speed gates replaced by those of `timing` (see `speed_gates`)."""
    kept = tuple(g for g in verdict.gates if g.figure not in SPEED_FIGURES)
    return replace(verdict, gates=kept + speed_gates(timing, gates, unchanged=unchanged))


def measure(
    original: onnx.ModelProto, pruned: onnx.ModelProto, feed: Mapping[str, np.ndarray],
    sessions: tuple[Any, Any] = (None, None), clock: Callable[[], float] = time.perf_counter, threads: int = 0,
    decided_at: Iterable[float] = (),
) -> Latency:
    """Median latency of each model on `feed` (see the module docstring).

    `sessions` are the caller's sessions of the two models (built with `validate.session`'s
    options, as the ones made here), reused instead of building new ones. `clock` times each run
    (wall time; `time.thread_time` counts the calling thread's CPU time only, which is the run's
    whole time with single-threaded sessions and is not inflated by other processes); the time
    budget of the rounds is always wall time. `threads`: the intra-op threads of the sessions
    built here (0: onnxruntime's default), recorded in the result. `decided_at`: ratios (after / before) at which
    the caller's decision flips (`gate_ratios`); the rounds stop once the interval of the per-round ratios contains
    none of them (after `MIN_ROUNDS`); empty, the rounds run to the budget (a figure, not a decision, is wanted).
    """
    from .validate import session

    sessions = (sessions[0] or session(original, threads), sessions[1] or session(pruned, threads))
    feed = dict(feed)
    for sess in sessions:
        warming = time.perf_counter()
        for _ in range(WARMUP):
            sess.run(None, feed)
            if time.perf_counter() - warming >= WARMUP_SECONDS:
                break
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    rounds = 0
    thresholds = tuple(decided_at)
    while rounds < MAX_ROUNDS and not _enough(times, thresholds, time.perf_counter() - started):
        order = (0, 1) if rounds % 2 == 0 else (1, 0)
        for which in order:
            t0 = clock()
            sessions[which].run(None, feed)
            times[which].append(clock() - t0)
        rounds += 1
    batch = len(next(iter(feed.values()))) if feed else 1
    ratios = _ratios(times)
    clock_name = "thread-cpu" if clock is time.thread_time else "wall"
    return Latency(1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1]), rounds, batch,
                   median_interval(ratios), clock_name, threads)


def gate_ratios(gates: Gates) -> tuple[float, ...]:
    """The ratios after / before at which the speed gates flip (`speed_gates`): `measure`'s `decided_at`."""
    at = (1.0, 1.0 + SLOWER_TOLERANCE)
    return at if gates.min_speedup is None else (*at, 1.0 / gates.min_speedup)


def _ratios(times: tuple[list[float], list[float]]) -> list[float]:
    """The per-round ratios after / before (the two runs of one round paired)."""
    return [after / before for before, after in zip(*times) if before > 0]


def _enough(times: tuple[list[float], list[float]], thresholds: tuple[float, ...], elapsed: float) -> bool:
    """Whether the rounds so far suffice: `MIN_ROUNDS` and then the budget or a decision, or fewer rounds that are all
    far clear of every threshold."""
    if len(times[0]) < MIN_ROUNDS:
        return _clear(times, thresholds)
    return elapsed >= BUDGET_SECONDS or _decided(times, thresholds)


def _clear(times: tuple[list[float], list[float]], thresholds: tuple[float, ...]) -> bool:
    """`CLEAR_ROUNDS` rounds or more, each of whose ratios lies `CLEAR_FACTOR` below or above every threshold.

    Noise of a busy machine inflates a run's time by tens of percent, not by half in every interleaved round for one
    model only: three rounds at a quarter of the original's time say as surely as five that it is not slower.
    """
    ratios = _ratios(times)
    return (bool(thresholds) and len(ratios) >= CLEAR_ROUNDS
            and all(r * CLEAR_FACTOR < t or r > t * CLEAR_FACTOR for r in ratios for t in thresholds))


def _decided(times: tuple[list[float], list[float]], thresholds: tuple[float, ...]) -> bool:
    """The interval of the per-round ratios so far lies on one side of every threshold (none: never decided).

    Stopping there is a sequential test: with 5 rounds the interval is their range, and a model whose true median
    ratio is on the other side of a threshold gives 5 ratios all on this side with probability at most 1/32.
    """
    if not thresholds:
        return False
    interval = median_interval(_ratios(times))
    return interval is not None and not any(interval[0] <= t <= interval[1] for t in thresholds)

