"""Neuron Merging (Kim, Kim, Lee: "Neuron Merging: Compensating for Pruned Neurons", NeurIPS 2020).

Data-free. For a layer ``y = f(W x + b)`` followed by ``z = V y``, a pruned neuron ``n``
whose incoming weights are a positive multiple of a kept neuron ``m``'s,
``(w_n, b_n) = s (w_m, b_m)`` with ``s > 0``, satisfies ``y_n = s y_m`` whenever ``f`` is
positively homogeneous (``f(s a) = s f(a)``: ReLU, LeakyReLU, PReLU with equal slopes).
Then ``V[:, m] y_m + V[:, n] y_n = (V[:, m] + s V[:, n]) y_m``: neuron ``n`` is removed and
the next layer absorbs it exactly. For inexact pairs the paper picks, for each pruned
neuron, the kept neuron of highest cosine similarity, merges when it exceeds a threshold
``t`` (0.45 for dense layers, 0.1 for convolutions), with ``s = ||w_n|| / ||w_m||``, and
prunes plainly otherwise.

``merge_scale="projection"`` (an option, not the paper's default) uses instead the scale
that best approximates the pruned neuron by its partner in the least-squares sense,
``s = <w_n, w_m> / ||w_m||^2 = cos(w_n, w_m) ||w_n|| / ||w_m||``: the same for an exact
pair, smaller for an inexact one, whose merged contribution the norm ratio overstates.

Here, per group of coupled channels (see `trace`):

* the incoming vector of a class concatenates, over every source of the group, its
  filter and bias; a BatchNormalization right after a source is folded in first
  (``w' = gamma w / sqrt(var + eps)``, ``b' = gamma (b - mean) / sqrt(var + eps) + beta``),
  so the relation holds through BN, a negative gamma included;
* input columns already removed from a source (an earlier group) are left out and the
  merged weights of earlier groups are used, as the paper merges layer after layer;
* every op between the sources and the consumers must commute with a positive
  per-channel scale (ReLU, LeakyReLU, PReLU, max/avg pooling, zero padding, Flatten /
  Reshape blocks, Concat/Split/Slice, residual Add, scalar Mul/Div); otherwise
  (SiLU, GELU, Clip, sigmoid gates, BN after an activation, depthwise consumers) the
  group is pruned plainly and the report says so;
* merge partners must feed the same consumers at corresponding positions (a Split could
  send them apart), and, through a PReLU, have equal slopes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import Group, Kind, Role, Trace
from .base import Context, MergeParams, MethodOutcome
from ..ops.registry import rule_of
from ..analysis.plan import Plan

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.45
CONV_THRESHOLD = 0.1

#: ops that commute with a positive per-channel scale: f(s * a) = s * f(a)
HOMOGENEOUS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity",
        "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Pad",
        "Add", "Sub", "Sum", "Mul", "Div", "Resize", "Upsample",
    }
)
CONSUMER_KINDS = frozenset({Kind.CONV, Kind.GEMM, Kind.MATMUL, Kind.CONV_TRANSPOSE})


@dataclass(frozen=True)
class MergeStats:
    group: int
    merged: int
    pruned_plainly: int
    reason: str = ""


def _consumer_axis(node: gs.Node, kind: Kind) -> int:
    """Axis of the consumer's weight that indexes its input channels (its op rule's `weight_in_axis`)."""
    rule = rule_of(node)
    return 0 if rule is None else rule.weight_in_axis(node, kind)


class _Merger:
    def __init__(self, ctx: Context, plan: Plan) -> None:
        self.ctx = ctx
        self.trace: Trace = ctx.trace
        self.plan = plan
        self.nodes = ir.node_by_name(ctx.graph)
        self.weights: dict[tuple[str, int], np.ndarray] = {}
        self.keep_atoms = plan.atom_keep(self.trace)
        params = ctx.params
        assert isinstance(params, MergeParams)
        self.threshold = params.merge_threshold
        self.projection = params.merge_scale == "projection"

    # -- weights ---------------------------------------------------------------

    def weight(self, node: str, index: int = 1) -> np.ndarray:
        key = (node, index)
        if key not in self.weights:
            value = ir.input_const(self.nodes[node], index)
            assert value is not None
            self.weights[key] = np.array(value, dtype=np.float64)
        return self.weights[key]

    def incoming(self, group: Group) -> tuple[np.ndarray, bool]:
        """Per class, the concatenated effective incoming vectors of all sources; conv or dense."""
        index = {c: i for i, c in enumerate(group.classes)}
        parts: list[np.ndarray] = []
        is_conv = False
        spaces = set(group.spaces)
        for source in self.trace.sources:
            if source.space not in spaces:
                continue
            node = self.nodes[source.node]
            is_conv = is_conv or node.op in ("Conv", "ConvTranspose")
            w = np.moveaxis(self.weight(source.node), source.axis, 0)
            w = self._drop_pruned_inputs(node, w)
            w = w.reshape(w.shape[0], -1)
            b = np.array(ir.input_const(node, 2), dtype=np.float64).reshape(-1) if ir.has_input(node, 2) else None
            if b is None or b.size != w.shape[0]:
                b = np.zeros(w.shape[0])
            w, b = self._fold_bn(node, w, b)
            block = np.zeros((len(group.classes), w.shape[1] + 1))
            for row, root in enumerate(self.trace.roots[self.trace.space_atoms[source.space]].tolist()):
                block[index[root], :-1] += w[row]
                block[index[root], -1] += b[row]
            parts.append(block)
        return np.concatenate(parts, axis=1), is_conv

    def _drop_pruned_inputs(self, node: gs.Node, w: np.ndarray) -> np.ndarray:
        """Leave out input channels an earlier group removed (w has output channels first)."""
        cmap = self.trace.maps.get(node.inputs[0].name)
        kind = self.trace.node_kind.get(node.name)
        if cmap is None or kind not in CONSUMER_KINDS:
            return w
        keep = np.flatnonzero(self.keep_atoms[cmap.atoms])
        # every weighted op here has 2 channel axes; with the output one first, the input one is axis 1
        return np.take(w, keep, axis=1)

    def _fold_bn(self, node: gs.Node, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        consumers = node.outputs[0].outputs
        if len(consumers) != 1 or consumers[0].op != "BatchNormalization":
            return w, b
        bn = consumers[0]
        gamma, beta, mean, var = (np.array(ir.input_const(bn, i), dtype=np.float64) for i in range(1, 5))
        scale = gamma / np.sqrt(var + float(ir.attr(bn, "epsilon", 1e-5)))
        return w * scale[:, None], (b - mean) * scale + beta

    # -- eligibility -------------------------------------------------------------

    def ineligible(self, group: Group) -> str:
        """Why merging cannot be exact in this group ("" when it can)."""
        source_nodes = {s.node for s in self.trace.sources if s.space in set(group.spaces)}
        for member in group.members:
            node = self.nodes[member.node]
            if member.role == Role.OUT:
                continue
            if member.role == Role.IN:
                if self.trace.node_kind.get(member.node) not in CONSUMER_KINDS:
                    return f"{member.op} {member.node} consumes the channels in groups"
                continue
            if member.role == Role.NORM:
                producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
                if node.op == "BatchNormalization" and producer is not None and producer.name in source_nodes:
                    continue
                return f"{member.op} {member.node} is not right after the layer it normalises"
            if member.role == Role.DEPTHWISE:
                return f"depthwise {member.node} consumes the channels"
            if member.op not in HOMOGENEOUS:
                return f"{member.op} {member.node} is not positively homogeneous"
            why = self._check_op(node)
            if why:
                return why
        return ""

    def _check_op(self, node: gs.Node) -> str:
        consts = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if node.op in ("Add", "Sub", "Sum"):
            if consts:
                return f"{node.op} {node.name} adds a constant"
        elif node.op in ("Mul", "Div"):
            scalar = len(consts) == 1 and np.asarray(consts[0].values).size == 1
            if not scalar or (node.op == "Div" and node.inputs[1] is not consts[0]):
                return f"{node.op} {node.name} scales by a tensor, not by one constant"
        elif node.op == "Pad":
            mode = ir.attr(node, "mode", "constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            value = ir.input_const(node, 2)
            if mode != "constant" or (value is not None and float(np.asarray(value).ravel()[0]) != 0.0):
                return f"Pad {node.name} pads with a non-zero value"
        elif node.op in ("Resize", "Upsample"):
            mode = ir.attr(node, "mode", "nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("nearest", "linear"):
                return f"{node.op} {node.name} uses {mode} interpolation"
        return ""

    # -- merging -------------------------------------------------------------------

    def consumer_positions(self, group: Group) -> dict[str, dict[int, np.ndarray]]:
        """consumer node -> class -> positions along its input channel axis."""
        out: dict[str, dict[int, np.ndarray]] = {}
        for member in group.members:
            if member.role != Role.IN or member.node in out:
                continue
            classes = self.trace.class_positions(self.nodes[member.node].inputs[0].name)
            if classes is None:
                continue
            positions: dict[int, list[int]] = defaultdict(list)
            for pos, root in enumerate(classes.tolist()):
                positions[root].append(pos)
            out[member.node] = {c: np.asarray(p) for c, p in positions.items()}
        return out

    def prelu_keys(self, group: Group) -> dict[int, tuple[float, ...]]:
        """Per class, its PReLU slopes: partners must have equal ones."""
        keys: dict[int, list[float]] = defaultdict(list)
        for member in group.members:
            if member.op != "PRelu":
                continue
            node = self.nodes[member.node]
            slope = ir.input_const(node, 1)
            classes = self.trace.class_positions(node.inputs[0].name)
            if slope is None or classes is None:
                continue
            flat = np.broadcast_to(np.asarray(slope).reshape(-1), (classes.size,)) if np.asarray(slope).size in (1, classes.size) else None
            if flat is None:
                continue
            for root, value in zip(classes.tolist(), flat.tolist()):
                keys[root].append(round(float(value), 6))
        return {c: tuple(v) for c, v in keys.items()}

    def merge_group(self, group: Group, pruned: tuple[int, ...]) -> MergeStats:
        why = self.ineligible(group)
        if why:
            return MergeStats(group.index, 0, len(pruned), why)
        vectors, is_conv = self.incoming(group)
        threshold = self.threshold if self.threshold is not None else (CONV_THRESHOLD if is_conv else DENSE_THRESHOLD)
        index = {c: i for i, c in enumerate(group.classes)}
        pruned_set = set(pruned)
        kept = [c for c in group.classes if c not in pruned_set]
        positions = self.consumer_positions(group)
        footprint = {c: tuple((n, len(p.get(c, ()))) for n, p in sorted(positions.items())) for c in group.classes}
        slopes = self.prelu_keys(group)
        norms = np.linalg.norm(vectors, axis=1)
        merged = 0
        for n in pruned:
            candidates = [
                m for m in kept if footprint[m] == footprint[n] and slopes.get(m) == slopes.get(n) and norms[index[m]] > 0
            ]
            if not candidates or norms[index[n]] == 0:
                continue
            cand = np.array([index[m] for m in candidates])
            sims = vectors[cand] @ vectors[index[n]] / (norms[cand] * norms[index[n]])
            best = int(np.argmax(sims))
            if sims[best] < threshold:
                continue
            m = candidates[best]
            scale = norms[index[n]] / norms[index[m]] * (float(sims[best]) if self.projection else 1.0)
            for consumer, pos in positions.items():
                kind = self.trace.node_kind[consumer]
                axis = _consumer_axis(self.nodes[consumer], kind)
                w = self.weight(consumer)
                src = np.take(w, pos[n], axis=axis)
                dst_index: list[slice | np.ndarray] = [slice(None)] * w.ndim
                dst_index[axis] = pos[m]
                w[tuple(dst_index)] += scale * src
            merged += 1
        return MergeStats(group.index, merged, len(pruned) - merged)

    def overrides(self) -> dict[tuple[str, int], np.ndarray]:
        out = {}
        for (node, index), value in self.weights.items():
            original = ir.input_const(self.nodes[node], index)
            assert original is not None
            if not np.array_equal(value, original):
                out[(node, index)] = value.astype(original.dtype)
        return out


def merge_outcome(ctx: Context, plan: Plan) -> MethodOutcome:
    """Merge every pruned class of `plan` into its best kept partner, group by group."""
    merger = _Merger(ctx, plan)
    stats = [merger.merge_group(ctx.trace.groups[gp.group], gp.pruned) for gp in sorted(plan.groups, key=lambda g: g.group)]
    total_merged = sum(s.merged for s in stats)
    total = sum(s.merged + s.pruned_plainly for s in stats)
    rest = "" if total_merged == total else ", the rest pruned plainly"
    notes = [f"merge: {total_merged} of {total} removed channels merged into a kept partner{rest}"]
    fallbacks = [s for s in stats if s.reason]
    if fallbacks:
        notes.append(f"merge: {len(fallbacks)} group(s) pruned plainly because merging would not be exact:")
        notes.extend(f"  group {s.group}: {s.reason}" for s in fallbacks[:20])
        if len(fallbacks) > 20:
            notes.append(f"  ... and {len(fallbacks) - 20} more")
    return MethodOutcome(plan, merger.overrides(), tuple(notes))


def merge_stats_summary(stats: Mapping[int, MergeStats]) -> str:
    return ", ".join(f"g{k}: {v.merged}/{v.merged + v.pruned_plainly}" for k, v in sorted(stats.items()))
