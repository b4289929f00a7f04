"""Unfused multi-head attention as exporters write it: head splits, MatMuls between activations, Gather, Expand.

A transformer block's attention, in ONNX::

    q = Reshape(x @ Wq + bq, [B, N, H, D]) -> Transpose -> [B, H, N, D]       (k, v alike)
    s = Softmax(q @ Transpose(k) * scale + mask)                                [B, H, N, N]
    o = Reshape(Transpose(s @ v), [B, N, H * D]) @ Wo + bo

or with one fused projection, ``Reshape(x @ Wqkv, [B, N, 3, H, D])``, a Transpose and a
``Gather(axis 0)`` (or a Split) per part. The channels of ``x @ Wq`` (``C = H * D``) are split
by the Reshape into a head axis and a head-dim axis. Pruning keeps whole heads:

* **head split** (`head_split_map`): a Reshape of a channels-last tensor whose last axes are
  ``[G, ..., H, D]`` with ``G * H * D = C`` unites channel ``g H D + h D + d`` with
  ``h D`` for every ``g, d``: one class per head ``h`` (holding its Q, K and V slices when
  fused), and the output's channels live on the head axis. The Reshape's target at the head
  axis becomes the kept head count (a constant target, or the constant entry of a Concat that
  builds it at run time, `target_entry`);
* **MatMul between activations** (`trace_activation_matmul`): ``A [..., M, K] @ B [..., K, N]``.
  Channels on a batch axis (the head axis of ``q @ k^T`` and ``s @ v``) unite the operands'
  classes there and stay on that axis in the output; channels on the contracted axis unite
  the two operands and leave the output untraced; channels on ``M`` of ``A`` (or ``N`` of
  ``B``) with the other operand untraced pass to the output's ``M`` (``N``). Anything else
  freezes. Nothing is sliced here: the head count of the output follows its operands;
* the merge back ``Reshape([B, N, H', D] -> [B, N, H' D])`` is the ordinary block mapping of
  `ops.layout`: each head's atom repeated ``D`` times, so the output projection's input
  rows are sliced to whole heads.

Grouped-query attention repeats each K/V head ``n_rep`` times (``Unsqueeze -> Expand
[B, Hkv, n_rep, N, D] -> Reshape [B, Hkv n_rep, N, D]``): `ExpandRule` passes channels on an
axis it does not broadcast (its shape entry there is recounted) and the Reshape is a block
mapping, so ``q @ k^T`` unites each K/V head with its ``n_rep`` query heads: a GQA group is
pruned whole. Rotary embeddings (Slice / Neg / Concat of the halves of ``D``, Mul with cos /
sin) act on the head-dim axis, which carries no channels: they pass.

Exact: removing a head whose V slice (or output-projection rows) is zero changes nothing,
since its output is zero and the softmax of the other heads does not read it.

Hidden size (the residual stream). Its channels are created by the embedding tables
(`GatherRule`: ``E[:, keep]``) or a patch Conv, carried by every residual Add, sliced in
position embeddings and class tokens (constants, or an Expand of one, concatenated on the
token axis: `constant_like`), and read by every projection after a normalisation. A
LayerNormalization (`ops.norm.LayerNormRule`) or a decomposed one (a ReduceMean over the
channel axis, `ops.reduce`) then normalises over the *kept* channels only, with ``gamma``
and ``beta`` sliced (Torch-Pruning's rule). This is approximate, never exact: with kept
channels ``K`` the statistics become ``mean_K(x)`` and ``var_K(x)`` instead of the means over
all ``C``. Even a removed channel that is identically zero changes them (``mean_K = (C/|K|)
mean_C``), so there is no zero-weight oracle for the hidden size; the alternative rule, the
statistics over all ``C`` with removed channels counted as zeros (exact for zero channels,
two extra nodes per LayerNorm), measured worse on the Fashion-MNIST ViT (l1 at 0.5: 15.9%
against 18.8% top-1), so it is not used. RMSNorm (no mean) is exact under the kept-only rule
only up to the factor ``sqrt(C/|K|)`` on zero channels. The calibrated refit (`ldrf`, `--calib`)
fits each consumer on the pruned model's own normalised activations, which absorbs most of it.

Shape reads: a Gather of the channel count from a Shape that only builds Reshape / Expand
targets is pinned to the original count (`ops.layout.ShapeRule.apply`; those targets are
recounted by their own rules), and ``Reshape(x, Concat(Slice(Shape(x)), ...))`` (``flatten``)
reads its own kept count at run time (`reads_own_dim`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import ChannelMap, Kind, Role, Shape
from ..graph import edit
from .quant import through_activation_qdq
from .registry import ApplyContext, CostContext, Freeze, NodeCost, OpRule, TraceContext, register


def head_split_map(in_shape: Shape, out_shape: Shape, cmap: ChannelMap) -> tuple[ChannelMap, list[np.ndarray]] | None:
    """A Reshape splitting the last (channel) axis into trailing ``[G..., H, D]``: the map on H and the atoms to unite.

    Returns the output map (axis of H, one representative atom per head) and, per head, the
    atoms of its ``G * D`` channels (united into one class by the caller); None when the
    reshape is no such split.
    """
    c = cmap.axis
    rank_in, rank_out = len(in_shape), len(out_shape)
    if c != rank_in - 1 or in_shape[c] != cmap.size or rank_out < 2:
        return None
    lead = int(np.prod(in_shape[:c], dtype=np.int64))
    size = cmap.size
    # the trailing output axes whose product is the channel count, the leading ones the rest
    for first in range(rank_out - 2, -1, -1):
        if int(np.prod(out_shape[first:], dtype=np.int64)) != size:
            continue
        if int(np.prod(out_shape[:first], dtype=np.int64)) != lead:
            return None
        heads, dim = int(out_shape[-2]), int(out_shape[-1])
        if heads < 2 or dim < 1:
            return None
        head_of = (np.arange(size) // dim) % heads
        members = [cmap.atoms[head_of == h] for h in range(heads)]
        return ChannelMap(rank_out - 2, np.array([m[0] for m in members], dtype=np.int64)), members
    return None


def target_entry(node: gs.Node, axis: int) -> tuple[gs.Node, int] | None:
    """The Concat that builds a Reshape / Expand shape at run time, and its input holding entry `axis`.

    Every Concat input must be one-element (a constant or an unsqueezed scalar) so that input
    ``i`` is entry ``i``; None otherwise. torch's ``expand`` wraps the Concat in
    ``Where(Equal(s, -1), ones, s)`` over ``Reshape(s, [-1])``: looked through (a kept count is never -1).
    """
    concat = _producer(_through_expand_defaults(node.inputs[1]), "Concat")
    if concat is None:
        return None
    entries = []
    for x in concat.inputs:
        value = ir.const_value(x)
        if value is not None:
            if value.size != 1:
                return None
        elif not _one_element(x):
            return None
        entries.append(x)
    if axis >= len(entries):
        return None
    return concat, axis


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    producers = tensor.inputs if isinstance(tensor, gs.Variable) else []
    return producers[0] if len(producers) == 1 and producers[0].op == op else None


def _through_expand_defaults(shape: gs.Tensor) -> gs.Tensor:
    """The 1-D shape under ``Where(Equal(s, c), const, s)`` and ``Reshape(s, [-1])`` (as torch exports ``expand``)."""
    where = _producer(shape, "Where")
    if where is not None:
        equal = _producer(where.inputs[0], "Equal")
        s = where.inputs[2]
        if equal is None or ir.const_value(where.inputs[1]) is None or equal.inputs[0] is not s \
                or ir.const_value(equal.inputs[1]) is None:
            return shape
        shape = s
    flat = _producer(shape, "Reshape")
    while flat is not None and _flat(flat):
        shape = flat.inputs[0]
        flat = _producer(shape, "Reshape")
    return shape


def _one_element(tensor: gs.Tensor) -> bool:
    """An Unsqueeze of a scalar (shape arithmetic as exporters write it), or a 1-element Cast of one."""
    producers = tensor.inputs if isinstance(tensor, gs.Variable) else []
    if len(producers) != 1:
        return False
    node = producers[0]
    if node.op == "Cast":
        return _one_element(node.inputs[0])
    if node.op == "Unsqueeze":
        return _scalar(node.inputs[0])
    return False


def _scalar(tensor: gs.Tensor) -> bool:
    """A 0-d tensor: a constant, a known 0-d shape, or a Gather of one entry of a 1-D tensor (a dim of a Shape)."""
    value = ir.const_value(tensor)
    if value is not None:
        return value.ndim == 0
    if tensor.shape is not None:
        return len(tensor.shape) == 0
    producers = tensor.inputs
    if len(producers) == 1 and producers[0].op == "Identity":
        return _scalar(producers[0].inputs[0])
    if len(producers) == 1 and producers[0].op == "Gather":
        index = ir.const_value(producers[0].inputs[1])
        return index is not None and index.ndim == 0
    return False


def reads_own_dim(node: gs.Node, axis: int) -> bool:
    """Entry `axis` of the Reshape's target is read at run time from its own input's dim `axis` (``x.flatten(2)``).

    The target is ``Concat(..., Slice(Shape(x)) or Shape(x), ...)`` with `x` the Reshape's data input and the
    piece covering `axis` taking dim `axis` of `x`: after pruning it reads the kept count by itself.
    """
    shape = node.inputs[1]
    producers = shape.inputs if isinstance(shape, gs.Variable) else []
    if len(producers) != 1 or producers[0].op != "Concat":
        return False
    offset = 0
    for piece in producers[0].inputs:
        value = ir.const_value(piece)
        if value is not None:
            offset += int(value.size)
            continue
        span = _shape_piece(piece, node.inputs[0])
        if span is None:
            if not _one_element(piece) or axis == offset:
                return False
            offset += 1
            continue
        start, stop = span
        if offset <= axis < offset + stop - start:
            return start + axis - offset == axis
        offset += stop - start
    return False


def feeds_own_reshape(consumer: gs.Node, x: gs.Tensor, axis: int) -> bool:
    """A Slice of ``Shape(x)`` whose output only builds Reshape targets of `x` reading dim `axis` of `x` there."""
    if consumer.op != "Slice" or _shape_piece(consumer.outputs[0], x) is None:
        return False
    for concat in consumer.outputs[0].outputs:
        if concat.op != "Concat":
            return False
        for reshape in concat.outputs[0].outputs:
            if reshape.op != "Reshape" or reshape.inputs[1] is not concat.outputs[0] or reshape.inputs[0] is not x:
                return False
            if not reads_own_dim(reshape, axis):
                return False
    return True


def _shape_piece(piece: gs.Tensor, x: gs.Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` of the dims of `x` that `piece` holds: ``Shape(x)`` or a constant Slice of it."""
    producers = piece.inputs if isinstance(piece, gs.Variable) else []
    if len(producers) != 1:
        return None
    node = producers[0]
    if node.op == "Shape" and node.inputs[0] is x and "start" not in node.attrs and "end" not in node.attrs:
        rank = len(x.shape) if x.shape is not None else None
        return None if rank is None else (0, rank)
    if node.op != "Slice" or len(node.inputs) < 3:
        return None
    shape_node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if shape_node is None or shape_node.op != "Shape" or shape_node.inputs[0] is not x or shape_node.attrs:
        return None
    bounds = [ir.const_value(node.inputs[i]) if ir.has_input(node, i) else None for i in range(1, 5)]
    if bounds[0] is None or bounds[1] is None or bounds[0].size != 1:
        return None
    if (ir.has_input(node, 3) and (bounds[2] is None or int(bounds[2].ravel()[0]) != 0)) or (
            ir.has_input(node, 4) and (bounds[3] is None or int(bounds[3].ravel()[0]) != 1)):
        return None
    start, stop = int(bounds[0].ravel()[0]), int(bounds[1].ravel()[0])
    return (start, stop) if 0 <= start < stop < 64 else None


