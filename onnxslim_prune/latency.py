"""Latency of the original and the pruned model, measured in the same run (onnxruntime CPU).

Both sessions are built with the same options and fed the same single batch. After
`WARMUP` runs each, the two are timed in interleaved rounds (the order alternating each
round, so neither always runs on a warmer cache or a quieter core) until `MAX_ROUNDS`
rounds or `BUDGET_SECONDS` have passed, and at least `MIN_ROUNDS`; the figure is each
model's median. It is a ratio in one run, not a benchmark: other load on the machine
moves both medians alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

WARMUP = 3
MIN_ROUNDS = 5
MAX_ROUNDS = 50
BUDGET_SECONDS = 3.0


@dataclass(frozen=True)
class Latency:
    before_ms: float
    after_ms: float
    rounds: int
    batch: int

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms if self.after_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, float | int]:
        return {"before_ms": self.before_ms, "after_ms": self.after_ms, "speedup": self.speedup,
                "rounds": self.rounds, "batch": self.batch}


def measure(
    original: onnx.ModelProto, pruned: onnx.ModelProto, feed: Mapping[str, np.ndarray],
    sessions: tuple[Any, Any] = (None, None), clock: Callable[[], float] = time.perf_counter,
) -> Latency:
    """Median latency of each model on `feed` (see the module docstring).

    `sessions` are the caller's sessions of the two models (built with `validate.session`'s
    options, as the ones made here), reused instead of building new ones. `clock` times each run
    (wall time; `time.thread_time` counts the calling thread's CPU time only, which is the run's
    whole time with single-threaded sessions and is not inflated by other processes); the time
    budget of the rounds is always wall time.
    """
    from .validate import session

    sessions = (sessions[0] or session(original), sessions[1] or session(pruned))
    feed = dict(feed)
    for sess in sessions:
        for _ in range(WARMUP):
            sess.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or time.perf_counter() - started < BUDGET_SECONDS):
        order = (0, 1) if rounds % 2 == 0 else (1, 0)
        for which in order:
            t0 = clock()
            sessions[which].run(None, feed)
            times[which].append(clock() - t0)
        rounds += 1
    batch = len(next(iter(feed.values()))) if feed else 1
    return Latency(1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1]), rounds, batch)
