"""Passes over a run's state, and the manager that runs them (in the manner of onnxscript's ``ir.passes``).

A `Pass` says which fields of the state it reads (`requires`: set, not None, before it runs) and which it
leaves set (`ensures`); `applies` says whether it has anything to do for this run. The `PassManager` runs a
sequence of them in order, each in its progress stage (`progress.StageClock`: the stages the progress display
names and the report times are the passes'), checks the contract on both sides, and returns what each pass did
(`PassResult`). When a pass raises, the error keeps its type (the CLI's one-line messages and exit codes
depend on it) and the manager records the failing pass's name (`PassManager.failed`; from Python 3.11 also
a note on the error, which a traceback shows); a broken contract is a `PassContractError`, a fault of this
package, never of the user's model.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Generic, TypeVar

from ..progress import Stage, StageClock

log = logging.getLogger(__name__)

State = TypeVar("State")


class PassContractError(AssertionError):
    """A pass ran without a field it requires, or left unset a field it ensures (a fault of the pipeline)."""


class PassStatus(str, Enum):
    RAN = "ran"
    SKIPPED = "skipped"  # `Pass.applies` said there was nothing to do


@dataclass(frozen=True)
class PassResult:
    """What one pass did: its name, its stage, whether it ran, and its wall time."""

    name: str
    stage: Stage | None
    status: PassStatus
    seconds: float = 0.0


class Pass(ABC, Generic[State]):
    """One step of a pipeline over `State`; subclasses set `stage`, `requires` and `ensures` and define `call`."""

    #: the progress stage the pass runs in (None: too short to show, timed with its neighbours)
    stage: ClassVar[Stage | None] = None
    #: fields of the state that must be set (not None) before the pass runs
    requires: ClassVar[frozenset[str]] = frozenset()
    #: fields of the state the pass leaves set (not None)
    ensures: ClassVar[frozenset[str]] = frozenset()

    @property
    def name(self) -> str:
        return type(self).__name__

    def applies(self, state: State) -> bool:
        """Whether the pass has anything to do in this run (a skipped pass is reported, not run)."""
        return True

    @abstractmethod
    def call(self, state: State) -> None:
        """Read the required fields of `state` and set the ensured ones."""


def _unset(state: object, fields: frozenset[str]) -> list[str]:
    return sorted(f for f in fields if getattr(state, f, None) is None)


class PassManager(Generic[State]):
    """Runs passes in order over one state, each in its stage of `clock`; returns what each did."""

    def __init__(self, passes: Sequence[Pass[State]]) -> None:
        self.passes = tuple(passes)
        self.failed: str | None = None  # the pass that raised, if one did

    def run(self, state: State, clock: StageClock) -> tuple[PassResult, ...]:
        results: list[PassResult] = []
        for step in self.passes:
            if not step.applies(state):
                results.append(PassResult(step.name, step.stage, PassStatus.SKIPPED))
                continue
            missing = _unset(state, step.requires)
            if missing:
                raise PassContractError(f"pass {step.name} requires {', '.join(missing)}, which no earlier pass set")
            started = time.perf_counter()
            try:
                if step.stage is None:
                    step.call(state)
                else:
                    with clock.stage(step.stage):
                        step.call(state)
            except BaseException as error:
                self.failed = step.name
                log.debug("pass %s failed: %r", step.name, error)
                add_note = getattr(error, "add_note", None)  # Python 3.11 on: a traceback names the pass
                if add_note is not None:
                    add_note(f"(in pass {step.name})")
                raise
            unset = _unset(state, step.ensures)
            if unset:
                raise PassContractError(f"pass {step.name} left {', '.join(unset)} unset")
            results.append(PassResult(step.name, step.stage, PassStatus.RAN, time.perf_counter() - started))
        return tuple(results)
