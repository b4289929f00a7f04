"""Python API: `analyze` (trace only) and `prune` (trace, plan, apply, validate).

    result = prune("model.onnx", method="l1", ratio=0.5)
    result.model   # onnx.ModelProto, validated
    result.report  # Report: params, MACs, agreement, groups
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from . import ir, validate
from .errors import CalibrationError, UsageError
from .evaluation import EvalData, accuracy, load_eval
from .passes import blocks, budget, datadriven, merge, reconstruct  # noqa: F401  (they register methods)
from .passes import methods as methods_mod
from .passes.apply import apply_plan
from .passes.methods import Context, Options, get_method
from .passes.plan import Plan, check_ratio
from .passes.trace import Trace, trace
from .report import Report, group_rows

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class Analysis:
    model: onnx.ModelProto
    graph: Any  # gs.Graph, normalised; tracing never modifies it
    trace: Trace
    input_shapes: Mapping[str, tuple[int, ...]]
    opset: int


@dataclass(frozen=True, eq=False)
class PruneResult:
    model: onnx.ModelProto
    report: Report
    trace: Trace
    plan: Plan


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return ir.load_model(model)


def analyze(
    model: ModelLike,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    exclude: Sequence[str] = (),
) -> Analysis:
    """Load, check, normalise and trace; nothing is modified."""
    proto = _load(model)
    ir.check_model(proto, full=False, what="input model")
    shapes_in = ir.fixed_input_shapes(proto, input_shapes)
    opset = ir.opset_version(proto)
    graph = ir.to_graph(proto)
    folded = _export_plain(graph, proto)
    shapes = ir.static_shapes(folded, shapes_in)
    return Analysis(proto, graph, trace(graph, shapes, exclude, opset), shapes_in, opset)


def _export_plain(graph: Any, like: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    out = gs.export_onnx(graph.copy(), do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    return out


def prune(
    model: ModelLike,
    method: str = "l1",
    ratio: float = 0.5,
    *,
    round_to: int = 1,
    exclude: Sequence[str] = (),
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    criterion: str = "l1",
    calib: str | os.PathLike[str] | None = None,
    calib_samples: int | None = None,
    batch_size: int = 32,
    eval_data: str | os.PathLike[str] | None = None,
    params: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    preprocess: Any = None,
) -> PruneResult:
    """Prune `model` with `method`; the returned model is validated (see `validate`)."""
    started = time.perf_counter()
    fn = get_method(method)
    options = Options(
        method=method, ratio=ratio, round_to=round_to, exclude=_patterns(exclude), input_shapes=dict(input_shapes or {}),
        seed=seed, criterion=criterion, calib=None if calib is None else str(calib), calib_samples=calib_samples,
        batch_size=batch_size, params=dict(params or {}),
    )
    exclude = options.exclude
    notes = _checked(options)
    if method in methods_mod.DATA_DRIVEN and calib is None:
        raise CalibrationError(f"method {method!r} needs calibration data: pass --calib PATH (or --calib random)")
    original = _load(model)
    ir.check_model(original, full=False, what="input model")
    shapes_in = ir.fixed_input_shapes(original, input_shapes)
    notes.extend(_dynamic_dims_warning(original, input_shapes))
    calibration = _calibration(options, original, shapes_in, preprocess) if calib is not None else None
    evaluation = load_eval(eval_data, original, input_shapes) if eval_data is not None else None
    # the original's accuracy needs no pruning: measured first, so bad data (labels past the classes) fails before the work
    accuracy_before = None if evaluation is None else accuracy(original, *_eval_args(evaluation))
    working = original
    block_fraction = ratio if method == "layer" else options.params.get("blocks")
    if block_fraction:
        from .passes.blocks import prune_blocks

        working, block_notes = prune_blocks(original, float(block_fraction), calibration, shapes_in, options)
        notes.extend(block_notes)
    analysis = analyze(working, input_shapes=input_shapes, exclude=exclude)
    graph = analysis.graph
    notes.extend(_unmatched_excludes([n.name for n in graph.nodes], exclude))
    ctx = Context(working, graph, analysis.trace, options, analysis.input_shapes, analysis.opset, calibration, progress)
    outcome = fn(ctx)
    if calibration is not None:
        outcome = reconstruct.with_reconstruction(ctx, outcome)  # no-op with --no-reconstruct
    notes.extend(ctx.notes)
    notes.extend(outcome.notes)
    if not outcome.plan.groups and not outcome.overrides:
        if working is original:
            reason = _nothing_prunable_reason(analysis.trace)
            log.warning("nothing was pruned: %s; the model is written unchanged", reason)
            notes.append(f"nothing was pruned: {reason}")
        pruned = working
    else:
        apply_plan(graph, analysis.trace, outcome.plan, analysis.opset, outcome.overrides)
        pruned = ir.to_model(graph, like=working)
        if outcome.finish is not None:
            pruned = outcome.finish(pruned)
    real, real_name = _agreement_samples(evaluation, calibration)
    feeds, inputs = validate.agreement_feeds(original, analysis.input_shapes, seed, real, real_name)
    agreement = validate.validate(original, pruned, feeds, inputs)
    report = Report(
        method=method,
        ratio=ratio,
        before=validate.model_stats(original, analysis.input_shapes),
        after=validate.model_stats(pruned, analysis.input_shapes),
        agreement=agreement,
        groups=group_rows(analysis.trace, {g.group: g.kept for g in outcome.plan.groups}),
        seconds=0.0,
        notes=tuple(notes),
        request=_request(method, ratio, options.params),
    )
    if evaluation is not None:
        report = replace(report, accuracy_before=accuracy_before, accuracy_after=accuracy(pruned, *_eval_args(evaluation)))
    report = replace(report, seconds=time.perf_counter() - started)
    return PruneResult(pruned, report, analysis.trace, outcome.plan)


def _patterns(exclude: Sequence[str] | str) -> tuple[str, ...]:
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)  # a string is one pattern, not its characters


def _checked(options: Options) -> list[str]:
    """Raise for bad options (see `methods.check_options`); log and return the warnings."""
    check_ratio(options.ratio)
    if options.round_to < 1:
        raise UsageError(f"--round-to must be a positive integer, got {options.round_to}")
    return _warned(list(methods_mod.check_options(options)))


def _warned(messages: list[str]) -> list[str]:
    """Log each warning; the same lines go into the report's notes."""
    for message in messages:
        log.warning("%s", message)
    return messages