def set_target_entry(a: ApplyContext, node: gs.Node, axis: int, value: int) -> None:
    """Entry `axis` of the shape input of `node` becomes `value` (a constant, or the Concat that builds it)."""
    target = ir.input_const(node, 1)
    if target is not None:
        if int(target.ravel()[axis]) in (-1, 0, value):
            return
        new = target.copy()
        new.reshape(-1)[axis] = value
        edit.set_input_const(node, 1, new)
        return
    if reads_own_dim(node, axis):
        return
    found = target_entry(node, axis)
    assert found is not None  # the tracer maps only these
    concat, index = found
    old = ir.const_value(concat.inputs[index])
    if old is not None and int(old.ravel()[0]) in (-1, 0):
        return
    edit.replace_input(concat, index, edit.make_constant(f"{node.name}__shape{axis}", np.array([value], dtype=np.int64)))


def check_target(t: TraceContext, node: gs.Node, axis: int, in_axis: int) -> None:
    """Freeze unless entry `axis` of the node's shape input can be rewritten (constant, or built by a Concat)."""
    target = ir.input_const(node, 1)
    if target is not None:
        values = target.ravel().tolist()
        if axis >= len(values):
            raise Freeze("target shape does not match the inferred shape")
        if values[axis] == 0 and axis != in_axis:
            raise Freeze("a 0 in the target shape copies a channel-dependent dim")
        return
    if target_entry(node, axis) is None and not (axis == in_axis and reads_own_dim(node, axis)):
        raise Freeze("target shape is computed at run time")


