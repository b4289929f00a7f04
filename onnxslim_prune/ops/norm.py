"""Normalisations: per-channel (BatchNormalization, InstanceNormalization) and over other axes.

Per-channel: ``y_c = gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c`` holds channel ``c`` in
every 1-D parameter, so the parameters are sliced to the kept channels, ``p' = p[keep]``, and
count ``f_out`` of their entries in the cost model. LayerNormalization and Softmax-like ops
normalise over a range of axes: channels pass when that range does not hold them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..graph import edit
from ..channels import Kind, Role
from .registry import ApplyContext, CostContext, Freeze, NodeCost, OpRule, TraceContext, float_size, register


class PerChannelNormRule(OpRule):
    """``y_c = gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c``: every parameter is per channel on axis 1, so a
    channel passes and its parameters are sliced with it (exact)."""

    ops = ("BatchNormalization", "InstanceNormalization")

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        if x_map.axis != 1:
            raise Freeze("channels are not on axis 1")
        for i in range(1, len(node.inputs)):
            if ir.has_input(node, i) and ir.input_const(node, i) is None:
                raise Freeze("per-channel parameters are not constants")
        if node.op == "BatchNormalization" and len([o for o in node.outputs if o.outputs or t.is_graph_output(o)]) > 1:
            raise Freeze("training-mode outputs are used")
        t.set_kind(node, Kind.NORM)
        t.pass_through(node, x_map, Role.NORM)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """``p' = p[keep]`` for every 1-D constant parameter."""
        if kind != Kind.NORM:
            return
        keep = a.keep(node.inputs[0])
        if keep is None:
            return
        for i in range(1, len(node.inputs)):
            value = ir.input_const(node, i)
            if value is not None and value.ndim == 1:
                edit.set_input_const(node, i, value[keep])

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        if kind != Kind.NORM:
            return None
        x = c.atoms(node.inputs[0])
        size = sum(
            float_size(ir.input_const(node, i)) for i in range(1, len(node.inputs)) if ir.has_input(node, i) and c.first_use(node, i)
        )
        return NodeCost(None, x, 0, 0, size)

    def backprop(self, node: gs.Node, out: np.ndarray) -> np.ndarray | None:
        """BN: ``s_in = s_out |gamma| / sqrt(var + eps)`` (unchanged when a parameter is not constant)."""
        if node.op != "BatchNormalization":
            return None
        gamma, var = ir.input_const(node, 1), ir.input_const(node, 4)
        if gamma is None or var is None:
            return out
        eps = float(ir.attr(node, "epsilon", 1e-5))
        return out * np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)


class AxisNormRule(OpRule):
    """Softmax / LogSoftmax / Hardmax from opset 13: normalise along `axis` only."""

    ops = ("Softmax", "LogSoftmax", "Hardmax")
    opsets = (13, 10_000)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        if int(ir.attr(node, "axis", -1)) % len(shape) == x_map.axis:
            raise Freeze("normalises across channels")
        t.pass_through(node, x_map)


def _trace_axes_from(t: TraceContext, node: gs.Node, default_axis: int) -> None:
    """Normalised over every axis from `axis` on: channels pass when they lie before it."""
    if (traced := t.traced_with_shape(node)) is None:
        return
    x_map, shape = traced
    if x_map.axis >= int(ir.attr(node, "axis", default_axis)) % len(shape):
        raise Freeze("normalises across channels")
    t.pass_through(node, x_map)


class FlattenedAxisNormRule(OpRule):
    """Softmax / LogSoftmax / Hardmax before opset 13: normalise over the flattened axes from `axis` (default 1) on."""

    ops = ("Softmax", "LogSoftmax", "Hardmax")
    opsets = (0, 12)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        _trace_axes_from(t, node, 1)


class LayerNormRule(OpRule):
    """LayerNormalization (and RMSNorm: onnxruntime's SimplifiedLayerNormalization, ai.onnx RMSNormalization)
    normalises over the axes from `axis` (default -1) on.

    Channels before `axis` pass. Channels on the one normalised axis (the hidden size of a
    transformer, channels last) pass too, with ``gamma`` and ``beta`` sliced to the kept
    channels; the statistics are then taken over the kept channels, an approximation
    (`ops.attention` module docstring, "hidden size").
    """

    ops = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")  # the last two: RMSNorm, scale only

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        start = int(ir.attr(node, "axis", -1)) % len(shape)
        if x_map.axis < start:
            t.pass_through(node, x_map)
            return
        if start != len(shape) - 1:
            raise Freeze("normalises across channels and other axes")
        for i in (1, 2):
            value = ir.input_const(node, i) if ir.has_input(node, i) else np.ones(1)
            if value is None or (value.size != 1 and value.shape != (x_map.size,)):
                raise Freeze("scale or bias is not a per-channel constant")
        if any(o.outputs or t.is_graph_output(o) for o in node.outputs[1:]):
            raise Freeze("the mean or inverse deviation output is used")
        t.set_kind(node, Kind.LAYER_NORM)
        t.pass_through(node, x_map, Role.NORM)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """``gamma' = gamma[keep]``, ``beta' = beta[keep]``."""
        if kind != Kind.LAYER_NORM:
            return
        keep = a.keep(node.inputs[0])
        if keep is None:
            return
        size = a.original_size(node.inputs[0])
        for i in (1, 2):
            value = ir.input_const(node, i) if ir.has_input(node, i) else None
            if value is not None and value.shape == (size,):
                edit.set_input_const(node, i, value[keep])

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        if kind != Kind.LAYER_NORM:
            return None
        size = sum(float_size(ir.input_const(node, i)) for i in (1, 2) if ir.has_input(node, i) and c.first_use(node, i))
        return NodeCost(None, c.atoms(node.inputs[0]), 0, 0, size)


register(PerChannelNormRule())
register(AxisNormRule())
register(FlattenedAxisNormRule())
register(LayerNormRule())
