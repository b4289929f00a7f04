"""Quantized models: activation QuantizeLinear / DequantizeLinear, and the QOperator forms.

Weights reached through a DequantizeLinear are folded to float constants on load and
re-quantized on every write and on export (`graph.qdq`), so Conv / Gemm / MatMul see plain
weights. What is left here are the ops on activations:

* ``QuantizeLinear`` / ``DequantizeLinear`` of a traced tensor, ``y_c = f(x_c; s_c, z_c)``: channel
  c of y is channel c of x. Per tensor (one scale) the channels pass unchanged; per channel
  (``axis`` on the channel axis, one scale per channel) they pass and the scale and zero point
  are sliced to the kept channels, ``s' = s[keep]``, ``z' = z[keep]``. A scale or zero point that
  is not a constant, a per-channel axis that is not the channel axis, or block quantization
  (``block_size``) freezes the channels with that reason.
* QOperator forms (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, and onnxruntime's
  QGemm, QLinearAdd, ...): not pruned. Their traced inputs freeze with the reason, and an output
  they make from an untraced input is a frozen space with the reason, so the report names it.

Validation tolerances by element type (`output_tolerance`): float32 ``rtol = atol = 1e-5``,
float16 ``1e-2`` (2^-10 relative precision, a few roundings deep), bfloat16 ``5e-2`` (2^-7), and
a quantized output one quantization step (its scale) on top of float32's.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import ChannelMap, Role
from ..graph import edit, qdq
from .registry import ApplyContext, CostContext, Freeze, NodeCost, OpRule, TraceContext, float_size, register

#: QOperator ops, the input holding their weight (None: no weight) and whether it is a matmul (features last)
QOPERATOR_OPS: dict[str, tuple[int | None, bool]] = {
    "QLinearConv": (3, False), "ConvInteger": (1, False), "QLinearMatMul": (3, True), "MatMulInteger": (1, True),
}
MS_QOPERATOR_OPS: dict[str, tuple[int | None, bool]] = {
    "QGemm": (3, True), "QLinearAdd": (None, False), "QLinearMul": (None, False), "QLinearConcat": (None, False),
    "QLinearSigmoid": (None, False), "QLinearLeakyRelu": (None, False), "QLinearGlobalAveragePool": (None, False),
    "QLinearAveragePool": (None, False), "DynamicQuantizeMatMul": (1, True), "MatMulIntegerToFloat": (1, True),
    "QAttention": (None, False), "DynamicQuantizeLSTM": (None, False),
}
QOPERATOR_REASON = ("{op} (a QOperator form) is not pruned: quantize with QuantFormat.QDQ, or prune the float "
                    "model and quantize it afterwards")

#: (rtol, atol) of output comparisons by element type
TOLERANCES = {np.dtype(np.float32): (1e-5, 1e-5), np.dtype(np.float64): (1e-7, 1e-7), np.dtype(np.float16): (1e-2, 1e-2)}
BF16_TOLERANCE = (5e-2, 5e-2)


def output_tolerance(dtype: np.dtype, step: float = 0.0) -> tuple[float, float]:
    """(rtol, atol) for comparing two models' outputs of `dtype`; `step`: the output's quantization step, if any."""
    rtol, atol = TOLERANCES.get(np.dtype(dtype), BF16_TOLERANCE if "bfloat16" in str(dtype) else (1e-5, 1e-5))
    return rtol, atol + step


def through_activation_qdq(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor a per-tensor activation pair ``DequantizeLinear(QuantizeLinear(x))`` reads (`tensor` itself if none).

    ``quantize_static`` puts such a pair on every activation, also on a class token's Expand: the pair
    only rounds values and keeps the shape, so a rule looking for the token's constant looks through it.
    """
    dq = _per_tensor_producer(tensor, "DequantizeLinear")
    q = None if dq is None else _per_tensor_producer(dq.inputs[0], "QuantizeLinear")
    return tensor if q is None else q.inputs[0]


def _per_tensor_producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    producers = tensor.inputs if isinstance(tensor, gs.Variable) else []
    if len(producers) != 1 or producers[0].op != op:
        return None
    node = producers[0]
    scale = ir.input_const(node, 1)
    if scale is None or scale.size != 1 or (ir.has_input(node, 2) and ir.input_const(node, 2) is None):
        return None
    return node


