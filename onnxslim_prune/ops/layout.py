"""Layout ops: index mappings (Concat, Split, Slice), block mappings (Reshape, Flatten, Squeeze,
Unsqueeze), axis mappings (Transpose), Pad, Resize / Upsample and shape reads (Shape, Size).

Index mappings. Concat on the channel axis concatenates the operands' atoms; Split and Slice
(step 1, constant bounds) cut them, and on apply their sizes / bounds are recounted: a Slice
``[s, e)`` over keep mask ``k`` becomes ``[sum(k[:s']), sum(k[:s']) + sum(k[s':e'+1]))`` with
``s', e'`` the first and last position it takes. Along any other axis they pass the channels.

Block mappings (`reshape_channel_map`): the channel axis merged into a larger one repeats and
tiles the atoms; a constant Reshape target holding the channel count is rewritten to the kept
count. Pad and Resize pass channels they neither pad nor resize (Resize `sizes` recounted).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import ChannelMap, Kind, Role, Shape
from ..graph import edit
from . import attention
from .elementwise import trace_broadcast
from .registry import ApplyContext, Freeze, OpRule, TraceContext, register

RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def reshape_channel_map(in_shape: Shape, out_shape: Shape, cmap: ChannelMap) -> ChannelMap | None:
    """Where the channel axis lands after a reshape, as a block mapping.

    With the channel stride S_c = prod(in[c+1:]) and an output axis o of stride
    S_o = prod(out[o+1:]) and size n_o: if S_c % S_o == 0 and (n_o * S_o) % (S_c * C) == 0,
    output index j holds channel (j // k) % C with k = S_c / S_o, i.e. the atoms are
    `tile(repeat(atoms, k), n_o * S_o / (S_c * C))`. Any other layout splits the channels.
    """
    c = cmap.axis
    if c >= len(in_shape) or in_shape[c] != cmap.size:
        return None
    size = cmap.size
    s_c = int(np.prod(in_shape[c + 1 :], dtype=np.int64))
    for o in range(len(out_shape)):
        s_o = int(np.prod(out_shape[o + 1 :], dtype=np.int64))
        n_o = int(out_shape[o])
        if s_o == 0 or s_c % s_o:
            continue
        k = s_c // s_o
        span = n_o * s_o
        if span % (s_c * size):
            continue
        tiles = span // (s_c * size)
        return ChannelMap(o, np.tile(np.repeat(cmap.atoms, k), tiles))
    return None


def slice_spec(node: gs.Node, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """axis -> (start, end, step) of a Slice with constant bounds (opset 1 attrs or later inputs)."""
    if "starts" in node.attrs:
        starts, ends = ir.attr(node, "starts"), ir.attr(node, "ends")
        axes = ir.attr(node, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = [ir.input_const(node, i) if ir.has_input(node, i) else None for i in range(1, 5)]
        if values[0] is None or values[1] is None:
            return None
        if (ir.has_input(node, 3) and values[2] is None) or (ir.has_input(node, 4) and values[3] is None):
            return None
        starts, ends = values[0].ravel().tolist(), values[1].ravel().tolist()
        axes = values[2].ravel().tolist() if values[2] is not None else list(range(len(starts)))
        steps = values[3].ravel().tolist() if values[3] is not None else [1] * len(starts)
    return {int(a) % rank: (int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)}


def slice_positions(size: int, start: int, end: int, step: int) -> np.ndarray:
    """Positions a Slice keeps along one axis, with ONNX's clamping (Python slice semantics)."""
    return np.arange(size)[slice(start, end, step)]


class ConcatRule(OpRule):
    """On the channel axis ``y = [x_1; ...; x_n]``: the output's channels are the operands' in order, so a kept channel
    of operand i keeps its offset within it (offsets recount on apply); an operand no prunable layer produced adds
    frozen channels. On another axis the operands are united, and constant operands (class tokens) are sliced."""

    ops = ("Concat",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        traced = t.traced_inputs(node)
        if not traced:
            return
        shapes = [t.shape(x) for x in node.inputs]
        if any(s is None for s in shapes):
            raise Freeze("an operand has an unknown shape")
        rank = len(shapes[0])  # type: ignore[arg-type]
        axis = int(ir.attr(node, "axis")) % rank
        if any(m.axis != axis for _, m in traced):
            lead = traced[0][1]
            if any(m.axis != lead.axis for _, m in traced):
                raise Freeze("concatenates along an axis other than the channels")
            untraced = [i for i in range(len(node.inputs)) if i not in dict(traced)]
            if any(not attention.constant_like(node.inputs[i], lead.axis, rank, lead.size) for i in untraced):
                raise Freeze("concatenates along an axis other than the channels")
            if untraced:  # class tokens: constants (or an Expand of one) sliced on apply
                for _, m in traced:
                    t.touch(m.atoms, node, Role.CONCAT)
                    t.unite(lead.atoms, m.atoms)
                t.set_kind(node, Kind.CONST_OPERAND)
                t.set_map(node.outputs[0], ChannelMap(lead.axis, lead.atoms))
                return
            trace_broadcast(t, node)  # same channels in every operand: unite them
            return
        parts: list[np.ndarray] = []
        for x, shape in zip(node.inputs, shapes):
            operand = t.cmap(x)
            if operand is None:
                assert shape is not None
                reason = f"Concat {node.name}: operand {x.name} is not produced by a prunable layer"
                _, atoms = t.new_space(int(shape[axis]), reason)
                parts.append(atoms)
            else:
                t.touch(operand.atoms, node, Role.CONCAT)
                parts.append(operand.atoms)
        t.set_kind(node, Kind.CONCAT)
        t.set_map(node.outputs[0], ChannelMap(axis, np.concatenate(parts)))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind == Kind.CONCAT:
            return
        out = node.outputs[0]
        keep = a.keep(out)
        if keep is None:
            return
        # along another axis: constant operands (and Expands of one) hold the channels
        rank, axis, size = len(a.trace.shapes[out.name]), a.axis(out), a.original_size(out)
        for i, x in enumerate(node.inputs):
            if a.trace.maps.get(x.name) is None and attention.constant_like(x, axis, rank, size):
                attention.slice_constant_like(a, node, i, axis, rank, keep)


def _kept_count(a: ApplyContext, tensor: gs.Tensor) -> int:
    keep = a.keep(tensor)
    return a.original_size(tensor) if keep is None else int(keep.size)


class SplitRule(OpRule):
    """On the channel axis output k holds channels ``[o_k, o_k + s_k)`` of the input; its size becomes the count kept
    in that range (the `split` input from opset 13, the attribute before). On another axis the channels pass."""

    ops = ("Split",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        axis = int(ir.attr(node, "axis", 0)) % len(shape)
        if axis != x_map.axis:
            for out in node.outputs:
                t.set_map(out, x_map)
            t.touch(x_map.atoms, node, Role.PASS)
            return
        sizes = [t.shape(o)[axis] for o in node.outputs if t.shape(o) is not None]  # type: ignore[index]
        if len(sizes) != len(node.outputs) or sum(sizes) != x_map.size:
            raise Freeze("split sizes are unknown")
        if ir.has_input(node, 1) and ir.input_const(node, 1) is None:
            raise Freeze("split sizes are computed at run time")
        offset = 0
        for out, n in zip(node.outputs, sizes):
            t.set_map(out, ChannelMap(axis, x_map.atoms[offset : offset + n]))
            offset += n
        t.touch(x_map.atoms, node, Role.SPLIT)
        t.set_kind(node, Kind.SPLIT)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """The kept count of each output: input `split` from opset 13, the attribute before."""
        if kind != Kind.SPLIT or all(a.keep(o) is None for o in node.outputs):
            return
        sizes = np.array([_kept_count(a, o) for o in node.outputs], dtype=np.int64)
        if a.opset >= 13:
            edit.remove_attrs(node, "num_outputs", "split")
            const = gs.Constant(f"{node.name}__split", sizes)
            if ir.has_input(node, 1):
                edit.replace_input(node, 1, const)
            else:
                edit.append_input(node, const)
        else:
            edit.set_attr(node, "split", sizes.tolist())


class SliceRule(OpRule):
    """On the channel axis (step 1) ``y = x[start:end]``: the bounds recount over the kept channels, so the slice
    still covers exactly the kept ones of its range; a strided slice or run-time bounds freeze. On other axes the
    channels pass."""

    ops = ("Slice",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        spec = slice_spec(node, len(shape))
        if spec is None:
            raise Freeze("slice bounds are computed at run time")
        if x_map.axis not in spec:
            t.pass_through(node, x_map)
            return
        start, end, step = spec[x_map.axis]
        if step != 1:
            raise Freeze("strided slice of the channel axis")
        t.touch(x_map.atoms, node, Role.SLICE)
        t.set_kind(node, Kind.SLICE)
        t.set_map(node.outputs[0], ChannelMap(x_map.axis, x_map.atoms[slice(start, end, step)]))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """Bounds recounted over the kept positions (module docstring)."""
        if kind != Kind.SLICE:
            return
        x = node.inputs[0]
        keep_mask = a.keep_atoms[a.trace.maps[x.name].atoms]
        if keep_mask.all():
            return
        rank = len(a.trace.shapes[x.name])
        axis = a.axis(x)
        spec = slice_spec(node, rank)
        assert spec is not None
        start, end, step = spec[axis]
        taken = slice_positions(keep_mask.size, start, end, step)
        if taken.size == 0:
            return
        new_start = int(keep_mask[: taken[0]].sum())
        new_end = new_start + int(keep_mask[taken[0] : taken[-1] + 1].sum())
        if "starts" in node.attrs:
            axes = list(ir.attr(node, "axes", range(len(ir.attr(node, "starts")))))
            k = [int(x) % rank for x in axes].index(axis)
            starts, ends = list(ir.attr(node, "starts")), list(ir.attr(node, "ends"))
            starts[k], ends[k] = new_start, new_end
            edit.set_attr(node, "starts", starts)
            edit.set_attr(node, "ends", ends)
            return
        starts_value, ends_value, axes_value = (ir.input_const(node, i) for i in (1, 2, 3))
        assert starts_value is not None and ends_value is not None  # the tracer maps only constant bounds
        axes = axes_value.ravel().tolist() if axes_value is not None else list(range(starts_value.size))
        k = [int(x) % rank for x in axes].index(axis)
        for index, value, current in ((1, new_start, starts_value), (2, new_end, ends_value)):
            bounds = current.copy()
            flat = bounds.reshape(-1)
            flat[k] = value
            edit.set_input_const(node, index, bounds)


class ReshapeRule(OpRule):
    """A reshape that merges the channel axis with others (``[N, C, H, W] -> [N, C*H*W]``) keeps each channel as a
    block of ``H*W`` positions; one that splits it into ``[..., heads, head_dim]`` keeps whole heads. The target's
    entry at the channel axis becomes the kept count; splits that scatter channels freeze."""

    ops = tuple(sorted(RESHAPE_OPS))

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        in_shape, out_shape = t.shape(node.inputs[0]), t.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            raise Freeze("unknown shape")
        mapped = reshape_channel_map(in_shape, out_shape, x_map)
        heads = None
        if mapped is None and node.op == "Reshape":
            heads = attention.head_split_map(in_shape, out_shape, x_map)  # channels split into [..., H, D]
            mapped = heads[0] if heads is not None else None
        if mapped is None:
            raise Freeze("splits or scatters the channel axis")
        if node.op == "Reshape":
            attention.check_target(t, node, mapped.axis, x_map.axis)
            target = ir.input_const(node, 1)
            if int(ir.attr(node, "allowzero", 0)) and (target is None or 0 in target.ravel().tolist()):
                raise Freeze("allowzero target shape")
        for head in heads[1] if heads is not None else ():
            t.unite(head[:1].repeat(head.size), head)
        t.touch(x_map.atoms, node, Role.RESHAPE)
        t.set_kind(node, Kind(node.op.lower()))
        t.set_map(node.outputs[0], mapped)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """Reshape's target at the channel axis becomes the kept count (Flatten / Squeeze / Unsqueeze follow their input)."""
        if kind != Kind.RESHAPE:
            return
        out = node.outputs[0]
        keep = a.keep(out)
        if keep is None or node.op != "Reshape":
            return
        attention.set_target_entry(a, node, a.axis(out), int(keep.size))


class TransposeRule(OpRule):
    """The channel axis moves to ``perm.index(c)`` (default perm: reversed)."""

    ops = ("Transpose",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        perm = ir.attr(node, "perm") or list(reversed(range(len(shape))))
        t.pass_through(node, ChannelMap(list(perm).index(x_map.axis), x_map.atoms))


class PadRule(OpRule):
    """Channels pass when neither end of the channel axis is padded."""

    ops = ("Pad",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        shape = t.shape(node.inputs[0])
        pads = ir.attr(node, "pads")
        if pads is None:
            pads = ir.input_const(node, 1)
        if pads is None or shape is None:
            raise Freeze("pads are not constant")
        pads = [int(p) for p in np.asarray(pads).ravel()]
        rank = len(shape)
        axes = ir.input_const(node, 3)
        axes_list = [int(x) % rank for x in axes.ravel()] if axes is not None else list(range(rank))
        n = len(axes_list)
        for k, x in enumerate(axes_list):
            if x == x_map.axis and (pads[k] != 0 or pads[k + n] != 0):
                raise Freeze("pads the channel axis")
        t.pass_through(node, x_map)


class ResizeRule(OpRule):
    """Channels pass when the channel dim keeps its size; Resize's constant `sizes` gets the kept count."""

    ops = ("Resize", "Upsample")

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        in_shape, out_shape = t.shape(node.inputs[0]), t.shape(node.outputs[0])
        if in_shape is None or out_shape is None or in_shape[x_map.axis] != out_shape[x_map.axis]:
            raise Freeze("resizes the channel axis")
        sizes_index = 3 if node.op == "Resize" else None
        if sizes_index is not None and ir.has_input(node, sizes_index) and ir.input_const(node, sizes_index) is None:
            raise Freeze("sizes are computed at run time")
        t.set_kind(node, Kind.RESIZE)
        t.pass_through(node, x_map, Role.RESIZE)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind != Kind.RESIZE:
            return
        keep = a.keep(node.outputs[0])
        if keep is None or node.op != "Resize" or not ir.has_input(node, 3):
            return
        sizes = ir.input_const(node, 3)
        if sizes is None or sizes.size == 0:
            return
        new = sizes.copy()
        new.reshape(-1)[a.axis(node.outputs[0])] = keep.size
        edit.set_input_const(node, 3, new)


class ShapeRule(OpRule):
    """Shape reads no data; only a read of the channel dim (other than through a constant Gather) depends on pruning."""

    ops = ("Shape",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if (traced := t.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        rank = len(shape)
        start = int(ir.attr(node, "start", 0))
        end = ir.attr(node, "end")
        start = start + rank if start < 0 else start
        stop = rank if end is None else (int(end) + rank if int(end) < 0 else int(end))
        if not start <= x_map.axis < stop:
            return
        position = x_map.axis - start
        for consumer in node.outputs[0].outputs:
            if start == 0 and attention.feeds_own_reshape(consumer, node.inputs[0], x_map.axis):
                continue  # x.flatten(k): the Reshape of x reads its own (kept) channel count
            index = ir.input_const(consumer, 1) if consumer.op == "Gather" else None
            if index is None or int(np.asarray(index).size) != 1:
                raise Freeze("the channel count is read at run time")
            if int(np.asarray(index).ravel()[0]) % (stop - start) == position and not _reads_into_shapes(consumer):
                raise Freeze("the channel count is read at run time")
        t.set_kind(node, Kind.SHAPE)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """A Gather of the channel count keeps the original's value, a constant (its shape consumers are recounted)."""
        x = node.inputs[0]
        if kind != Kind.SHAPE or a.keep(x) is None:
            return
        rank = len(a.trace.shapes[x.name])
        start = int(ir.attr(node, "start", 0)) % rank if ir.attr(node, "start") is not None else 0
        for consumer in list(node.outputs[0].outputs):
            index = ir.input_const(consumer, 1) if consumer.op == "Gather" else None
            if index is not None and index.size == 1 and int(index.ravel()[0]) % rank + start == a.axis(x):
                value = np.full(index.shape, a.original_size(x), dtype=np.int64)
                edit.rewire_node(consumer, "Identity", [gs.Constant(f"{consumer.name}__count", value)])  # 0-d stays 0-d


def _reads_into_shapes(gather: gs.Node) -> bool:
    """The channel count read by `gather` only builds shapes (Unsqueeze into a Concat into Reshape / Expand targets)."""
    for unsqueeze in gather.outputs[0].outputs:
        if unsqueeze.op != "Unsqueeze":
            return False
        for concat in unsqueeze.outputs[0].outputs:
            if concat.op != "Concat" or any(user.op not in ("Reshape", "Expand") or user.inputs[1] is not concat.outputs[0]
                                            for user in concat.outputs[0].outputs):
                return False
    return True


class SizeRule(OpRule):
    """``Size(x)`` counts the channels at run time, so a traced input freezes them."""

    ops = ("Size",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if t.cmap(node.inputs[0]) is not None:
            raise Freeze("the element count is read at run time")


for _rule in (ConcatRule(), SplitRule(), SliceRule(), ReshapeRule(), TransposeRule(), PadRule(), ResizeRule(), ShapeRule(),
              SizeRule()):
    register(_rule)
