"""Method registry: a method turns an analysed model into an `Outcome` (plan + compensation).

A method sees the traced graph and the options and returns what to remove (`plan`),
full-size constants to substitute before slicing (`overrides`, e.g. merged outgoing
weights), and an optional `finish` step run on the pruned model (e.g. least-squares
reconstruction from calibration data). Methods register themselves by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UsageError
from .plan import Plan, uniform_plan
from .score import CRITERIA, score_groups
from ..channels import Trace


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


#: Neuron Merging's selection criteria and scales (see `merge`)
MERGE_CRITERIA = ("l1", "l2", "fpgm")
MERGE_SCALES = ("norm", "projection")


def _number(key: str, value: Any, low: float, high: float, *, low_open: bool = False, integer: bool = False) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be a number, got {value!r}") from None
    inside = (number > low if low_open else number >= low) and number <= high
    if not math.isfinite(number) or not inside or (integer and number != int(number)):
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{key} must be {kind} in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")


#: every method setting `Options.params` may hold, and the check of its value
PARAM_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "merge_threshold": lambda k, v: _number("--merge-threshold", v, 0.0, 1.0),
    "merge_scale": lambda k, v: None if v in MERGE_SCALES else _bad_choice("--merge-scale", v, MERGE_SCALES),
    "target_macs": lambda k, v: _number("--target-macs", v, 0.0, 1.0, low_open=True),
    "target_params": lambda k, v: _number("--target-params", v, 0.0, 1.0, low_open=True),
    "max_ratio": lambda k, v: _number("--max-ratio", v, 0.0, 1.0, low_open=True),
    "blocks": lambda k, v: _number("--blocks", v, 0.0, 1.0),
    "reconstruct": lambda k, v: None if isinstance(v, bool) else _bad_choice(k, v, (True, False)),
    "calib_positions": lambda k, v: _number("--calib-positions", v, 1, math.inf, integer=True),
    "ridge": lambda k, v: _number(k, v, 0.0, math.inf),
    "energy": lambda k, v: _number(k, v, 0.0, 1.0, low_open=True),
    "residual_targets": lambda k, v: None if isinstance(v, bool) else _bad_choice(k, v, (True, False)),
    "lcp_iterations": lambda k, v: _number(k, v, 1, math.inf, integer=True),
    "lcp_population": lambda k, v: _number(k, v, 1, math.inf, integer=True),
    "lcp_samples": lambda k, v: _number(k, v, 1, math.inf, integer=True),
    "lcp_tournament": lambda k, v: _number(k, v, 1, math.inf, integer=True),
    "block_criterion": lambda k, v: None if v in ("output", "norm") else _bad_choice(k, v, ("output", "norm")),
    "block_samples": lambda k, v: _number(k, v, 1, math.inf, integer=True),
}


def _bad_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    raise UsageError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_options(options: Options) -> tuple[str, ...]:
    """Raise `UsageError` for a bad value or an unknown setting; warn of settings the method ignores."""
    get_method(options.method)
    if isinstance(options.seed, bool) or not isinstance(options.seed, (int, np.integer)) or options.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {options.seed!r}")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {options.batch_size}")
    if options.calib_samples is not None and options.calib_samples < 1:
        raise UsageError(f"--calib-samples must be a positive integer, got {options.calib_samples}")
    unknown = sorted(set(options.params) - set(PARAM_CHECKS))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(PARAM_CHECKS))}")
    for key, value in options.params.items():
        if value is not None:
            PARAM_CHECKS[key](key, value)
    params, method = options.params, options.method
    if method == "merge" and options.criterion not in MERGE_CRITERIA:
        _bad_choice("--criterion (with --method merge)", options.criterion, MERGE_CRITERIA)
    warnings = []
    if options.criterion != "l1" and method not in ("merge", "lcp"):
        warnings.append(f"--criterion is used by --method merge and lcp only; {method} ignores it")
    if method != "merge" and any(params.get(k) is not None for k in ("merge_threshold", "merge_scale")):
        warnings.append(f"--merge-threshold and --merge-scale are used by --method merge only; {method} ignores them")
    if params.get("reconstruct") and options.calib is None:
        warnings.append("--reconstruct needs calibration data (--calib); nothing is refitted")
    if method == "layer" and any(params.get(k) is not None for k in ("target_macs", "target_params", "blocks")):
        warnings.append("--method layer removes the fraction --ratio of the residual blocks; budgets and --blocks are ignored")
    return tuple(warnings)


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
