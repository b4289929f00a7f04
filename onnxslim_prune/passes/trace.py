"""Trace which channels are coupled: the dependency graph of channel slices.

Model. Every *source* (the output channels of a Conv, ConvTranspose, Gemm or MatMul
with a constant weight) creates a *space*: a block of fresh channel atoms, one per
output channel. Each traced tensor carries a `ChannelMap` (its channel axis and, for
every position along that axis, the atom it holds). Ops move maps along:

* per-channel ops (BN, activations, pooling, ...) copy the map;
* elementwise ops with broadcasting *unite* the atoms of their operands position by
  position (residual Add, SE Mul), and slice constant operands that have a channel dim;
* Concat concatenates maps, Split and Slice cut them (index mappings with offsets);
* Flatten / Reshape / Squeeze merge the channel axis into a larger one: position j of
  the output axis holds atom `atoms[(j // k) % C]` (a block mapping, `repeat` then `tile`);
* Transpose moves the axis; a depthwise conv copies (or repeats, for a multiplier) it.

Atoms united by a union-find are one *class*: a channel that must be pruned everywhere
at once. Spaces linked through any united atom form a *group*, the unit that is scored
and planned (Torch-Pruning's group, from ONNX semantics). An op the tracer does not
understand *freezes* the atoms of every traced input, with the reason recorded; graph
outputs freeze theirs. Nothing here edits the graph: the result is plain data.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import ChannelMap, Group, Kind, Member, Role, Shape, Source, Trace, UnionFind

log = logging.getLogger(__name__)

UNARY_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
        "Gelu", "Softplus", "Softsign", "Mish", "Erf", "Identity", "Dropout", "Cast", "Abs", "Neg", "Exp",
        "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu",
        "Not", "IsNaN", "IsInf", "Shrink",
    }
)
BROADCAST_OPS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", "Where", "Equal", "Less",
     "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Mod"}
)
SPATIAL_OPS = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "MaxRoiPool",
     "SpaceToDepth", "DepthToSpace"}
)
REDUCE_OPS = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
)
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: the attributes that change which weight entries a channel indexes (strides, pads and dilations do not)
CHANNEL_ATTRS = {"Conv": ("group",), "ConvTranspose": ("group",), "Gemm": ("transA", "transB")}


# ----------------------------------------------------------------------------- tracer


@dataclass
class _State:
    uf: UnionFind = field(default_factory=UnionFind)
    maps: dict[str, ChannelMap] = field(default_factory=dict)
    atom_space: list[int] = field(default_factory=list)
    space_atoms: dict[int, np.ndarray] = field(default_factory=dict)
    space_frozen: dict[int, str] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    frozen: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    members: list[tuple[np.ndarray, Member]] = field(default_factory=list)
    blocks: list[tuple[np.ndarray, int]] = field(default_factory=list)
    node_kind: dict[str, Kind] = field(default_factory=dict)

    def new_space(self, n: int, frozen_reason: str | None = None) -> tuple[int, np.ndarray]:
        atoms = self.uf.make(n)
        space = len(self.space_atoms)
        self.space_atoms[space] = atoms
        self.atom_space.extend([space] * n)
        if frozen_reason:
            self.space_frozen[space] = frozen_reason
            self.freeze(atoms, frozen_reason)
        return space, atoms

    def freeze(self, atoms: Iterable[int], reason: str) -> None:
        for a in set(int(x) for x in atoms):
            if reason not in self.frozen[a]:
                self.frozen[a].append(reason)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def touch(self, atoms: np.ndarray, node: gs.Node, role: Role) -> None:
        if atoms.size:
            self.members.append((atoms, Member(node.name, node.op, role)))


class Tracer:
    """Walks a topologically sorted gs.Graph once and builds a `Trace`."""

    def __init__(
        self, graph: gs.Graph, shapes: Mapping[str, Shape], exclude: Sequence[str] = (), opset: int = 17
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.shapes = shapes
        self.exclude = tuple(exclude)
        self.s = _State()
        self.handlers: dict[str, Callable[[gs.Node], None]] = {
            "Conv": self._conv,
            "ConvTranspose": self._conv_transpose,
            "Gemm": self._gemm,
            "MatMul": self._matmul,
            "BatchNormalization": self._per_channel_norm,
            "InstanceNormalization": self._per_channel_norm,
            "Concat": self._concat,
            "Split": self._split,
            "Slice": self._slice,
            "Transpose": self._transpose,
            "Pad": self._pad,
            "Resize": self._resize,
            "Upsample": self._resize,
            "Softmax": self._axis_op,
            "LogSoftmax": self._axis_op,
            "Hardmax": self._axis_op,
            "LayerNormalization": self._layer_norm,
            "Shape": self._shape,
            "Size": self._size,
        }
        for op in UNARY_OPS:
            self.handlers[op] = self._unary
        for op in BROADCAST_OPS:
            self.handlers[op] = self._broadcast
        for op in SPATIAL_OPS:
            self.handlers[op] = self._spatial
        for op in REDUCE_OPS:
            self.handlers[op] = self._reduce
        for op in RESHAPE_OPS:
            self.handlers[op] = self._reshape

    # -- helpers --------------------------------------------------------------

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(np.asarray(tensor.values).shape)
        return self.shapes.get(tensor.name)

    def cmap(self, tensor: gs.Tensor) -> ChannelMap | None:
        return self.s.maps.get(tensor.name) if tensor.name else None

    def traced_inputs(self, node: gs.Node) -> list[tuple[int, ChannelMap]]:
        return [(i, m) for i, t in enumerate(node.inputs) if (m := self.cmap(t)) is not None]

    def traced_with_shape(self, node: gs.Node) -> tuple[ChannelMap, Shape] | None:
        """The first input's map and static shape; None if untraced, frozen if the shape is unknown."""
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return None
        shape = self.shape(node.inputs[0])
        if shape is None:
            raise _Freeze("unknown rank")
        return x_map, shape

    def set_map(self, tensor: gs.Tensor, cmap: ChannelMap) -> None:
        self.s.maps[tensor.name] = cmap

    def freeze_node(self, node: gs.Node, reason: str) -> None:
        """The conservative default: every traced input keeps all its channels."""
        for _, m in self.traced_inputs(node):
            self.s.freeze(m.atoms, f"{node.op} {node.name}: {reason}")
            self.s.touch(m.atoms, node, Role.FROZEN)
        self.s.node_kind.setdefault(node.name, Kind.FROZEN)

    def pass_through(self, node: gs.Node, cmap: ChannelMap, role: Role = Role.PASS) -> None:
        self.s.touch(cmap.atoms, node, role)
        out = node.outputs[0]
        self.set_map(out, cmap)

    # -- driver ---------------------------------------------------------------

    def run(self) -> Trace:
        for node in self.graph.nodes:
            handler = self.handlers.get(node.op)
            if node.domain not in (None, "", "ai.onnx"):
                handler = None
            if handler is None:
                if self.traced_inputs(node):
                    self.freeze_node(node, "op not understood by the tracer")
                continue
            try:
                handler(node)
            except _Freeze as stop:
                self.freeze_node(node, str(stop))
                for out in node.outputs:
                    self.s.maps.pop(out.name, None)
        self._couple_shared_weights()
        for out in self.graph.outputs:
            if (m := self.cmap(out)) is not None:
                self.s.freeze(m.atoms, f"graph output {out.name}")
        self._apply_excludes()
        return self._finish()

    def _couple_shared_weights(self) -> None:
        """Nodes that share one weight tensor are pruned alike, so the weight stays shared.

        Weight column j and row i are the same numbers in every user: their input channels are
        united position by position, and so are their output channels (Torch-Pruning's rule for a
        module called twice). Without it each user would get its own slice, and a pruned model
        could hold more parameters than the original. Users whose ops, channel attributes
        (`CHANNEL_ATTRS`) or channel counts differ are frozen instead.
        """
        users: dict[str, list[gs.Node]] = defaultdict(list)
        for node in self.graph.nodes:
            if node.op in WEIGHTED_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                users[node.inputs[1].name].append(node)
        for weight, nodes in users.items():
            if len(nodes) < 2:
                continue
            first = nodes[0]
            for other in nodes[1:]:
                pairs = [(self.cmap(first.inputs[0]), self.cmap(other.inputs[0])),
                         (self.cmap(first.outputs[0]), self.cmap(other.outputs[0]))]
                alike = other.op == first.op and all(
                    other.attrs.get(a) == first.attrs.get(a) for a in CHANNEL_ATTRS.get(first.op, ())
                )
                # untraced on both sides (a graph input) is fine: those channels never change
                if alike and all((a is None and b is None) or (a is not None and b is not None and a.size == b.size)
                                 for a, b in pairs):
                    for a, b in pairs:
                        if a is not None and b is not None:
                            self.s.unite(a.atoms, b.atoms)
                    continue
                reason = f"{first.name} and {other.name} share weight {weight} but cannot be pruned alike"
                for a, b in pairs:
                    for m in (a, b):
                        if m is not None:
                            self.s.freeze(m.atoms, reason)

    def _apply_excludes(self) -> None:
        if not self.exclude:
            return
        for node in self.graph.nodes:
            if any(fnmatchcase(node.name, pat) for pat in self.exclude):
                for t in [*node.inputs, *node.outputs]:
                    if (m := self.cmap(t)) is not None:
                        self.s.freeze(m.atoms, f"excluded by --exclude ({node.name})")

    # -- weighted ops -----------------------------------------------------------

    def _conv(self, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        x_map = self.cmap(node.inputs[0])
        if weight is None:
            raise _Freeze("weight is not a constant")
        if ir.has_input(node, 2) and ir.input_const(node, 2) is None:
            raise _Freeze("bias is not a constant")
        if x_map is not None and x_map.axis != 1:
            raise _Freeze("input channels are not on axis 1")
        group = int(ir.attr(node, "group", 1))
        cout, cin_per_group = int(weight.shape[0]), int(weight.shape[1])
        cin = cin_per_group * group
        out = node.outputs[0]
        if group == 1:
            self.s.node_kind[node.name] = Kind.CONV
            if x_map is not None:
                self.s.touch(x_map.atoms, node, Role.IN)
            self._new_source(node, out, 1, cout)
        elif cin_per_group == 1 and cout % group == 0:
            # depthwise: output channel j reads input channel j // multiplier only
            self.s.node_kind[node.name] = Kind.DEPTHWISE
            multiplier = cout // group
            if x_map is None:
                _, atoms = self.s.new_space(cout, f"{node.op} {node.name}: depthwise conv on an untraced input")
                self.set_map(out, ChannelMap(1, atoms))
                return
            self.s.touch(x_map.atoms, node, Role.DEPTHWISE)
            self.set_map(out, ChannelMap(1, np.repeat(x_map.atoms, multiplier)))
        else:
            self.s.node_kind[node.name] = Kind.GROUPED
            if x_map is not None:
                if x_map.size != cin:
                    raise _Freeze("input channel count does not match the weight")
                self.s.touch(x_map.atoms, node, Role.IN)
                self.s.blocks.append((x_map.atoms, group))
            _, atoms = self._new_source(node, out, 1, cout)
            self.s.blocks.append((atoms, group))

    def _conv_transpose(self, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        x_map = self.cmap(node.inputs[0])
        if weight is None:
            raise _Freeze("weight is not a constant")
        if int(ir.attr(node, "group", 1)) != 1:
            raise _Freeze("grouped ConvTranspose")
        if ir.has_input(node, 2) and ir.input_const(node, 2) is None:
            raise _Freeze("bias is not a constant")
        if x_map is not None:
            if x_map.axis != 1:
                raise _Freeze("input channels are not on axis 1")
            self.s.touch(x_map.atoms, node, Role.IN)
        self.s.node_kind[node.name] = Kind.CONV_TRANSPOSE
        self._new_source(node, node.outputs[0], 1, int(weight.shape[1]))

    def _gemm(self, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        if weight is None:
            raise _Freeze("weight is not a constant")
        if int(ir.attr(node, "transA", 0)):
            raise _Freeze("transA=1")
        if ir.has_input(node, 2):
            bias = ir.input_const(node, 2)
            if bias is None:
                raise _Freeze("bias is not a constant")
        x_map = self.cmap(node.inputs[0])
        if x_map is not None:
            if x_map.axis != 1:
                raise _Freeze("input features are not on axis 1")
            self.s.touch(x_map.atoms, node, Role.IN)
        trans_b = int(ir.attr(node, "transB", 0))
        n_out = int(weight.shape[0] if trans_b else weight.shape[1])
        self.s.node_kind[node.name] = Kind.GEMM
        self._new_source(node, node.outputs[0], 1, n_out)

    def _matmul(self, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        a_shape = self.shape(node.inputs[0])
        if weight is None or weight.ndim != 2 or a_shape is None:
            raise _Freeze("second operand is not a constant 2-D weight")
        x_map = self.cmap(node.inputs[0])
        if x_map is not None:
            if x_map.axis != len(a_shape) - 1:
                raise _Freeze("features are not on the last axis")
            self.s.touch(x_map.atoms, node, Role.IN)
        self.s.node_kind[node.name] = Kind.MATMUL
        self._new_source(node, node.outputs[0], len(a_shape) - 1, int(weight.shape[1]))

    def _new_source(self, node: gs.Node, out: gs.Tensor, axis: int, n: int) -> tuple[int, np.ndarray]:
        space, atoms = self.s.new_space(n)
        weight = node.inputs[1].name
        w_axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(node.op)
        if node.op == "Gemm":
            w_axis = 0 if int(ir.attr(node, "transB", 0)) else 1
        self.s.sources.append(Source(node.name, node.op, weight, int(w_axis or 0), space))
        self.s.touch(atoms, node, Role.OUT)
        self.set_map(out, ChannelMap(axis, atoms))
        return space, atoms

    # -- per-channel and pass-through ops ---------------------------------------

    def _per_channel_norm(self, node: gs.Node) -> None:
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return
        if x_map.axis != 1:
            raise _Freeze("channels are not on axis 1")
        for i in range(1, len(node.inputs)):
            if ir.has_input(node, i) and ir.input_const(node, i) is None:
                raise _Freeze("per-channel parameters are not constants")
        if node.op == "BatchNormalization" and len([o for o in node.outputs if o.outputs or o in self.graph.outputs]) > 1:
            raise _Freeze("training-mode outputs are used")
        self.s.node_kind[node.name] = Kind.NORM
        self.pass_through(node, x_map, Role.NORM)

    def _unary(self, node: gs.Node) -> None:
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return
        for extra in node.inputs[1:]:  # Clip min/max, Dropout ratio: scalars only
            if extra.name and self.cmap(extra) is not None:
                raise _Freeze("a parameter operand carries channels")
            shape = self.shape(extra) if extra.name else ()
            if shape and int(np.prod(shape)) != 1:
                raise _Freeze("a parameter operand is not a scalar")
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Freeze("the dropout mask is used")
        self.pass_through(node, x_map)

    def _spatial(self, node: gs.Node) -> None:
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return
        if node.op in ("SpaceToDepth", "DepthToSpace"):
            raise _Freeze("moves data between channels and space")
        if x_map.axis != 1:
            raise _Freeze("channels are not on axis 1")
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Freeze("pooling indices are used")
        self.pass_through(node, x_map)

    def _pad(self, node: gs.Node) -> None:
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return
        shape = self.shape(node.inputs[0])
        pads = ir.attr(node, "pads")
        if pads is None:
            pads = ir.input_const(node, 1)
        if pads is None or shape is None:
            raise _Freeze("pads are not constant")
        pads = [int(p) for p in np.asarray(pads).ravel()]
        rank = len(shape)
        axes = ir.input_const(node, 3)
        axes_list = [int(a) % rank for a in axes.ravel()] if axes is not None else list(range(rank))
        n = len(axes_list)
        for k, a in enumerate(axes_list):
            if a == x_map.axis and (pads[k] != 0 or pads[k + n] != 0):
                raise _Freeze("pads the channel axis")
        self.pass_through(node, x_map)

    def _resize(self, node: gs.Node) -> None:
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if in_shape is None or out_shape is None or in_shape[x_map.axis] != out_shape[x_map.axis]:
            raise _Freeze("resizes the channel axis")
        sizes_index = 3 if node.op == "Resize" else None
        if sizes_index is not None and ir.has_input(node, sizes_index) and ir.input_const(node, sizes_index) is None:
            raise _Freeze("sizes are computed at run time")
        self.s.node_kind[node.name] = Kind.RESIZE
        self.pass_through(node, x_map, Role.RESIZE)

    def _axis_op(self, node: gs.Node) -> None:
        if (traced := self.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        if self.opset < 13:  # opset < 13 normalises over the flattened axes from `axis` on
            axis = int(ir.attr(node, "axis", 1)) % len(shape)
            if x_map.axis >= axis:
                raise _Freeze("normalises across channels")
        elif int(ir.attr(node, "axis", -1)) % len(shape) == x_map.axis:
            raise _Freeze("normalises across channels")
        self.pass_through(node, x_map)

    def _layer_norm(self, node: gs.Node) -> None:
        if (traced := self.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        axis = int(ir.attr(node, "axis", -1)) % len(shape)
        if x_map.axis >= axis:
            raise _Freeze("normalises across channels")
        self.pass_through(node, x_map)

    def _reduce(self, node: gs.Node) -> None:
        if (traced := self.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        rank = len(shape)
        axes = ir.attr(node, "axes")
        if axes is None and ir.has_input(node, 1):
            value = ir.input_const(node, 1)
            if value is None:
                raise _Freeze("axes are computed at run time")
            axes = value.ravel().tolist()
        if not axes:
            if int(ir.attr(node, "noop_with_empty_axes", 0)):
                self.pass_through(node, x_map)
                return
            raise _Freeze("reduces over all axes")
        axes = sorted(int(a) % rank for a in axes)
        if x_map.axis in axes:
            raise _Freeze("reduces across channels")
        keep = int(ir.attr(node, "keepdims", 1))
        axis = x_map.axis if keep else x_map.axis - sum(1 for a in axes if a < x_map.axis)
        self.pass_through(node, ChannelMap(axis, x_map.atoms))

    def _transpose(self, node: gs.Node) -> None:
        if (traced := self.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        perm = ir.attr(node, "perm") or list(reversed(range(len(shape))))
        self.pass_through(node, ChannelMap(list(perm).index(x_map.axis), x_map.atoms))

    def _shape(self, node: gs.Node) -> None:
        """Shape reads no data; only a read of the channel dim makes it depend on pruning."""
        if (traced := self.traced_with_shape(node)) is None:
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
            index = ir.input_const(consumer, 1) if consumer.op == "Gather" else None
            if index is None or int(np.asarray(index).size) != 1 or int(np.asarray(index).ravel()[0]) % (stop - start) == position:
                raise _Freeze("the channel count is read at run time")
        self.s.node_kind[node.name] = Kind.SHAPE

    def _size(self, node: gs.Node) -> None:
        if self.cmap(node.inputs[0]) is not None:
            raise _Freeze("the element count is read at run time")

    # -- broadcasting -------------------------------------------------------------

    def _broadcast(self, node: gs.Node) -> None:
        traced = self.traced_inputs(node)
        if not traced:
            return
        shapes = [self.shape(t) if t.name else None for t in node.inputs]
        if any(s is None for t, s in zip(node.inputs, shapes) if t.name):
            raise _Freeze("an operand has an unknown shape")
        ranks = [len(s) if s is not None else 0 for s in shapes]
        rank = max(ranks)
        positions = {rank - ranks[i] + m.axis for i, m in traced}
        if len(positions) != 1:
            raise _Freeze("operands carry channels on different axes")
        pos = positions.pop()
        size = max(m.size for _, m in traced)
        lead = traced[0][1]
        for i, m in traced:
            if m.size != size:
                raise _Freeze("an operand broadcasts over the channels")
            self.s.touch(m.atoms, node, Role.ELEMENTWISE)
            if i != traced[0][0]:
                self.s.unite(lead.atoms, m.atoms)
        traced_ids = {i for i, _ in traced}
        for i, t in enumerate(node.inputs):
            if i in traced_ids or not t.name:
                continue
            shape = shapes[i]
            assert shape is not None
            own_axis = pos - (rank - len(shape))
            if own_axis < 0 or shape[own_axis] == 1:
                continue
            if shape[own_axis] != size or not isinstance(t, gs.Constant):
                raise _Freeze("an untraced operand has a channel dimension")
            self.s.node_kind[node.name] = Kind.CONST_OPERAND
        out_map = ChannelMap(pos, lead.atoms)
        for out in node.outputs:
            self.set_map(out, out_map)

    # -- index mappings -------------------------------------------------------------

    def _concat(self, node: gs.Node) -> None:
        traced = self.traced_inputs(node)
        if not traced:
            return
        shapes = [self.shape(t) for t in node.inputs]
        if any(s is None for s in shapes):
            raise _Freeze("an operand has an unknown shape")
        rank = len(shapes[0])  # type: ignore[arg-type]
        axis = int(ir.attr(node, "axis")) % rank
        if any(m.axis != axis for _, m in traced):
            if any(m.axis != traced[0][1].axis for _, m in traced) or len(traced) != len(node.inputs):
                raise _Freeze("concatenates along an axis other than the channels")
            self._broadcast(node)  # same channels in every operand: unite them
            return
        parts: list[np.ndarray] = []
        for t, shape in zip(node.inputs, shapes):
            m = self.cmap(t)
            if m is None:
                assert shape is not None
                reason = f"Concat {node.name}: operand {t.name} is not produced by a prunable layer"
                _, atoms = self.s.new_space(int(shape[axis]), reason)
                parts.append(atoms)
            else:
                self.s.touch(m.atoms, node, Role.CONCAT)
                parts.append(m.atoms)
        self.s.node_kind[node.name] = Kind.CONCAT
        self.set_map(node.outputs[0], ChannelMap(axis, np.concatenate(parts)))

    def _split(self, node: gs.Node) -> None:
        if (traced := self.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        axis = int(ir.attr(node, "axis", 0)) % len(shape)
        if axis != x_map.axis:
            for out in node.outputs:
                self.set_map(out, x_map)
            self.s.touch(x_map.atoms, node, Role.PASS)
            return
        sizes = [self.shape(o)[axis] for o in node.outputs if self.shape(o) is not None]  # type: ignore[index]
        if len(sizes) != len(node.outputs) or sum(sizes) != x_map.size:
            raise _Freeze("split sizes are unknown")
        if ir.has_input(node, 1) and ir.input_const(node, 1) is None:
            raise _Freeze("split sizes are computed at run time")
        offset = 0
        for out, n in zip(node.outputs, sizes):
            self.set_map(out, ChannelMap(axis, x_map.atoms[offset : offset + n]))
            offset += n
        self.s.touch(x_map.atoms, node, Role.SPLIT)
        self.s.node_kind[node.name] = Kind.SPLIT

    def _slice(self, node: gs.Node) -> None:
        if (traced := self.traced_with_shape(node)) is None:
            return
        x_map, shape = traced
        spec = slice_spec(node, len(shape))
        if spec is None:
            raise _Freeze("slice bounds are computed at run time")
        if x_map.axis not in spec:
            self.pass_through(node, x_map)
            return
        start, end, step = spec[x_map.axis]
        if step != 1:
            raise _Freeze("strided slice of the channel axis")
        self.s.touch(x_map.atoms, node, Role.SLICE)
        self.s.node_kind[node.name] = Kind.SLICE
        self.set_map(node.outputs[0], ChannelMap(x_map.axis, x_map.atoms[slice(start, end, step)]))

    def _reshape(self, node: gs.Node) -> None:
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            raise _Freeze("unknown shape")
        mapped = reshape_channel_map(in_shape, out_shape, x_map)
        if mapped is None:
            raise _Freeze("splits or scatters the channel axis")
        if node.op == "Reshape":
            target = ir.input_const(node, 1)
            if target is None:
                raise _Freeze("target shape is computed at run time")
            values = target.ravel().tolist()
            if mapped.axis >= len(values):
                raise _Freeze("target shape does not match the inferred shape")
            if values[mapped.axis] == 0 and mapped.axis != x_map.axis:
                raise _Freeze("a 0 in the target shape copies a channel-dependent dim")
            if int(ir.attr(node, "allowzero", 0)) and 0 in values:
                raise _Freeze("allowzero target shape")
        self.s.touch(x_map.atoms, node, Role.RESHAPE)
        self.s.node_kind[node.name] = Kind(node.op.lower())
        self.set_map(node.outputs[0], mapped)

    # -- result -------------------------------------------------------------------

    def _finish(self) -> Trace:
        s = self.s
        roots = s.uf.roots()
        n_spaces = len(s.space_atoms)
        space_uf = UnionFind()
        space_uf.make(n_spaces)
        atom_space = np.asarray(s.atom_space, dtype=np.int64)
        for atom, root in enumerate(roots.tolist()):
            space_uf.union(int(atom_space[atom]), int(atom_space[root]))
        space_root = space_uf.roots() if n_spaces else np.zeros(0, dtype=np.int64)

        by_group: dict[int, list[int]] = defaultdict(list)
        for space in range(n_spaces):
            by_group[int(space_root[space])].append(space)

        frozen_roots: dict[int, list[str]] = defaultdict(list)
        for atom, reasons in s.frozen.items():
            bucket = frozen_roots[int(roots[atom])]
            bucket.extend(r for r in reasons if r not in bucket)

        def groups_of(atoms: np.ndarray) -> set[int]:
            return set(space_root[atom_space[atoms]].tolist())

        # a member belongs to every group whose channels it touches (a Concat consumer spans several)
        members_by_group: dict[int, list[Member]] = defaultdict(list)
        for atoms, member in s.members:
            for key in groups_of(atoms):
                members_by_group[key].append(member)
        blocks_by_group: dict[int, list[tuple[np.ndarray, int]]] = defaultdict(list)
        mixed_blocks: dict[int, str] = {}
        for atoms, g in s.blocks:
            keys = groups_of(atoms)
            if len(keys) == 1:
                blocks_by_group[keys.pop()].append((atoms, g))
            else:  # the per-group equal count would have to hold across groups: not expressible here
                for key in keys:
                    mixed_blocks[key] = "a grouped conv mixes channels of several groups"
        node_macs = self._node_macs()
        groups: list[Group] = []
        class_group: dict[int, int] = {}
        for spaces in sorted(by_group.values(), key=lambda sp: min(sp)):
            atoms = np.concatenate([s.space_atoms[sp] for sp in spaces])
            classes = list(dict.fromkeys(int(r) for r in roots[atoms]))
            reasons = list(dict.fromkeys(r for c in classes for r in frozen_roots.get(c, [])))
            frozen = [bool(frozen_roots.get(c)) for c in classes]
            key = int(space_root[spaces[0]])
            members = list(dict.fromkeys(members_by_group.get(key, [])))
            # a group whose only spaces are frozen placeholders has no source to prune
            if all(sp in s.space_frozen for sp in spaces):
                frozen = [True] * len(classes)
            block = 1
            group_blocks = blocks_by_group.get(key, [])
            why = mixed_blocks.get(key, "")
            if group_blocks and not why:
                block, why = _block_constraint(classes, group_blocks, roots)
            if why:
                block = 1
                frozen = [True] * len(classes)
                reasons.append(why)
            index = len(groups)
            for c in classes:
                class_group[c] = index
            macs = sum(node_macs.get(n, 0) for n in dict.fromkeys(m.node for m in members))
            groups.append(
                Group(index, tuple(spaces), tuple(classes), tuple(frozen), tuple(reasons), tuple(members), block, macs)
            )
        return Trace(
            groups=tuple(groups),
            maps=dict(s.maps),
            sources=tuple(s.sources),
            roots=roots,
            class_group=class_group,
            node_kind=dict(s.node_kind),
            space_atoms=dict(s.space_atoms),
            shapes=self.shapes,
            node_macs=node_macs,
        )

    def _node_macs(self) -> dict[str, int]:
        return {n.name: node_macs(n, self.shape) for n in self.graph.nodes}


class _Freeze(Exception):
    """Raised by a handler: freeze the node's traced inputs with this reason."""


def _block_constraint(
    classes: Sequence[int], blocks: Sequence[tuple[np.ndarray, int]], roots: np.ndarray
) -> tuple[int, str]:
    """Grouped convs: every constraint must split this group's classes into the same blocks."""
    class_index = {c: i for i, c in enumerate(classes)}
    reference: list[int] | None = None
    count = 1
    for atoms, g in blocks:
        cls = [class_index.get(int(r), -1) for r in roots[atoms]]
        if len(set(cls)) != len(cls) or len(cls) != len(classes) or len(cls) % g:
            return 1, "grouped conv channels are shared unevenly"
        per = len(cls) // g
        block_of = [0] * len(classes)
        for pos, c in enumerate(cls):
            block_of[c] = pos // per
        if reference is None:
            reference, count = block_of, g
        elif reference != block_of:
            return 1, "grouped convs disagree on channel blocks"
    return count, ""


# ----------------------------------------------------------------------------- shared helpers


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
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
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


def node_macs(node: gs.Node, shape_of: Callable[[gs.Tensor], Shape | None]) -> int:
    """Multiply-accumulates of the weighted ops (Conv, ConvTranspose, Gemm, MatMul)."""
    try:
        if node.op in ("Conv", "ConvTranspose"):
            weight = shape_of(node.inputs[1])
            spatial_of = node.outputs[0] if node.op == "Conv" else node.inputs[0]
            spatial = shape_of(spatial_of)
            if weight is None or spatial is None:
                return 0
            return int(np.prod(weight, dtype=np.int64) * np.prod(spatial[2:], dtype=np.int64) * spatial[0])
        if node.op in ("Gemm", "MatMul"):
            a, out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
            if a is None or out is None:
                return 0
            k = a[0] if node.op == "Gemm" and int(node.attrs.get("transA", 0)) else a[-1]
            return int(np.prod(out, dtype=np.int64) * k)
    except (IndexError, TypeError, ValueError):
        return 0
    return 0


def trace(graph: gs.Graph, shapes: Mapping[str, Shape], exclude: Sequence[str] = (), opset: int = 17) -> Trace:
    """Trace the coupled channel groups of `graph` (see the module docstring)."""
    return Tracer(graph, shapes, exclude, opset).run()
