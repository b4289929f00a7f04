"""Weighted ops with a constant weight: Conv, ConvTranspose, Gemm, MatMul.

Each is a *source* (its output channels are a new space of prunable atoms) and a *consumer*
(its input channels follow the producer's). With ``keep_in`` / ``keep_out`` the kept input and
output positions, the rewrite is

* Conv ``W[keep_out][:, keep_in]``, bias ``b[keep_out]``; grouped: per group, its own kept
  inputs; depthwise (``C_in/g = 1``): ``W[keep_out]`` and ``group = |keep_in|``;
* ConvTranspose ``W[keep_in][:, keep_out]``; Gemm ``W[keep_out][:, keep_in]`` (transB) or
  ``W[keep_in][:, keep_out]``; MatMul ``W[keep_in][:, keep_out]`` on ``(K, N)``.

Affine form (for the least-squares refit and Neuron Merging), ``Y = X W + b`` on rows: a Conv with
group 1 ``W = reshape(weight, [C_out, -1])^T`` on im2col rows (``C_in * k`` columns); Gemm ``W = alpha *
weight`` (transposed with transB), ``b = beta * C``; MatMul ``W = weight`` and ``b`` the constant operand of
a following per-output Add. Writing back inverts these (a missing bias input is added).

Cost: ``M f_in f_out`` MACs and ``|W| f_in f_out + |b| f_out`` parameters (depthwise:
``M f_out``). MACs: ``|W| * prod(spatial) * N`` for a Conv (spatial of the output;
ConvTranspose: of the input), ``prod(out) * K`` for Gemm / MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..graph import edit, qdq
from ..channels import ChannelMap, Kind, Role
from ..errors import ModelError
from . import attention
from .quant import constant_reason, not_constant
from .registry import (
    Affine, ApplyContext, CostContext, Freeze, NodeCost, OpRule, ShapeOf, TraceContext, float_size, register,
)

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: the attributes that change which weight entries a channel indexes (strides, pads and dilations do not)
CHANNEL_ATTRS = {"Conv": ("group",), "ConvTranspose": ("group",), "Gemm": ("transA", "transB")}


def take2(weight: np.ndarray, keep0: np.ndarray | None, keep1: np.ndarray | None) -> np.ndarray:
    """`weight` kept at `keep0` on axis 0 and `keep1` on axis 1 (None: all): ``weight[np.ix_(keep0, keep1)]``.

    Both at once makes no intermediate array: slicing a large dense weight holds only it and its
    result, never a third, partly sliced, copy. Gathered row by row (a contiguous `np.take` per
    kept row): numpy's two-array fancy indexing walks every element's index, 14x slower (VGG-16's
    first classifier layer, 4096x25088 to 2048x12544: 1.2 s against 0.08 s), for the same values.
    """
    if keep0 is None:
        return weight if keep1 is None else np.take(weight, keep1, axis=1)
    if keep1 is None:
        return np.take(weight, keep0, axis=0)
    rows, cols = _indices(keep0, weight.shape[0]), _indices(keep1, weight.shape[1])
    out = np.empty((rows.size, cols.size, *weight.shape[2:]), dtype=weight.dtype)
    for i, row in enumerate(rows):
        np.take(weight[row], cols, axis=0, out=out[i])
    return out


def _indices(keep: np.ndarray, size: int) -> np.ndarray:
    """`keep` as integer indices (a boolean mask of `size` as the positions it marks)."""
    keep = np.asarray(keep)
    return np.flatnonzero(keep) if keep.dtype == bool and keep.size == size else keep.astype(np.intp, copy=False)


def slice_bias(a: ApplyContext, node: gs.Node, out_keep: np.ndarray | None, axis: int) -> None:
    """``b' = b[keep_out]`` when the bias holds one entry per output channel."""
    if out_keep is None or not ir.has_input(node, 2):
        return
    bias = ir.input_const(node, 2)
    assert bias is not None
    size = a.original_size(node.outputs[0])
    if bias.ndim and bias.shape[axis] == size and size > 1:
        edit.set_input_const(node, 2, np.take(bias, out_keep, axis=axis))


