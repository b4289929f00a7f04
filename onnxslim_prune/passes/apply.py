"""Apply a `Plan`: slice weights, fix attributes and shape constants.

For every tensor the tracer mapped, the kept positions along its channel axis are
``flatnonzero(keep[atoms])``. Each node is then rewritten from the positions of its
inputs and outputs:

* Conv ``W[out_keep][:, in_keep]`` (grouped: per group, the group's own kept inputs;
  depthwise: ``group`` becomes the kept input count), bias ``b[out_keep]``;
* ConvTranspose ``W[in_keep][:, out_keep]``; Gemm / MatMul the same on ``(K, N)``;
* BatchNormalization / InstanceNormalization parameters, PRelu slopes and constant
  operands of broadcasting ops are sliced on their aligned channel axis;
* Split sizes, Slice bounds, Reshape targets and Resize sizes are recounted.

`overrides` replaces full-size constants *before* slicing (Neuron Merging adds the
pruned neurons' outgoing weights into the kept ones that way). All edits go through
`ir`, which copies a constant shared with another node instead of corrupting it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import Kind, Trace
from ..errors import ModelError
from .plan import Plan
from .trace import BROADCAST_OPS, slice_positions, slice_spec

log = logging.getLogger(__name__)

Overrides = Mapping[tuple[str, int], np.ndarray]


class _Applier:
    def __init__(self, graph: gs.Graph, trace: Trace, plan: Plan, opset: int) -> None:
        self.graph = graph
        self.trace = trace
        self.keep_atoms = plan.atom_keep(trace)
        self.opset = opset

    def keep(self, tensor: gs.Tensor) -> np.ndarray | None:
        """Kept positions of `tensor`'s channel axis, or None when it is untraced or intact."""
        cmap = self.trace.maps.get(tensor.name)
        if cmap is None:
            return None
        mask = self.keep_atoms[cmap.atoms]
        return None if mask.all() else np.flatnonzero(mask)

    def axis(self, tensor: gs.Tensor) -> int:
        return self.trace.maps[tensor.name].axis

    def original_size(self, tensor: gs.Tensor) -> int:
        return self.trace.maps[tensor.name].size

    # -- per op ---------------------------------------------------------------------

    def node(self, node: gs.Node) -> None:
        kind = self.trace.node_kind.get(node.name)
        op = node.op
        if op == "Conv" and kind in (Kind.CONV, Kind.DEPTHWISE, Kind.GROUPED):
            self.conv(node, kind)
        elif op == "ConvTranspose" and kind == Kind.CONV_TRANSPOSE:
            self.weight_and_bias(node, in_axis=0, out_axis=1)
        elif op == "Gemm" and kind == Kind.GEMM:
            trans_b = int(ir.attr(node, "transB", 0))
            self.weight_and_bias(node, in_axis=1 if trans_b else 0, out_axis=0 if trans_b else 1)
        elif op == "MatMul" and kind == Kind.MATMUL:
            self.weight_and_bias(node, in_axis=0, out_axis=1)
        elif kind == Kind.NORM:
            self.per_channel_params(node)
        elif op in BROADCAST_OPS or (op == "Concat" and kind != Kind.CONCAT):
            self.broadcast_constants(node)
        elif kind == Kind.SPLIT:
            self.split(node)
        elif kind == Kind.SLICE:
            self.slice(node)
        elif kind == Kind.RESHAPE:
            self.reshape(node)
        elif kind == Kind.RESIZE:
            self.resize(node)

    def conv(self, node: gs.Node, kind: Kind) -> None:
        x, y = node.inputs[0], node.outputs[0]
        in_keep, out_keep = self.keep(x), self.keep(y)
        weight = ir.input_const(node, 1)
        assert weight is not None
        if kind == Kind.DEPTHWISE:
            if out_keep is not None:
                ir.set_input_const(node, 1, weight[out_keep])
            if in_keep is not None:
                ir.set_attr(node, "group", int(in_keep.size))
        elif kind == Kind.GROUPED:
            ir.set_input_const(node, 1, self._grouped_weight(node, weight, in_keep, out_keep))
        else:
            ir.set_input_const(node, 1, _take2(weight, out_keep, in_keep))
        self.bias(node, out_keep, 0)

    def _grouped_weight(
        self, node: gs.Node, weight: np.ndarray, in_keep: np.ndarray | None, out_keep: np.ndarray | None
    ) -> np.ndarray:
        group = int(ir.attr(node, "group", 1))
        cout, per_in = weight.shape[0], weight.shape[1]
        per_out = cout // group
        in_keep = np.arange(per_in * group) if in_keep is None else in_keep
        out_keep = np.arange(cout) if out_keep is None else out_keep
        local = [in_keep[(in_keep >= g * per_in) & (in_keep < (g + 1) * per_in)] - g * per_in for g in range(group)]
        if len({loc.size for loc in local}) != 1:
            raise ModelError(f"{node.name}: uneven input channels per group after pruning")
        rows = [weight[o][local[o // per_out]] for o in out_keep.tolist()]
        kept_per_group = np.bincount(out_keep // per_out, minlength=group)
        if len(set(kept_per_group.tolist())) != 1:
            raise ModelError(f"{node.name}: uneven output channels per group after pruning")
        return np.stack(rows)

    def weight_and_bias(self, node: gs.Node, in_axis: int, out_axis: int) -> None:
        in_keep, out_keep = self.keep(node.inputs[0]), self.keep(node.outputs[0])
        weight = ir.input_const(node, 1)
        assert weight is not None
        keep0, keep1 = (in_keep, out_keep) if in_axis == 0 else (out_keep, in_keep)
        w = _take2(weight, keep0, keep1)
        if w is not weight:
            ir.set_input_const(node, 1, w)
        self.bias(node, out_keep, -1)

    def bias(self, node: gs.Node, out_keep: np.ndarray | None, axis: int) -> None:
        if out_keep is None or not ir.has_input(node, 2):
            return
        bias = ir.input_const(node, 2)
        assert bias is not None
        size = self.original_size(node.outputs[0])
        if bias.ndim and bias.shape[axis] == size and size > 1:
            ir.set_input_const(node, 2, np.take(bias, out_keep, axis=axis))

    def per_channel_params(self, node: gs.Node) -> None:
        keep = self.keep(node.inputs[0])
        if keep is None:
            return
        for i in range(1, len(node.inputs)):
            value = ir.input_const(node, i)
            if value is not None and value.ndim == 1:
                ir.set_input_const(node, i, value[keep])

    def broadcast_constants(self, node: gs.Node) -> None:
        out = node.outputs[0]
        keep = self.keep(out)
        if keep is None:
            return
        rank = len(self.trace.shapes.get(out.name, ()))
        pos, size = self.axis(out), self.original_size(out)
        for i, t in enumerate(node.inputs):
            value = ir.const_value(t)
            if value is None or not t.name:
                continue
            own = pos - (rank - value.ndim)
            if own >= 0 and value.shape[own] == size and size > 1:
                ir.set_input_const(node, i, np.take(value, keep, axis=own))

    def split(self, node: gs.Node) -> None:
        if all(self.keep(o) is None for o in node.outputs):
            return
        sizes = np.array([self._kept_count(o) for o in node.outputs], dtype=np.int64)
        if self.opset >= 13:
            node.attrs.pop("num_outputs", None)
            node.attrs.pop("split", None)
            const = gs.Constant(f"{node.name}__split", sizes)
            if ir.has_input(node, 1):
                node.inputs[1] = const
            else:
                node.inputs.append(const)
        else:
            ir.set_attr(node, "split", sizes.tolist())

    def _kept_count(self, tensor: gs.Tensor) -> int:
        keep = self.keep(tensor)
        return self.original_size(tensor) if keep is None else int(keep.size)

    def slice(self, node: gs.Node) -> None:
        x = node.inputs[0]
        keep_mask = self.keep_atoms[self.trace.maps[x.name].atoms]
        if keep_mask.all():
            return
        rank = len(self.trace.shapes[x.name])
        axis = self.axis(x)
        spec = slice_spec(node, rank)
        assert spec is not None
        start, end, step = spec[axis]
        taken = slice_positions(keep_mask.size, start, end, step)
        if taken.size == 0:
            return
        new_start = int(keep_mask[: taken[0]].sum())
        new_end = new_start + int(keep_mask[taken[0] : taken[-1] + 1].sum())
        if "starts" in node.attrs:
            axes = list(node.attrs.get("axes", range(len(node.attrs["starts"]))))
            k = [int(a) % rank for a in axes].index(axis)
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            starts[k], ends[k] = new_start, new_end
            node.attrs["starts"], node.attrs["ends"] = starts, ends
            return
        starts_value, ends_value, axes_value = (ir.input_const(node, i) for i in (1, 2, 3))
        assert starts_value is not None and ends_value is not None  # the tracer maps only constant bounds
        axes = axes_value.ravel().tolist() if axes_value is not None else list(range(starts_value.size))
        k = [int(a) % rank for a in axes].index(axis)
        for index, value, current in ((1, new_start, starts_value), (2, new_end, ends_value)):
            bounds = current.copy()
            flat = bounds.reshape(-1)
            flat[k] = value
            ir.set_input_const(node, index, bounds)

    def reshape(self, node: gs.Node) -> None:
        out = node.outputs[0]
        keep = self.keep(out)
        if keep is None or node.op != "Reshape":
            return  # Flatten / Squeeze / Unsqueeze follow their input
        target = ir.input_const(node, 1)
        assert target is not None
        axis = self.axis(out)
        if int(target.ravel()[axis]) in (-1, 0):
            return
        new = target.copy()
        new.reshape(-1)[axis] = keep.size
        ir.set_input_const(node, 1, new)

    def resize(self, node: gs.Node) -> None:
        keep = self.keep(node.outputs[0])
        if keep is None or node.op != "Resize" or not ir.has_input(node, 3):
            return
        sizes = ir.input_const(node, 3)
        if sizes is None or sizes.size == 0:
            return
        new = sizes.copy()
        new.reshape(-1)[self.axis(node.outputs[0])] = keep.size
        ir.set_input_const(node, 3, new)


def _take2(weight: np.ndarray, keep0: np.ndarray | None, keep1: np.ndarray | None) -> np.ndarray:
    """`weight` kept at `keep0` on axis 0 and `keep1` on axis 1 (None: all), in one gather.

    Both at once (`np.ix_`) makes no intermediate array: slicing a large dense weight holds
    only it and its result, never a third, partly sliced, copy.
    """
    if keep0 is None:
        return weight if keep1 is None else np.take(weight, keep1, axis=1)
    if keep1 is None:
        return np.take(weight, keep0, axis=0)
    return weight[np.ix_(keep0, keep1)]


def apply_plan(graph: gs.Graph, trace: Trace, plan: Plan, opset: int, overrides: Overrides | None = None) -> gs.Graph:
    """Rewrite `graph` in place so that the plan's classes are gone; returns it."""
    nodes = ir.node_by_name(graph)
    for (name, index), value in (overrides or {}).items():
        ir.set_input_const(nodes[name], index, value)
    applier = _Applier(graph, trace, plan, opset)
    for node in list(graph.nodes):
        applier.node(node)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.outputs and tensor not in graph.inputs:
            tensor.shape = None  # stale: re-inferred on export
    return graph
