"""Stages of a run, their timing, and the progress protocol between the library and its caller.

The library reports progress as ``progress(done, total)`` within a stage; a caller whose
progress object also has ``stage(name)`` is told when each stage begins (the CLI draws a
bar per stage on a terminal and writes periodic lines in CI logs). `StageClock` times the
stages for the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class Stage(str, Enum):
    LOAD = "load"
    CALIBRATION = "calibration data"
    REFERENCE = "original outputs"
    TRACE = "trace"
    METHOD = "method (scores, statistics, selection)"
    APPLY = "apply"
    RECONSTRUCT = "reconstruction"
    RECOVER = "recovery"
    VALIDATE = "validation"
    VERDICT = "verdict"
    LATENCY = "latency"


@runtime_checkable
class StageListener(Protocol):
    def stage(self, name: str) -> None: ...


class StageClock:
    """Seconds per stage (a stage entered twice adds up), forwarded to a listener."""

    def __init__(self, listener: object | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._listener = listener if isinstance(listener, StageListener) else None

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        if self._listener is not None:
            self._listener.stage(stage.value)
        started = time.perf_counter()
        log.debug("stage %s: started", stage.value)
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.seconds[stage.value] = self.seconds.get(stage.value, 0.0) + spent
            log.debug("stage %s: done in %.1f s", stage.value, spent)