def constant_reason(tensor: gs.Tensor, fallback: str) -> str:
    """Why `tensor` (a weight or bias input) is not a constant: a quantized one says why it was not folded."""
    return qdq.unfolded_reason(tensor) or fallback


def not_constant(t: TraceContext, node: gs.Node, fallback: str, features_last: bool = False) -> None:
    """A weighted op whose weight (input 1) is not a constant: raises `Freeze` with the reason.

    An unfolded quantized weight on an untraced input (a first layer) has no traced channels to
    freeze: its output becomes a frozen space with the reason instead, so the report names it.
    """
    weight = node.inputs[1]
    reason = constant_reason(weight, fallback)
    shape = t.shape(node.outputs[0]) if node.outputs else None
    if t.traced_inputs(node) or qdq.unfolded_reason(weight) is None or not shape:
        raise Freeze(reason)
    axis = len(shape) - 1 if features_last else 1
    _, atoms = t.new_space(int(shape[axis]), f"{node.op} {node.name}: {reason}")
    t.touch(atoms, node, Role.FROZEN)
    t.set_map(node.outputs[0], ChannelMap(axis, atoms))


class QuantizeLinearRule(OpRule):
    """``y = Q(x)`` / ``y = DQ(x)`` of an activation: channel c of y is channel c of x (per-channel scales sliced)."""

    ops = ("QuantizeLinear", "DequantizeLinear")

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        for i in (1, 2):
            if ir.has_input(node, i) and t.cmap(node.inputs[i]) is not None:
                raise Freeze("a scale or zero point carries channels")
        scale = ir.input_const(node, 1)
        if scale is None or (ir.has_input(node, 2) and ir.input_const(node, 2) is None):
            raise Freeze("the scale or zero point is not a constant")
        if int(ir.attr(node, "block_size", 0) or 0):
            raise Freeze("blocked quantization of an activation")
        if scale.size > 1:
            shape = t.shape(node.inputs[0])
            if shape is None:
                raise Freeze("unknown rank")
            axis = int(ir.attr(node, "axis", 1)) % len(shape)
            if axis != x_map.axis or scale.ndim != 1 or scale.size != x_map.size:
                raise Freeze("per-channel quantization on an axis other than the channels")
        t.pass_through(node, x_map)

    def apply(self, a: ApplyContext, node: gs.Node, kind: object) -> None:
        scale = ir.input_const(node, 1)
        if scale is None or scale.size == 1 or node.inputs[0].name not in a.trace.maps:
            return
        keep = a.keep(node.inputs[0])
        if keep is None:
            return
        for i in (1, 2):
            value = ir.input_const(node, i) if ir.has_input(node, i) else None
            if value is not None and value.size == scale.size:
                edit.set_input_const(node, i, value[keep])

    def cost(self, c: CostContext, node: gs.Node, kind: object) -> NodeCost | None:
        scale = ir.input_const(node, 1)
        atoms = c.atoms(node.inputs[0])
        if scale is None or scale.size == 1 or atoms is None or not c.first_use(node, 1):
            return None
        return NodeCost(None, atoms, 0, 0, float_size(scale))


class QOperatorRule(OpRule):
    """A QOperator op: not pruned (its traced inputs freeze; an output from untraced inputs is a frozen space)."""

    def __init__(self, table: dict[str, tuple[int | None, bool]], domain: str = "") -> None:
        self.table = table
        self.ops = tuple(sorted(table))
        self.domain = domain

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        reason = QOPERATOR_REASON.format(op=node.op)
        if t.traced_inputs(node):
            raise Freeze(reason)
        index, features_last = self.table.get(node.op, (None, False))
        weight = ir.input_const(node, index) if index is not None else None
        if weight is None or weight.ndim < 2 or not node.outputs:
            return
        out = node.outputs[0]
        shape = t.shape(out)
        if features_last:
            if shape is None:
                return
            axis, n = len(shape) - 1, int(weight.shape[-1])
        else:
            axis, n = 1, int(weight.shape[0])
        _, atoms = t.new_space(n, f"{node.op} {node.name}: {reason}")
        t.touch(atoms, node, Role.FROZEN)
        t.set_map(out, ChannelMap(axis, atoms))


register(QuantizeLinearRule())
register(QOperatorRule(QOPERATOR_OPS))
register(QOperatorRule(MS_QOPERATOR_OPS, "com.microsoft"))