def _dynamic_dims_warning(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None) -> list[str]:
    """Dynamic non-batch dims become 1 for tracing and validation: say so, and how to set them."""
    return _warned([
        f"input {name!r} has dynamic axes {axes}: traced and validated with size 1 there; "
        f"give --input-shape {name}:... with real sizes"
        for name, axes in ir.dynamic_non_batch_dims(model, input_shapes).items()
    ])


def _request(method: str, ratio: float, params: Mapping[str, Any]) -> str:
    """The report's words for what was asked, when it is not a uniform ratio."""
    if method == "layer":
        return f"residual blocks removed: fraction {ratio:g}"
    targets = [f"{name} {params[key]:g}" for key, name in (("target_macs", "MACs"), ("target_params", "params"))
               if params.get(key) is not None]
    if method == "lcp" and not targets:
        targets = [f"MACs {1.0 - ratio:g}"]
    also = f", residual blocks {params['blocks']:g}" if params.get("blocks") else ""
    return f"target {' and '.join(targets)}{also}" if targets else (f"ratio {ratio:g}{also}" if also else "")


def _unmatched_excludes(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """A warning for each --exclude pattern that names no node (a typo protects nothing)."""
    from fnmatch import fnmatchcase

    return _warned([f"--exclude {p!r} matches no node name" for p in patterns if not any(fnmatchcase(n, p) for n in names)])


#: methods whose plan needs neither data nor a search: --dry-run can show what they keep
PLAN_ONLY = ("l1", "l2", "bn", "fpgm", "random", "merge")


def plan_only(
    model: ModelLike,
    method: str = "l1",
    ratio: float = 0.5,
    *,
    round_to: int = 1,
    exclude: Sequence[str] = (),
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    criterion: str = "l1",
    params: Mapping[str, Any] | None = None,
) -> tuple[Analysis, Plan | None]:
    """Check the options, trace, and (for `PLAN_ONLY` methods) choose the plan; nothing is applied."""
    options = Options(method=method, ratio=ratio, round_to=round_to, exclude=_patterns(exclude), seed=seed,
                      criterion=criterion, params=dict(params or {}))
    _checked(options)
    analysis = analyze(model, input_shapes=input_shapes, exclude=options.exclude)
    _unmatched_excludes([n.name for n in analysis.graph.nodes], options.exclude)
    if method not in PLAN_ONLY:
        return analysis, None
    from .passes.score import score_groups

    ctx = Context(analysis.model, analysis.graph, analysis.trace, options, analysis.input_shapes, analysis.opset)
    score_criterion = criterion if method == "merge" else method
    scores = score_groups(analysis.trace, analysis.graph, score_criterion, seed)
    return analysis, methods_mod.choose_plan(ctx, scores)


def _nothing_prunable_reason(tr: Trace) -> str:
    if not tr.groups:
        return "no Conv, Gemm or MatMul with constant weights was found"
    reasons = sorted({r for g in tr.groups for r in g.reasons})
    if all(g.is_frozen for g in tr.groups):
        return "every channel group is frozen (" + "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "") + ")"
    return "the ratio removes no channel from any group"


def _calibration(
    options: Options, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], preprocess: Any
) -> Any:
    from .calib import input_specs, load_calibration

    specs = input_specs(model, shapes)
    return load_calibration(
        options.calib, specs, samples=options.calib_samples, seed=options.seed, preprocess=preprocess  # type: ignore[arg-type]
    )


def _agreement_samples(evaluation: EvalData | None, calibration: Any) -> tuple[dict[str, np.ndarray] | None, str]:
    """Real inputs to measure agreement on: evaluation data first, else calibration data.

    Calibration samples are the ones the method fitted to, so their figures are optimistic:
    the report says so.
    """
    if evaluation is not None:
        return {evaluation.input_name: evaluation.images[: validate.AGREEMENT_SAMPLES]}, "evaluation samples"
    if calibration is not None and not calibration.is_random:
        batch = next(calibration.iter_batches(min(validate.AGREEMENT_SAMPLES, calibration.num_samples)))
        return batch, "calibration samples, seen while fitting: optimistic; --eval gives held-out figures"
    return None, ""


def _eval_args(evaluation: EvalData) -> tuple[np.ndarray, np.ndarray, str]:
    return evaluation.images, evaluation.labels, evaluation.input_name
