"""Block (layer) pruning: removing whole residual blocks.

A *removable block* is ``y = Add(x, f(x))`` with an identity shortcut: one operand is
exactly the block input ``x``, every path from the graph inputs to the other operand
``f(x)`` goes through ``x`` (``x`` dominates ``f``; nothing bypasses it), no tensor inside
``f`` is used outside the block, and ``x``, ``f(x)`` and ``y`` have one static shape. A
block whose shortcut has a projection or a stride adds two computed operands and is never
a candidate.

Ranking (Veit, Wilber, Belongie, "Residual Networks Behave Like Ensembles of Relatively
Shallow Networks", NeurIPS 2016, show that single residual blocks can be dropped at test
time at a small cost; this stage removes the least useful ones without retraining). With
``m_c = E[f(x)_c]``, the per-channel mean of the branch on calibration data:

* ``output`` (default): the output error of the model with that block alone replaced by
  ``x + m`` (for a classifier the top-1 disagreement plus 0.1 * KL of the softmax outputs,
  else the relative squared error: `budget.output_error`);
* ``norm``: ``||f(x) - m|| / ||x + f(x)||``, what the best constant replacement loses at
  the block output, from one pass of collected activations.

The ``floor(fraction * n)`` lowest blocks are removed: the Add is rewired (`ir.rewire_node`)
into ``Add(x, m)`` (the mean as a constant), or into ``Identity(x)`` where that keeps the
outputs closer on the calibration data (always when ``m`` is zero); the dead branch goes at
cleanup. Without calibration data, seeded random inputs are used and a warning is noted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..judge import validate
from ..graph import edit
from ..calib import expose_tensors
from ..errors import UsageError
from ..judge.evaluation import OutputError, evaluation_feeds
from .base import BLOCK_CRITERIA, CommonParams, Options, get_method
from ..analysis.trace import node_macs

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SAMPLES = CommonParams.block_samples
CRITERIA = BLOCK_CRITERIA


@dataclass(frozen=True)
class ResidualBlock:
    """``output = Add(shortcut, branch)``; `nodes` compute the branch from the shortcut."""

    add: str
    shortcut: str
    branch: str
    output: str
    nodes: tuple[str, ...]
    macs: int
    channel_axis: int


@dataclass(frozen=True)
class BlockScore:
    block: ResidualBlock
    contribution: float
    mean: np.ndarray  # per-channel mean of the branch, broadcastable to the shortcut


# ----------------------------------------------------------------------------- finding blocks


def find_blocks(graph: gs.Graph, shapes: Mapping[str, tuple[int, ...]]) -> list[ResidualBlock]:
    """Every removable identity-shortcut residual block, in graph order."""
    producers = {id(t): n for n in graph.nodes for t in n.outputs}

    def shape_of(t: gs.Tensor) -> tuple[int, ...] | None:
        return tuple(np.asarray(t.values).shape) if isinstance(t, gs.Constant) else shapes.get(t.name)

    graph_outputs = {t.name for t in graph.outputs}
    blocks: list[ResidualBlock] = []
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
            continue
        a, b = add.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant) or a is b:
            continue
        shape = shapes.get(add.outputs[0].name)
        if shape is None or shapes.get(a.name) != shape or shapes.get(b.name) != shape:
            continue
        for x, y in ((a, b), (b, a)):
            nodes = _branch(x, y, producers)
            if nodes is None or not _self_contained(nodes, add, graph_outputs):
                continue
            ordered = tuple(n.name for n in graph.nodes if id(n) in {id(m) for m in nodes})
            macs = sum(node_macs(n, shape_of) for n in nodes)
            axis = 1 if any(n.op in ("Conv", "ConvTranspose") for n in nodes) or len(shape) != 3 else len(shape) - 1
            blocks.append(ResidualBlock(add.name, x.name, y.name, add.outputs[0].name, ordered, int(macs), axis))
            break
    return blocks


def _branch(x: gs.Tensor, y: gs.Tensor, producers: Mapping[int, gs.Node]) -> list[gs.Node] | None:
    """The nodes computing `y` from `x`, or None if some path to `y` bypasses `x`."""
    nodes: dict[int, gs.Node] = {}
    stack = [y]
    seen: set[int] = set()
    reached = False
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t is x:
            reached = True
            continue
        if isinstance(t, gs.Constant) or not t.name:
            continue
        node = producers.get(id(t))
        if node is None:  # a graph input other than x: the branch bypasses the shortcut
            return None
        if id(node) not in nodes:
            nodes[id(node)] = node
            stack.extend(node.inputs)
    return list(nodes.values()) if reached and nodes else None


def _self_contained(nodes: Sequence[gs.Node], add: gs.Node, graph_outputs: set[str]) -> bool:
    inside = {id(n) for n in nodes} | {id(add)}
    for node in nodes:
        for out in node.outputs:
            if out.name in graph_outputs or any(id(c) not in inside for c in out.outputs):
                return False
    return True


# ----------------------------------------------------------------------------- scoring


def _reduce_axes(rank: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(rank) if i != axis)


def _branch_statistics(
    model: onnx.ModelProto, blocks: Sequence[ResidualBlock], feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per block: the per-channel mean of the branch, and ||f - m|| / ||x + f|| (the `norm` criterion)."""
    names = [n for b in blocks for n in (b.branch, b.output)]
    exposed = expose_tensors(model, names)
    sess = validate.session(exposed)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    out_sq: dict[str, float] = {}
    for feed in feeds:
        values = dict(zip(names, sess.run(names, dict(feed))))
        for block in blocks:
            f = values[block.branch].astype(np.float64)
            y = values[block.output].astype(np.float64)
            axes = _reduce_axes(f.ndim, block.channel_axis)
            sums[block.add] = sums.get(block.add, 0.0) + f.sum(axis=axes, keepdims=True)
            squares[block.add] = squares.get(block.add, 0.0) + (f * f).sum(axis=axes, keepdims=True)
            counts[block.add] = counts.get(block.add, 0) + int(f.size // f.shape[block.channel_axis])
            out_sq[block.add] = out_sq.get(block.add, 0.0) + float(np.sum(y * y))
    means: dict[str, np.ndarray] = {}
    norms: dict[str, float] = {}
    for block in blocks:
        n = max(counts[block.add], 1)
        mean = sums[block.add] / n
        centred = float(np.sum(squares[block.add] - n * mean * mean))
        means[block.add] = mean
        norms[block.add] = math.sqrt(max(centred, 0.0)) / max(math.sqrt(out_sq[block.add]), 1e-12)
    return means, norms


def _replaced(
    graph: gs.Graph, like: onnx.ModelProto, choices: Mapping[str, tuple[ResidualBlock, np.ndarray | None]]
) -> gs.Graph:
    """A copy of `graph` with each chosen block's Add rewired (mean None: Identity)."""
    work = ir.copy_graph(graph)
    _rewire(work, choices)
    return work


def _rewire(graph: gs.Graph, choices: Mapping[str, tuple[ResidualBlock, np.ndarray | None]]) -> None:
    nodes = ir.node_by_name(graph)
    tensors = graph.tensors()
    for name, (block, mean) in choices.items():
        node = nodes[name]
        x = tensors[block.shortcut]
        if mean is None:
            edit.rewire_node(node, "Identity", [x])
        else:
            dtype = ir.tensor_dtype(x) or np.dtype(np.float32)
            const = edit.make_constant(f"{name}__branch_mean", mean.astype(dtype))
            edit.rewire_node(node, "Add", [x, const])


def score_blocks(
    graph: gs.Graph,
    model: onnx.ModelProto,
    blocks: Sequence[ResidualBlock],
    feeds: Sequence[Mapping[str, np.ndarray]],
    criterion: str,
    error: OutputError | None,
) -> list[BlockScore]:
    """Each block's contribution (lower = safer to remove), see the module docstring."""
    means, norms = _branch_statistics(model, blocks, feeds)
    scores: list[BlockScore] = []
    for block in blocks:
        mean = means[block.add]
        if criterion == "norm" or error is None:
            value = norms[block.add]
        else:
            candidate = ir.export_fast(_replaced(graph, model, {block.add: (block, _or_none(mean))}), model)
            value = error(candidate)
        scores.append(BlockScore(block, float(value), mean))
    return scores


def _or_none(mean: np.ndarray) -> np.ndarray | None:
    """None (an Identity replacement) when the branch mean is zero."""
    return None if not np.any(mean) else mean


# ----------------------------------------------------------------------------- selection


def _nested(inner: ResidualBlock, outer: ResidualBlock) -> bool:
    return inner.add in outer.nodes


def select_blocks(scores: Sequence[BlockScore], count: int) -> list[BlockScore]:
    """The `count` lowest-contribution blocks, skipping blocks inside an already chosen one."""
    chosen: list[BlockScore] = []
    for score in sorted(scores, key=lambda s: (s.contribution, s.block.add)):
        if len(chosen) >= count:
            break
        if any(_nested(score.block, c.block) or _nested(c.block, score.block) for c in chosen):
            continue
        chosen.append(score)
    return chosen


def prune_blocks(
    model: onnx.ModelProto,
    fraction: float,
    calibration: Any,
    input_shapes: Mapping[str, tuple[int, ...]],
    options: Options,
) -> tuple[onnx.ModelProto, list[str]]:
    """Remove `fraction` of the removable residual blocks; returns the new model and notes."""
    if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
        raise UsageError(f"--blocks must be in [0, 1], got {fraction}")
    params = get_method(options.method).params.parse(options.params)  # checked by `methods.base.check_options`
    criterion, samples = params.block_criterion, params.block_samples
    graph = ir.to_graph(model)
    shapes = ir.static_shapes(model, input_shapes)
    blocks = find_blocks(graph, shapes)
    count = int(math.floor(fraction * len(blocks) + 1e-9))
    if not blocks:
        return model, ["blocks: no removable residual block (identity shortcut) was found"]
    if count == 0:
        return model, [f"blocks: {len(blocks)} removable residual blocks; fraction {fraction:g} removes none"]
    notes: list[str] = []
    feeds, random_data = evaluation_feeds(
        model, calibration, input_shapes, samples=samples, batch_size=options.batch_size, seed=options.seed
    )
    if random_data:
        msg = "blocks: no calibration data; blocks were ranked on seeded random inputs (data-free)"
        log.warning(msg)
        notes.append(msg)
    error = OutputError(model, feeds)
    scores = score_blocks(graph, model, blocks, feeds, criterion, error)
    chosen = select_blocks(scores, count)
    choices = _choose_replacements(graph, model, chosen, error)
    _rewire(graph, choices)
    pruned = ir.to_model(graph, like=model)
    ir.check_model(pruned, full=True, what="block-pruned model")
    total_macs = validate.model_stats(model, input_shapes).macs
    saved = sum(c.block.macs for c in chosen)
    how = ", ".join(f"{name} ({'identity' if mean is None else 'mean'})" for name, (_, mean) in choices.items())
    notes.append(
        f"blocks: removed {len(chosen)} of {len(blocks)} removable residual blocks by {criterion} "
        f"({saved / max(total_macs, 1):.1%} of the MACs): {how}"
    )
    log.info(notes[-1])
    return pruned, notes


def _choose_replacements(
    graph: gs.Graph, model: onnx.ModelProto, chosen: Sequence[BlockScore], error: OutputError
) -> dict[str, tuple[ResidualBlock, np.ndarray | None]]:
    """Start from mean replacements; switch each to Identity where the outputs stay at least as close."""
    choices: dict[str, tuple[ResidualBlock, np.ndarray | None]] = {
        s.block.add: (s.block, _or_none(s.mean)) for s in chosen
    }
    if all(mean is None for _, mean in choices.values()):
        return choices
    current = error(ir.export_fast(_replaced(graph, model, choices), model))
    for s in chosen:
        if choices[s.block.add][1] is None:
            continue
        trial = dict(choices)
        trial[s.block.add] = (s.block, None)
        value = error(ir.export_fast(_replaced(graph, model, trial), model))
        if value <= current:
            choices, current = trial, value
    return choices
