"""Elementwise ops: unary pass-through and broadcasting (residual Add, SE Mul, PRelu, Where, ...).

The one constant-operand rule. A broadcasting op's output has rank ``r`` and its channels on
axis ``c``. Operand ``x`` of rank ``r_x`` is right-aligned (numpy broadcasting), so its own axis
under the channels is

    a_x = c - (r - r_x)

and it carries channels there iff ``a_x >= 0`` and ``x.shape[a_x] != 1`` (`operand_channel_axis`).
A traced operand is united with the others position by position; an untraced one with a channel
dim must be a constant of exactly ``C`` entries there (else the node freezes), and it is then
sliced to the kept positions, ``x' = take(x, keep, axis=a_x)``, and its parameters scale with
the kept fraction in the cost model (`sliced_axis`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..graph import edit
from ..channels import ChannelMap, Kind, Role
from .registry import ApplyContext, CostContext, Freeze, NodeCost, OpRule, TraceContext, register

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


def operand_channel_axis(shape: Sequence[int], channel_axis: int, rank: int) -> int | None:
    """The operand's own axis under output channel axis `channel_axis` (rank `rank`), if it has a dim > 1 there."""
    own = channel_axis - (rank - len(shape))
    return None if own < 0 or shape[own] == 1 else own


def sliced_axis(shape: Sequence[int], channel_axis: int, rank: int, size: int) -> int | None:
    """The axis along which a constant operand is sliced: its channel axis, holding all `size` channels."""
    own = operand_channel_axis(shape, channel_axis, rank)
    return own if own is not None and shape[own] == size else None


class UnaryRule(OpRule):
    """``y = f(x)`` per element: the channels pass; extra operands (Clip's min/max, Dropout's ratio) must be scalars."""

    ops = tuple(sorted(UNARY_OPS))

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        for extra in node.inputs[1:]:
            if extra.name and t.cmap(extra) is not None:
                raise Freeze("a parameter operand carries channels")
            shape = t.shape(extra) if extra.name else ()
            if shape and int(np.prod(shape)) != 1:
                raise Freeze("a parameter operand is not a scalar")
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            raise Freeze("the dropout mask is used")
        t.pass_through(node, x_map)


def trace_broadcast(t: TraceContext, node: gs.Node) -> None:
    """Unite the traced operands position by position; check untraced ones by the constant-operand rule."""
    traced = t.traced_inputs(node)
    if not traced:
        return
    shapes = [t.shape(x) if x.name else None for x in node.inputs]
    if any(s is None for x, s in zip(node.inputs, shapes) if x.name):
        raise Freeze("an operand has an unknown shape")
    ranks = [len(s) if s is not None else 0 for s in shapes]
    rank = max(ranks)
    positions = {rank - ranks[i] + m.axis for i, m in traced}
    if len(positions) != 1:
        raise Freeze("operands carry channels on different axes")
    pos = positions.pop()
    size = max(m.size for _, m in traced)
    lead = traced[0][1]
    for i, m in traced:
        if m.size != size:
            raise Freeze("an operand broadcasts over the channels")
        t.touch(m.atoms, node, Role.ELEMENTWISE)
        if i != traced[0][0]:
            t.unite(lead.atoms, m.atoms)
    traced_ids = {i for i, _ in traced}
    for i, x in enumerate(node.inputs):
        if i in traced_ids or not x.name:
            continue
        shape = shapes[i]
        assert shape is not None
        own_axis = operand_channel_axis(shape, pos, rank)
        if own_axis is None:
            continue
        if shape[own_axis] != size or not isinstance(x, gs.Constant):
            raise Freeze("an untraced operand has a channel dimension")
        t.set_kind(node, Kind.CONST_OPERAND)
    out_map = ChannelMap(pos, lead.atoms)
    for out in node.outputs:
        t.set_map(out, out_map)


def slice_constant_operands(a: ApplyContext, node: gs.Node) -> None:
    """``x' = take(x, keep, axis=a_x)`` for every constant operand holding the output's channels."""
    out = node.outputs[0]
    keep = a.keep(out)
    if keep is None:
        return
    rank = len(a.trace.shapes.get(out.name, ()))
    pos, size = a.axis(out), a.original_size(out)
    for i, x in enumerate(node.inputs):
        value = ir.const_value(x)
        if value is None or not x.name:
            continue
        axis = sliced_axis(value.shape, pos, rank, size)
        if axis is not None:
            edit.set_input_const(node, i, np.take(value, keep, axis=axis))


class BroadcastRule(OpRule):
    """Numpy-broadcasting ops: operands united, constant operands with a channel dim sliced (module docstring)."""

    ops = tuple(sorted(BROADCAST_OPS))

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        trace_broadcast(t, node)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        slice_constant_operands(a, node)

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        """Constant operands sliced on the channel axis: their float entries scale with ``f_out``."""
        out = c.atoms(node.outputs[0]) if node.outputs else None
        if out is None:
            return None
        cmap = c.trace.maps[node.outputs[0].name]
        rank = len(c.trace.shapes.get(node.outputs[0].name, ()))
        total = 0
        for i, x in enumerate(node.inputs):
            value = ir.const_value(x)
            # first_use marks the tensor counted even when it is not sliced here, as it is counted once overall
            if value is None or not x.name or not np.issubdtype(value.dtype, np.floating) or not c.first_use(node, i):
                continue
            if sliced_axis(value.shape, cmap.axis, rank, cmap.size) is not None:
                total += int(value.size)
        return NodeCost(None, out, 0, 0, total) if total else None


register(UnaryRule())
register(BroadcastRule())