def slice_weight_and_bias(a: ApplyContext, node: gs.Node, in_axis: int) -> None:
    """A dense 2-D-indexed weight: its input channels on `in_axis` (0 or 1), its outputs on the other."""
    in_keep, out_keep = a.keep(node.inputs[0]), a.keep(node.outputs[0])
    weight = ir.input_const(node, 1)
    assert weight is not None
    keep0, keep1 = (in_keep, out_keep) if in_axis == 0 else (out_keep, in_keep)
    w = take2(weight, keep0, keep1)
    if w is not weight:
        edit.set_input_const(node, 1, w)
    slice_bias(a, node, out_keep, -1)


def weighted_cost(c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost:
    out = c.atoms(node.outputs[0]) if node.outputs else None
    weight = ir.input_const(node, 1) if c.first_use(node, 1) else None
    bias = ir.input_const(node, 2) if ir.has_input(node, 2) and c.first_use(node, 2) else None
    bias_size = float_size(bias)
    per_out = bias_size if bias is not None and bias.ndim and out is not None and bias.shape[-1] == out.size else 0
    fixed = bias_size - per_out
    in_atoms = None if kind == Kind.DEPTHWISE else c.atoms(node.inputs[0])
    return NodeCost(in_atoms, out, int(c.trace.node_macs.get(node.name, 0)), float_size(weight) + fixed, per_out)


def _set_or_add_bias(node: gs.Node, index: int, values: np.ndarray, dtype: np.dtype) -> None:
    if ir.has_input(node, index):
        edit.set_input_const(node, index, values)
        return
    edit.append_input(node, edit.make_constant(f"{node.inputs[1].name}__bias", np.asarray(values, dtype=dtype)), index)


def _weight64(node: gs.Node) -> np.ndarray:
    weight = ir.input_const(node, 1)
    if weight is None:
        raise ModelError(f"{node.name}: weight is not a constant")
    return np.asarray(weight, dtype=np.float64)


def _matmul_bias(node: gs.Node, n_out: int) -> tuple[gs.Node, int] | None:
    """The Add right after a MatMul whose constant operand is a per-output bias."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    for index, t in enumerate(add.inputs):
        value = ir.const_value(t)
        if t is not y and value is not None and value.size == n_out and value.shape[-1] == n_out:
            return add, index
    return None


class WeightedRule(OpRule):
    """Shared by the four: the cost model and a guard on MACs over odd shapes."""

    kinds: frozenset[Kind] = frozenset()

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        return weighted_cost(c, node, kind) if kind in self.kinds else None

    def macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        try:
            return self.count_macs(node, shape_of)
        except (IndexError, TypeError, ValueError):
            return 0

    def count_macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        return 0


class _ConvMacs(WeightedRule):
    def count_macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        """``|W| * prod(spatial) * N``, spatial of the output (Conv) or of the input (ConvTranspose)."""
        weight = shape_of(node.inputs[1])
        spatial = shape_of(node.outputs[0] if node.op == "Conv" else node.inputs[0])
        if weight is None or spatial is None:
            return 0
        return int(np.prod(weight, dtype=np.int64) * np.prod(spatial[2:], dtype=np.int64) * spatial[0])


class _DenseMacs(WeightedRule):
    def count_macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        """``prod(out) * K``, K the reduced dim of the first operand."""
        a, out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
        if a is None or out is None:
            return 0
        k = a[0] if node.op == "Gemm" and int(node.attrs.get("transA", 0)) else a[-1]
        return int(np.prod(out, dtype=np.int64) * k)


class ConvRule(_ConvMacs):
    """Conv of any `group`: plain (group 1), depthwise (``C_in/g = 1``, output j reads input ``j // m``) or grouped."""

    ops = ("Conv",)
    kinds = frozenset({Kind.CONV, Kind.DEPTHWISE, Kind.GROUPED})

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        x_map = t.cmap(node.inputs[0])
        if weight is None:
            return not_constant(t, node, "weight is not a constant")
        if ir.has_input(node, 2) and ir.input_const(node, 2) is None:
            raise Freeze(constant_reason(node.inputs[2], "bias is not a constant"))
        if x_map is not None and x_map.axis != 1:
            raise Freeze("input channels are not on axis 1")
        group = int(ir.attr(node, "group", 1))
        cout, cin_per_group = int(weight.shape[0]), int(weight.shape[1])
        cin = cin_per_group * group
        out = node.outputs[0]
        if group == 1:
            t.set_kind(node, Kind.CONV)
            if x_map is not None:
                t.touch(x_map.atoms, node, Role.IN)
            t.new_source(node, out, 1, cout, 0)
        elif cin_per_group == 1 and cout % group == 0:
            t.set_kind(node, Kind.DEPTHWISE)
            multiplier = cout // group
            if x_map is None:
                _, atoms = t.new_space(cout, f"{node.op} {node.name}: depthwise conv on an untraced input")
                t.set_map(out, ChannelMap(1, atoms))
                return
            t.touch(x_map.atoms, node, Role.DEPTHWISE)
            t.set_map(out, ChannelMap(1, np.repeat(x_map.atoms, multiplier)))
        else:
            t.set_kind(node, Kind.GROUPED)
            if x_map is not None:
                if x_map.size != cin:
                    raise Freeze("input channel count does not match the weight")
                t.touch(x_map.atoms, node, Role.IN)
                t.add_block(x_map.atoms, group)
            _, atoms = t.new_source(node, out, 1, cout, 0)
            t.add_block(atoms, group)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind not in self.kinds:
            return
        x, y = node.inputs[0], node.outputs[0]
        in_keep, out_keep = a.keep(x), a.keep(y)
        weight = ir.input_const(node, 1)
        assert weight is not None
        if kind == Kind.DEPTHWISE:
            if out_keep is not None:
                edit.set_input_const(node, 1, weight[out_keep])
            if in_keep is not None:
                edit.set_attr(node, "group", int(in_keep.size))
        elif kind == Kind.GROUPED:
            edit.set_input_const(node, 1, _grouped_weight(node, weight, in_keep, out_keep))
        else:
            edit.set_input_const(node, 1, take2(weight, out_keep, in_keep))
        slice_bias(a, node, out_keep, 0)

    def backprop(self, node: gs.Node, out: np.ndarray) -> np.ndarray | None:
        """``s_in = |A_g|^T s_out`` per group g, with ``A = sum_k |W|`` over the kernel ``[C_out, C_in/g]``."""
        w = _abs_weight(node)
        if w is None:
            return None
        a = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
        group = int(ir.attr(node, "group", 1))
        cout, per_in = a.shape
        per_out = cout // group
        result = np.zeros(per_in * group)
        for g in range(group):
            rows = slice(g * per_out, (g + 1) * per_out)
            result[g * per_in : (g + 1) * per_in] += a[rows].T @ out[rows]
        return result

    def read_affine(self, node: gs.Node, kind: Kind | None) -> Affine | None:
        """``W = reshape(weight, [C_out, C_in * k])^T``, ``b`` the bias (zeros when absent); group 1 only."""
        if kind != Kind.CONV:
            return None
        w = _weight64(node)
        matrix = w.reshape(w.shape[0], -1).T
        bias = ir.input_const(node, 2) if ir.has_input(node, 2) else None
        b = np.zeros(matrix.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        return Affine(matrix, b, (node.name, 2))

    def write_affine(self, node: gs.Node, kind: Kind | None, w: np.ndarray, b: np.ndarray | None) -> None:
        weight = ir.input_const(node, 1)
        assert weight is not None
        edit.set_input_const(node, 1, w.T.reshape((w.shape[1], *weight.shape[1:])))
        if b is not None:
            _set_or_add_bias(node, 2, b, weight.dtype)

    def weight_in_axis(self, node: gs.Node, kind: Kind | None) -> int:
        return 1


def _abs_weight(node: gs.Node) -> np.ndarray | None:
    weight = ir.input_const(node, 1)
    return None if weight is None else np.abs(np.asarray(weight, dtype=np.float64))


def _grouped_weight(node: gs.Node, weight: np.ndarray, in_keep: np.ndarray | None, out_keep: np.ndarray | None) -> np.ndarray:
    """Row o of the kept weight holds the kept inputs of o's own group, renumbered within the group."""
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


class ConvTransposeRule(_ConvMacs):
    """ConvTranspose with group 1: weight ``[C_in, C_out, k...]``."""

    ops = ("ConvTranspose",)
    kinds = frozenset({Kind.CONV_TRANSPOSE})

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        x_map = t.cmap(node.inputs[0])
        if weight is None:
            return not_constant(t, node, "weight is not a constant")
        if int(ir.attr(node, "group", 1)) != 1:
            raise Freeze("grouped ConvTranspose")
        if ir.has_input(node, 2) and ir.input_const(node, 2) is None:
            raise Freeze(constant_reason(node.inputs[2], "bias is not a constant"))
        if x_map is not None:
            if x_map.axis != 1:
                raise Freeze("input channels are not on axis 1")
            t.touch(x_map.atoms, node, Role.IN)
        t.set_kind(node, Kind.CONV_TRANSPOSE)
        t.new_source(node, node.outputs[0], 1, int(weight.shape[1]), 1)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind in self.kinds:
            slice_weight_and_bias(a, node, in_axis=0)

    def backprop(self, node: gs.Node, out: np.ndarray) -> np.ndarray | None:
        """``s_in = A s_out`` with ``A = sum_k |W|`` over the kernel ``[C_in, C_out]``."""
        w = _abs_weight(node)
        return None if w is None else w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) @ out


class GemmRule(_DenseMacs):
    """Gemm with transA 0: weight ``[K, N]``, or ``[N, K]`` with transB."""

    ops = ("Gemm",)
    kinds = frozenset({Kind.GEMM})

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        if weight is None:
            return not_constant(t, node, "weight is not a constant")
        if int(ir.attr(node, "transA", 0)):
            raise Freeze("transA=1")
        if ir.has_input(node, 2):
            bias = ir.input_const(node, 2)
            if bias is None:
                raise Freeze(constant_reason(node.inputs[2], "bias is not a constant"))
        x_map = t.cmap(node.inputs[0])
        if x_map is not None:
            if x_map.axis != 1:
                raise Freeze("input features are not on axis 1")
            t.touch(x_map.atoms, node, Role.IN)
        trans_b = int(ir.attr(node, "transB", 0))
        n_out = int(weight.shape[0] if trans_b else weight.shape[1])
        t.set_kind(node, Kind.GEMM)
        t.new_source(node, node.outputs[0], 1, n_out, 0 if trans_b else 1)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind in self.kinds:
            slice_weight_and_bias(a, node, in_axis=1 if int(ir.attr(node, "transB", 0)) else 0)

    def backprop(self, node: gs.Node, out: np.ndarray) -> np.ndarray | None:
        """``s_in = |W_[K,N]| s_out``."""
        w = _abs_weight(node)
        if w is None:
            return None
        return (w.T if int(ir.attr(node, "transB", 0)) else w) @ out

    def read_affine(self, node: gs.Node, kind: Kind | None) -> Affine | None:
        """``W = alpha * weight`` (``weight^T`` with transB), ``b = beta * C``; no ``b`` when C is not per output."""
        if kind != Kind.GEMM:
            return None
        w = _weight64(node)
        alpha, beta = float(ir.attr(node, "alpha", 1.0)), float(ir.attr(node, "beta", 1.0))
        matrix = alpha * (w.T if int(ir.attr(node, "transB", 0)) else w)
        n_out = matrix.shape[1]
        if not ir.has_input(node, 2):
            return Affine(matrix, np.zeros(n_out), (node.name, 2))
        c = ir.input_const(node, 2)
        if c is None or c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
            return Affine(matrix, None, None)
        return Affine(matrix, beta * np.broadcast_to(np.asarray(c, dtype=np.float64).reshape(-1), (n_out,)), (node.name, 2))

    def write_affine(self, node: gs.Node, kind: Kind | None, w: np.ndarray, b: np.ndarray | None) -> None:
        weight = ir.input_const(node, 1)
        assert weight is not None
        alpha, beta = float(ir.attr(node, "alpha", 1.0)), float(ir.attr(node, "beta", 1.0))
        matrix = w / alpha
        edit.set_input_const(node, 1, matrix.T if int(ir.attr(node, "transB", 0)) else matrix)
        if b is None:
            return
        if not ir.has_input(node, 2) or beta == 0.0:
            edit.set_attr(node, "beta", 1.0)
            beta = 1.0
        old = ir.input_const(node, 2) if ir.has_input(node, 2) else None
        value = b / beta
        if old is not None and old.size == b.size:
            value = value.reshape(old.shape)
        _set_or_add_bias(node, 2, value, weight.dtype)

    def weight_in_axis(self, node: gs.Node, kind: Kind | None) -> int:
        return 1 if int(ir.attr(node, "transB", 0)) else 0


class MatMulRule(_DenseMacs):
    """MatMul by a constant 2-D weight ``[K, N]``: features on the last axis."""

    ops = ("MatMul",)
    kinds = frozenset({Kind.MATMUL})

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        weight = ir.input_const(node, 1)
        a_shape = t.shape(node.inputs[0])
        unfolded = qdq.unfolded_reason(node.inputs[1]) is not None  # a quantized weight that could not be folded
        if weight is None and not unfolded and ir.const_value(node.inputs[0]) is None:
            attention.trace_activation_matmul(t, node)  # between two activations (attention scores, context)
            return
        if weight is None:
            return not_constant(t, node, "second operand is not a constant 2-D weight", features_last=True)
        if weight.ndim != 2 or a_shape is None:
            raise Freeze("second operand is not a constant 2-D weight")
        x_map = t.cmap(node.inputs[0])
        if x_map is not None:
            if x_map.axis != len(a_shape) - 1:
                raise Freeze("features are not on the last axis")
            t.touch(x_map.atoms, node, Role.IN)
        t.set_kind(node, Kind.MATMUL)
        t.new_source(node, node.outputs[0], len(a_shape) - 1, int(weight.shape[1]), 1)

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind in self.kinds:
            slice_weight_and_bias(a, node, in_axis=0)

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        if kind == Kind.BATCH_MATMUL:
            return attention.batch_matmul_cost(c, node)
        return super().cost(c, node, kind)

    def backprop(self, node: gs.Node, out: np.ndarray) -> np.ndarray | None:
        """``s_in = |W_[K,N]| s_out``."""
        w = _abs_weight(node)
        return None if w is None else w @ out

    def read_affine(self, node: gs.Node, kind: Kind | None) -> Affine | None:
        """``W = weight [K, N]``, ``b`` the constant operand of a following per-output Add (else no ``b``)."""
        if kind != Kind.MATMUL:
            return None
        w = _weight64(node)
        found = _matmul_bias(node, w.shape[1])
        if found is None:
            return Affine(w, None, None)
        add, index = found
        bias = ir.input_const(add, index)
        assert bias is not None
        return Affine(w, np.asarray(bias, dtype=np.float64).reshape(-1), (add.name, index))

    def write_affine(self, node: gs.Node, kind: Kind | None, w: np.ndarray, b: np.ndarray | None) -> None:
        edit.set_input_const(node, 1, w)
        if b is None:
            return
        found = _matmul_bias(node, w.shape[1])
        if found is None:
            raise ModelError(f"{node.name}: the bias Add disappeared")
        add, index = found
        old = ir.input_const(add, index)
        assert old is not None
        edit.set_input_const(add, index, b.reshape(old.shape))


register(ConvRule())
register(ConvTransposeRule())
register(GemmRule())
register(MatMulRule())