def trace_activation_matmul(t: TraceContext, node: gs.Node) -> None:
    """``A @ B`` of two activations (module docstring): batch axes united, the contracted axis united and cut."""
    traced = dict(t.traced_inputs(node))
    if not traced:
        return
    shapes = [t.shape(x) for x in node.inputs[:2]]
    if shapes[0] is None or shapes[1] is None:
        raise Freeze("an operand has an unknown shape")
    ra, rb = len(shapes[0]), len(shapes[1])
    if ra < 2 or rb < 2:
        raise Freeze("a 1-D operand")
    out_rank = max(ra, rb)
    a_map, b_map = traced.get(0), traced.get(1)
    t.set_kind(node, Kind.BATCH_MATMUL)
    # contracted axis: the last of A, the second-last of B
    if a_map is not None and a_map.axis == ra - 1:
        if b_map is None or b_map.axis != rb - 2 or b_map.size != a_map.size:
            raise Freeze("the contracted axis carries channels of one operand only")
        t.touch(a_map.atoms, node, Role.IN)
        t.touch(b_map.atoms, node, Role.IN)
        t.unite(a_map.atoms, b_map.atoms)
        return
    if b_map is not None and b_map.axis == rb - 2:
        raise Freeze("the contracted axis carries channels of one operand only")
    # batch axes, aligned to the output's rank
    a_batch = a_map is not None and a_map.axis < ra - 2
    b_batch = b_map is not None and b_map.axis < rb - 2
    if a_batch or b_batch:
        positions = {out_rank - r + m.axis for r, m, is_batch in ((ra, a_map, a_batch), (rb, b_map, b_batch))
                     if is_batch and m is not None}
        if len(positions) != 1 or (a_map is not None and not a_batch) or (b_map is not None and not b_batch):
            raise Freeze("operands carry channels on different axes")
        pos = positions.pop()
        lead = a_map if a_map is not None else b_map
        assert lead is not None
        for r, m, shape in ((ra, a_map, shapes[0]), (rb, b_map, shapes[1])):
            own = pos - (out_rank - r)
            if m is None:
                if own >= 0 and shape[own] != 1:
                    raise Freeze("an untraced operand has a channel dimension")
                continue
            if m.size != lead.size:
                raise Freeze("an operand broadcasts over the channels")
            t.touch(m.atoms, node, Role.HEADS)
            t.unite(lead.atoms, m.atoms)
        t.set_map(node.outputs[0], ChannelMap(pos, lead.atoms))
        return
    # the free axes: M of A, N of B; the other operand must be untraced
    if a_map is not None and b_map is not None:
        raise Freeze("operands carry channels on different axes")
    if a_map is not None:  # axis ra - 2
        t.touch(a_map.atoms, node, Role.PASS)
        t.set_map(node.outputs[0], ChannelMap(out_rank - 2, a_map.atoms))
    elif b_map is not None:  # axis rb - 1
        t.touch(b_map.atoms, node, Role.PASS)
        t.set_map(node.outputs[0], ChannelMap(out_rank - 1, b_map.atoms))


