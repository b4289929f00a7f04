"""Reductions and pooling: channels pass when the reduced axes do not hold them.

Reduce* over axes ``A`` (attribute, or input 1 from opset 18): channels on axis ``c`` pass if
``c not in A``; without `keepdims` they move to ``c - |{a in A : a < c}|``. Pooling reduces
spatial windows of NCHW tensors: channels on axis 1 pass; SpaceToDepth / DepthToSpace move
data between channels and space and freeze.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import ChannelMap, Kind, Role
from ..graph import edit
from .registry import ApplyContext, Freeze, OpRule, TraceContext, register

REDUCE_OPS = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
)
SPATIAL_OPS = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "MaxRoiPool",
     "SpaceToDepth", "DepthToSpace"}
)


class ReduceRule(OpRule):
    """A reduction over other axes passes the channels (the axis renumbered when `keepdims` is 0); one over the
    channels freezes them, except a ReduceMean over the last, channels-last axis: a decomposed LayerNorm / RMSNorm.
    Its mean then runs over the kept channels and is scaled by ``kept / original``, so that a removed channel
    counts as a zero (the original's denominator): an RMSNorm whose removed channels were zero gives the
    original's outputs, and a LayerNorm's mean stays exact for them."""

    ops = tuple(sorted(REDUCE_OPS))

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        rank = len(shape)
        axes = ir.attr(node, "axes")
        if axes is None and ir.has_input(node, 1):
            value = ir.input_const(node, 1)
            if value is None:
                raise Freeze("axes are computed at run time")
            axes = value.ravel().tolist()
        if not axes:
            if int(ir.attr(node, "noop_with_empty_axes", 0)):
                t.pass_through(node, x_map)
                return
            raise Freeze("reduces over all axes")
        axes = sorted(int(a) % rank for a in axes)
        keep = int(ir.attr(node, "keepdims", 1))
        if x_map.axis in axes:
            if node.op == "ReduceMean" and axes == [rank - 1] == [x_map.axis] and keep:
                # a decomposed LayerNorm / RMSNorm over the hidden size: the output has no channels
                t.touch(x_map.atoms, node, Role.NORM)
                t.set_kind(node, Kind.CHANNEL_MEAN)
                return
            raise Freeze("reduces across channels")
        axis = x_map.axis if keep else x_map.axis - sum(1 for a in axes if a < x_map.axis)
        t.pass_through(node, ChannelMap(axis, x_map.atoms))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind is not Kind.CHANNEL_MEAN or (kept := a.keep(node.inputs[0])) is None:
            return
        out = node.outputs[0]
        dtype = _float_type(out)
        scale_name, mean_name, mul_name = edit.fresh_names(
            a.graph, f"{node.name}_kept_share", f"{out.name}_over_kept", f"{node.name}_to_original_count")
        scale = edit.make_constant(scale_name, np.array(len(kept) / a.original_size(node.inputs[0]), dtype=dtype))
        mean = edit.make_variable(mean_name, dtype)
        node.outputs[0] = mean
        a.graph.nodes.append(gs.Node("Mul", mul_name, inputs=[mean, scale], outputs=[out]))


def _float_type(tensor: gs.Tensor) -> np.dtype:
    """The float type of `tensor`: its own, else the nearest known one upstream (a Cast's target, a constant's, a
    typed input), since a working graph's inner tensors carry no types (float32 when none is found)."""
    queue, seen = [tensor], set()
    while queue:
        t = queue.pop(0)
        if id(t) in seen:
            continue
        seen.add(id(t))
        values = t.values if isinstance(t, gs.Constant) else None
        dtype = np.asarray(values).dtype if values is not None else ir.tensor_dtype(t)
        if dtype is not None and np.issubdtype(dtype, np.floating):
            return dtype
        producer = t.inputs[0] if t.inputs else None
        if producer is None:
            continue
        if producer.op == "Cast":
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(producer.attrs["to"])))
        queue.extend(producer.inputs)
    return np.dtype(np.float32)


class PoolRule(OpRule):
    """Pooling works per channel on axis 1 (``y_c = pool(x_c)``), so channels pass; SpaceToDepth / DepthToSpace move
    data between channels and space and freeze, as do used pooling indices."""

    ops = tuple(sorted(SPATIAL_OPS))

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        if node.op in ("SpaceToDepth", "DepthToSpace"):
            raise Freeze("moves data between channels and space")
        if x_map.axis != 1:
            raise Freeze("channels are not on axis 1")
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise Freeze("pooling indices are used")
        t.pass_through(node, x_map)


register(ReduceRule())
register(PoolRule())
