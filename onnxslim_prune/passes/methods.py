"""Method registry: a method turns an analysed model into an `Outcome` (plan + compensation).

A method sees the traced graph and the options and returns what to remove (`plan`),
full-size constants to substitute before slicing (`overrides`, e.g. merged outgoing
weights), and an optional `finish` step run on the pruned model (e.g. least-squares
reconstruction from calibration data). Methods register themselves by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UsageError
from .plan import Plan, uniform_plan
from .score import CRITERIA, score_groups
from .trace import Trace


@dataclass(frozen=True)
class Options:
    method: str = "l1"
    ratio: float = 0.5
    round_to: int = 1
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    criterion: str = "l1"
    calib: str | None = None
    calib_samples: int | None = None
    batch_size: int = 32
    params: Mapping[str, Any] = field(default_factory=dict)  # method-specific settings


@dataclass
class Context:
    model: onnx.ModelProto  # the original, untouched
    graph: gs.Graph  # the working graph, rewritten by apply
    trace: Trace
    options: Options
    input_shapes: Mapping[str, tuple[int, ...]]
    opset: int
    calibration: Any = None  # calib.CalibrationSet when --calib was given
    progress: Callable[[int, int], None] | None = None
    notes: list[str] = field(default_factory=list)  # shared steps (budgets) report here


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    overrides: Mapping[tuple[str, int], np.ndarray] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    finish: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    needs_calibration: bool = False


Method = Callable[[Context], Outcome]
METHODS: dict[str, Method] = {}
#: methods that cannot run without calibration data (the CLI names --calib when it is missing)
DATA_DRIVEN: set[str] = set()


def register(name: str, *, data_driven: bool = False) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        if data_driven:
            DATA_DRIVEN.add(name)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


def choose_plan(ctx: Context, scores: Mapping[int, np.ndarray]) -> Plan:
    """Uniform ratio per group, or a global ranking under --target-macs / --target-params."""
    params = ctx.options.params
    if params.get("target_macs") is not None or params.get("target_params") is not None:
        from .budget import global_plan_with_notes

        plan, notes = global_plan_with_notes(ctx, scores)
        ctx.notes.extend(notes)
        return plan
    return uniform_plan(ctx.trace, scores, ctx.options.ratio, ctx.options.round_to)


def _criterion_method(name: str) -> Method:
    def method(ctx: Context) -> Outcome:
        return Outcome(choose_plan(ctx, score_groups(ctx.trace, ctx.graph, name, ctx.options.seed)))

    method.__doc__ = f"Uniform ratio per group, lowest `{name}` scores removed."
    return method


for _name in CRITERIA:
    register(_name)(_criterion_method(_name))