def batch_matmul_cost(c: CostContext, node: gs.Node) -> NodeCost | None:
    """MACs of ``A @ B`` between activations scale with the kept heads (its output's channels), no parameters."""
    out = c.atoms(node.outputs[0])
    macs = int(c.trace.node_macs.get(node.name, 0))
    if out is None or not macs:
        return None
    return NodeCost(None, out, macs, 0, 0)


class GatherRule(OpRule):
    """Gather: of an activation along a non-channel axis (the fused qkv's parts), or rows of an embedding table.

    * data traced, constant indices on axis ``g`` other than the channel axis ``c``: the channels
      pass, to ``c`` when ``c < g`` and to ``c - 1 + rank(indices)`` when ``c > g``;
    * data a constant table ``[V, C]`` indexed on axis 0 (an embedding): its last axis is a new
      space of ``C`` channels on the output's last axis, and the table is sliced there,
      ``E' = E[:, keep]`` (the hidden size, coupled by the residual Adds).
    """

    ops = ("Gather",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        data, indices = node.inputs[0], node.inputs[1]
        d_map = t.cmap(data)
        if t.cmap(indices) is not None:
            raise Freeze("indices carry channels")
        d_shape = t.shape(data)
        axis = int(ir.attr(node, "axis", 0))
        if d_map is None:
            table = ir.const_value(data)
            out_shape = t.shape(node.outputs[0])
            if (table is not None and table.ndim == 2 and axis % 2 == 0 and np.issubdtype(table.dtype, np.floating)
                    and out_shape is not None and table.shape[1] > 1):
                t.set_kind(node, Kind.EMBEDDING)
                _, atoms = t.new_space(int(table.shape[1]))
                t.touch(atoms, node, Role.OUT)
                t.set_map(node.outputs[0], ChannelMap(len(out_shape) - 1, atoms))
            return
        if d_shape is None:
            raise Freeze("unknown rank")
        axis %= len(d_shape)
        if axis == d_map.axis:
            raise Freeze("gathers along the channel axis")
        index = ir.const_value(indices)
        if index is None:
            raise Freeze("indices are computed at run time")
        out_axis = d_map.axis if d_map.axis < axis else d_map.axis - 1 + index.ndim
        t.pass_through(node, ChannelMap(out_axis, d_map.atoms))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind != Kind.EMBEDDING:
            return
        keep = a.keep(node.outputs[0])
        table = ir.input_const(node, 0)
        if keep is not None and table is not None:
            edit.set_input_const(node, 0, np.take(table, keep, axis=1))

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        if kind != Kind.EMBEDDING or not c.first_use(node, 0):
            return None
        table = ir.input_const(node, 0)
        out = c.atoms(node.outputs[0])
        return None if table is None or out is None else NodeCost(None, out, 0, 0, int(table.size))


class ExpandRule(OpRule):
    """Expand passes channels on an axis it does not broadcast; its shape entry there is recounted on apply."""

    ops = ("Expand",)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if x_map is None:
            return
        if t.cmap(node.inputs[1]) is not None:
            raise Freeze("the shape carries channels")
        in_shape, out_shape = t.shape(node.inputs[0]), t.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            raise Freeze("unknown shape")
        axis = x_map.axis + len(out_shape) - len(in_shape)
        if out_shape[axis] != in_shape[x_map.axis]:
            raise Freeze("broadcasts the channel axis")
        target = ir.input_const(node, 1)
        if target is None and target_entry(node, axis - (len(out_shape) - _target_rank(t, node))) is None:
            raise Freeze("shape is computed at run time")
        t.set_kind(node, Kind.EXPAND)
        t.pass_through(node, ChannelMap(axis, x_map.atoms))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """An entry equal to the channel count becomes the kept count (an entry of 1 keeps the input's dim)."""
        if kind != Kind.EXPAND:
            return
        out = node.outputs[0]
        keep = a.keep(out)
        if keep is None:
            return
        rank = len(a.trace.shapes[out.name])
        shift = rank - _target_rank_of(node, rank)
        axis = a.axis(out) - shift
        if axis < 0:
            return
        target = ir.input_const(node, 1)
        if target is not None and int(target.ravel()[axis]) == 1:
            return
        set_target_entry(a, node, axis, int(keep.size))


def _target_rank(t: TraceContext, node: gs.Node) -> int:
    shape = t.shape(node.inputs[1])
    return int(shape[0]) if shape else 0


def _target_rank_of(node: gs.Node, rank: int) -> int:
    target = ir.input_const(node, 1)
    if target is not None:
        return int(target.size)
    found = node.inputs[1].inputs[0] if isinstance(node.inputs[1], gs.Variable) and node.inputs[1].inputs else None
    return len(found.inputs) if found is not None and found.op == "Concat" else rank


def constant_like(tensor: gs.Tensor, axis: int, rank: int, size: int) -> bool:
    """A constant holding `size` channels on `axis` (rank `rank`, right-aligned), or an Expand of one (a class token).

    The Expand's shape must not broadcast that axis at run time: a constant entry of 1 or `size`. A per-tensor
    activation Q/DQ pair after the Expand (a QDQ model) is looked through.
    """
    tensor = through_activation_qdq(tensor)
    value = ir.const_value(tensor)
    if value is not None:
        own = axis - (rank - value.ndim)
        return own >= 0 and value.shape[own] == size
    producers = tensor.inputs if isinstance(tensor, gs.Variable) else []
    if len(producers) != 1 or producers[0].op != "Expand":
        return False
    expand = producers[0]
    data, shape = ir.const_value(expand.inputs[0]), ir.const_value(expand.inputs[1])
    if data is None:
        return False
    own = axis - (rank - data.ndim)
    if own < 0 or data.shape[own] != size:
        return False
    if shape is None:  # built at run time: the entry must be a literal 1 (or -1 that a Where turns into 1)
        return _keeps_dim(expand.inputs[1], axis - (rank - data.ndim) + _rank_gap(expand, data.ndim))
    entry = axis - (rank - shape.size)
    return entry >= 0 and int(shape.ravel()[entry]) in (1, size)


def _rank_gap(expand: gs.Node, data_rank: int) -> int:
    """Entries of an Expand's shape before the data's first (right-aligned) axis."""
    shape = expand.outputs[0].shape
    return 0 if shape is None else len(shape) - data_rank


def _flat(node: gs.Node) -> bool:
    target = ir.const_value(node.inputs[1])
    return target is not None and target.ravel().tolist() == [-1]


def _keeps_dim(shape: gs.Tensor, entry: int) -> bool:
    """Entry `entry` of a run-time shape is a literal 1, or ``Where(Equal(s, -1), ones, s)`` of a literal -1 (torch's expand(-1))."""
    producers = shape.inputs if isinstance(shape, gs.Variable) else []
    if len(producers) != 1:
        return False
    node = producers[0]
    literal: tuple[int, ...] = (1,)
    if node.op == "Where":
        shape, literal = node.inputs[2], (1, -1)
        producers = shape.inputs if isinstance(shape, gs.Variable) else []
        value = ir.const_value(shape)
        if value is not None:
            return 0 <= entry < value.size and int(value.ravel()[entry]) in literal
        if len(producers) != 1:
            return False
        node = producers[0]
    while node.op == "Reshape" and _flat(node):  # a 1-D shape reshaped to [-1]: the same entries
        producers = node.inputs[0].inputs if isinstance(node.inputs[0], gs.Variable) else []
        if len(producers) != 1:
            return False
        node = producers[0]
    if node.op != "Concat" or entry >= len(node.inputs) or entry < 0:
        return False
    value = ir.const_value(node.inputs[entry])
    return value is not None and value.size == 1 and int(value.ravel()[0]) in literal and all(
        ir.const_value(x) is not None or _one_element(x) for x in node.inputs[:entry])


def slice_constant_like(a: ApplyContext, node: gs.Node, index: int, axis: int, rank: int, keep: np.ndarray) -> None:
    """`constant_like` operand `index` of `node` sliced to `keep` on `axis` (an Expand's data and shape entry)."""
    tensor = through_activation_qdq(node.inputs[index])
    value = ir.const_value(tensor)
    if value is not None:
        assert tensor is node.inputs[index]  # a constant's Q/DQ pair is folded on load (`graph.qdq`)
        edit.set_input_const(node, index, np.take(value, keep, axis=axis - (rank - value.ndim)))
        return
    expand = tensor.inputs[0]
    data, shape = ir.input_const(expand, 0), ir.input_const(expand, 1)
    assert data is not None  # checked by constant_like
    edit.set_input_const(expand, 0, np.take(data, keep, axis=axis - (rank - data.ndim)))
    if shape is None:  # a run-time shape whose entry keeps the data's dim (`constant_like`)
        return
    entry = axis - (rank - shape.size)
    if int(shape.ravel()[entry]) != 1:
        new = shape.copy()
        new.reshape(-1)[entry] = keep.size
        edit.set_input_const(expand, 1, new)


class FusedAttentionRule(OpRule):
    """Fused attention and normalisation ops (onnxruntime's contrib ops, ai.onnx Attention from opset 23).

    Packed-sequence attention, fused residual / normalisation kernels and rotary ops: not traced yet,
    so their channels freeze with this reason (Attention, MultiHeadAttention, GroupQueryAttention
    and ai.onnx Attention have their rules in `ops.fused_attention`).
    """

    def __init__(self, domain: str, ops: tuple[str, ...], opsets: tuple[int, int] = (0, 10_000)) -> None:
        self.domain, self.ops, self.opsets = domain, ops, opsets

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        if t.traced_inputs(node):
            raise Freeze("fused attention / normalisation op: heads and hidden size are not pruned through it yet")


register(FusedAttentionRule("com.microsoft", (  # Attention, MultiHeadAttention, GroupQueryAttention: ops.fused_attention
    "PackedAttention", "PackedMultiHeadAttention",
    "DecoderMaskedMultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization", "RotaryEmbedding")))
register(FusedAttentionRule("", ("RotaryEmbedding",), (23, 10_000)))  # Attention: ops.fused_attention
register(GatherRule())
register(ExpandRule())
