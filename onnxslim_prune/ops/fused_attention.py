"""Fused attention ops: heads pruned through their packed weights, head-count attributes and per-head operands.

Four ops compute ``softmax(Q_h K_g^T * scale + bias_h) V_g`` per query head ``h`` with the K/V head
``g = h // n_rep`` (``n_rep = H_q / H_kv``; 1 without grouped-query attention), and concatenate the heads'
outputs on the last axis, ``[B, S, H_q * D_v]``:

* com.microsoft ``Attention``: ``x [B, S, C] @ W [C, q + k + v] + b``, one packed weight (Q, K and V
  column blocks, sizes ``qkv_hidden_sizes`` or ``3 x hidden``) and ``num_heads``. The op is a
  *source*: its weight's columns are a space of ``q + k + v`` atoms, the three slices of a head
  united into one class, and the output carries the V atoms. Apply keeps the columns of the kept
  heads in each block (``W[:, keep_q | keep_k | keep_v]``, ``b`` alike) and the rows of the kept
  input channels when ``x`` is traced (the hidden size);
* com.microsoft ``MultiHeadAttention`` (``num_heads``), com.microsoft ``GroupQueryAttention``
  (``num_heads``, ``kv_num_heads``) and ai.onnx ``Attention`` from opset 23 (``q_num_heads``,
  ``kv_num_heads``): separate ``query``, ``key``, ``value`` inputs ``[B, S, H D]`` produced by
  traced projections. The channels of query head ``h`` are united with those of K/V head
  ``h // n_rep`` (a GQA group is one class: a K/V head and its query heads go together), and the
  output's channel ``h D_v + d`` carries the atom of V channel ``(h // n_rep) D_v + d``. Apply
  recounts the head attributes from the kept channels and slices MultiHeadAttention's packed bias
  ``[q + k + v]``, a constant attention bias / mask with a head axis (axis 1 of ``[B, H, S, T]``), and
  GroupQueryAttention's per-head ``head_sink``.

Exact: every head is computed independently, so removing whole heads changes only the removed heads'
output channels (and the consumers' rows reading them); a head whose V slice (or the output
projection's rows of it) is zero contributes nothing, so the pruned model computes the original's
outputs. GroupQueryAttention's rotary embedding (``do_rotary`` with ``cos_cache`` / ``sin_cache``
``[max_seq, D / 2]``) acts within each head's ``D`` channels alike for every head: it stays exact.
The hidden size through com.microsoft Attention's ``x`` is the ordinary row slice of a dense weight.

Frozen, with the reason in the report: a past K/V cache input or a used present output (the cache is
a graph input / output or a loop-carried state whose head count is fixed), packed QKV in ``query``
(``key`` absent), inputs that are not channels-last ``[B, S, H D]`` (BNSH layouts), an attention bias
or mask with a head axis that is not a constant, a non-constant weight or bias, only some of Q / K / V
traced, head sizes that do not divide, and com.microsoft Attention's rotary or shared past / present
buffer. MACs: the packed projection ``B S C (q + k + v)`` plus the two products ``B H_q S T (D_qk +
D_v)``; the budget scales all of them by the kept input and output fractions (approximate when the
input is pruned too: the two products do not depend on the input width).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import ChannelMap, Kind, Role
from ..graph import edit
from .registry import ApplyContext, CostContext, Freeze, NodeCost, OpRule, ShapeOf, TraceContext, float_size, register

MS = "com.microsoft"


@dataclass(frozen=True)
class Layout:
    """Where an op keeps its parts: input indices of Q, K, V, caches, biases; output indices of caches."""

    query: int
    key: int
    value: int
    past: tuple[int, ...]  # past K/V cache inputs
    present: tuple[int, ...]  # present K/V cache outputs (and any other per-head output)
    head_bias: tuple[int, ...]  # attention bias / mask inputs broadcast to [B, H, S, T]
    head_vector: tuple[int, ...] = ()  # inputs holding one value per query head
    packed_bias: int | None = None  # a [q + k + v] bias input
    q_attr: str = "num_heads"
    kv_attr: str | None = None


MHA_LAYOUT = Layout(0, 1, 2, past=(6, 7), present=(1, 2), head_bias=(5,), packed_bias=3)
GQA_LAYOUT = Layout(0, 1, 2, past=(3, 4), present=(1, 2), head_bias=(10,), head_vector=(11,), kv_attr="kv_num_heads")
ONNX_LAYOUT = Layout(0, 1, 2, past=(4, 5), present=(1, 2, 3), head_bias=(3,), q_attr="q_num_heads",
                     kv_attr="kv_num_heads")


def _present_used(t: TraceContext, node: gs.Node, outputs: tuple[int, ...]) -> bool:
    return any(i < len(node.outputs) and node.outputs[i].name and (node.outputs[i].outputs or t.is_graph_output(
        node.outputs[i])) for i in outputs)


def _check_caches(t: TraceContext, node: gs.Node, layout: Layout) -> None:
    if any(ir.has_input(node, i) for i in layout.past):
        raise Freeze("a past K/V cache input fixes the head count")
    if _present_used(t, node, layout.present):
        raise Freeze("a present K/V cache (or per-head) output is used: its head count is fixed")


def _check_head_operands(t: TraceContext, node: gs.Node, layout: Layout, heads: int) -> None:
    """Attention biases / masks must be constant where they carry a head axis; per-head vectors constant."""
    for i in layout.head_bias:
        if not ir.has_input(node, i):
            continue
        shape = t.shape(node.inputs[i])
        if t.cmap(node.inputs[i]) is not None:
            raise Freeze("the attention bias carries channels")
        if shape is None:
            raise Freeze("the attention bias has an unknown shape")
        if len(shape) == 4 and shape[1] != 1 and ir.input_const(node, i) is None:
            raise Freeze("the attention bias has a head axis and is not a constant")
        if len(shape) == 4 and shape[1] not in (1, heads):
            raise Freeze("the attention bias's head axis does not match the heads")
    for i in layout.head_vector:
        if ir.has_input(node, i) and ir.input_const(node, i) is None:
            raise Freeze("a per-head input is not a constant")


def _head_atoms(cmap: ChannelMap, heads: int) -> list[np.ndarray]:
    dim = cmap.size // heads
    return [cmap.atoms[h * dim:(h + 1) * dim] for h in range(heads)]


def unite_heads(t: TraceContext, node: gs.Node, q: ChannelMap, k: ChannelMap, v: ChannelMap, q_heads: int,
                kv_heads: int) -> np.ndarray:
    """Unite query head h with K/V head ``h // n_rep`` (all their channels); the output's atoms, ``[H_q D_v]``."""
    if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
        raise Freeze("the query heads are not a multiple of the K/V heads")
    if q.size % q_heads or k.size % kv_heads or v.size % kv_heads:
        raise Freeze("a hidden size is not a multiple of its head count")
    n_rep = q_heads // kv_heads
    qs, ks, vs = _head_atoms(q, q_heads), _head_atoms(k, kv_heads), _head_atoms(v, kv_heads)
    for g in range(kv_heads):
        anchor = ks[g][:1]
        for part in (ks[g], vs[g], *qs[g * n_rep:(g + 1) * n_rep]):
            t.unite(np.repeat(anchor, part.size), part)
    return np.concatenate([vs[h // n_rep] for h in range(q_heads)])


def _kept_heads(keep: np.ndarray | None, size: int, heads: int) -> np.ndarray | None:
    """Kept head indices from kept channel positions (whole heads by construction), None when all stay."""
    if keep is None:
        return None
    dim = size // heads
    return np.unique(keep // dim)


def _slice_head_operands(a: ApplyContext, node: gs.Node, layout: Layout, kept_q: np.ndarray) -> None:
    for i in layout.head_bias:
        value = ir.input_const(node, i)
        if value is not None and value.ndim == 4 and value.shape[1] > 1:
            edit.set_input_const(node, i, np.take(value, kept_q, axis=1))
    for i in layout.head_vector:
        value = ir.input_const(node, i)
        if value is not None and value.size > 1:
            edit.set_input_const(node, i, np.take(value.reshape(-1), kept_q))


def _attention_macs(shape_of: ShapeOf, node: gs.Node, qk_width: int, v_width: int) -> int:
    """``B S T (D_qk + D_v) H``: the score and context products (T = S without a cache)."""
    shape = shape_of(node.inputs[0])
    if shape is None or len(shape) != 3:
        return 0
    batch, seq = int(shape[0]), int(shape[1])
    return batch * seq * seq * (qk_width + v_width)


class SeparateQKVRule(OpRule):
    """MultiHeadAttention, GroupQueryAttention, ai.onnx Attention: Q, K, V from traced projections (module docstring)."""

    def __init__(self, domain: str, op: str, layout: Layout, opsets: tuple[int, int] = (0, 10_000)) -> None:
        self.domain, self.ops, self.layout, self.opsets = domain, (op,), layout, opsets

    def heads(self, node: gs.Node) -> tuple[int, int]:
        lay = self.layout
        q_heads = int(ir.attr(node, lay.q_attr, 0))
        kv_heads = int(ir.attr(node, lay.kv_attr, 0)) if lay.kv_attr else q_heads
        return q_heads, kv_heads

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        lay = self.layout
        maps = [t.cmap(node.inputs[i]) if ir.has_input(node, i) else None for i in (lay.query, lay.key, lay.value)]
        traced = [i for i, _ in t.traced_inputs(node)]
        if not traced:
            return
        if any(i not in (lay.query, lay.key, lay.value) for i in traced):
            raise Freeze("a mask, bias or cache input carries channels")
        if not ir.has_input(node, lay.key) or not ir.has_input(node, lay.value):
            raise Freeze("packed QKV in the query input: the head layout is not sliced")
        q, k, v = maps
        if q is None or k is None or v is None:
            raise Freeze("only some of Q, K, V are traced: their heads cannot follow each other")
        for i, m in zip((lay.query, lay.key, lay.value), (q, k, v)):
            shape = t.shape(node.inputs[i])
            if shape is None or len(shape) != 3 or m.axis != 2:
                raise Freeze("Q, K, V are not channels-last [B, S, H * D]")
        q_heads, kv_heads = self.heads(node)
        if q_heads < 2:
            raise Freeze("the head count attribute is missing or 1")
        _check_caches(t, node, lay)
        _check_head_operands(t, node, lay, q_heads)
        if lay.packed_bias is not None and ir.has_input(node, lay.packed_bias):
            bias = ir.input_const(node, lay.packed_bias)
            if bias is None or bias.size != q.size + k.size + v.size:
                raise Freeze("the packed bias is not a constant [q + k + v]")
        out_atoms = unite_heads(t, node, q, k, v, q_heads, kv_heads)
        for m in (q, k, v):
            t.touch(m.atoms, node, Role.HEADS)
        t.set_kind(node, Kind.FUSED_ATTENTION)
        t.set_map(node.outputs[0], ChannelMap(2, out_atoms))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind != Kind.FUSED_ATTENTION:
            return
        lay = self.layout
        q, k, v = (node.inputs[i] for i in (lay.query, lay.key, lay.value))
        q_heads, kv_heads = self.heads(node)
        kept_q = _kept_heads(a.keep(q), a.original_size(q), q_heads)
        if kept_q is None:
            return
        kept_kv = _kept_heads(a.keep(k), a.original_size(k), kv_heads)
        assert kept_kv is not None
        edit.set_attr(node, lay.q_attr, int(kept_q.size))
        if lay.kv_attr:
            edit.set_attr(node, lay.kv_attr, int(kept_kv.size))
        _slice_head_operands(a, node, lay, kept_q)
        if lay.packed_bias is not None and ir.has_input(node, lay.packed_bias):
            bias = ir.input_const(node, lay.packed_bias)
            assert bias is not None
            parts, start = [], 0
            for x in (q, k, v):
                size = a.original_size(x)
                keep = a.keep(x)
                parts.append(start + (np.arange(size) if keep is None else keep))
                start += size
            edit.set_input_const(node, lay.packed_bias, np.take(bias, np.concatenate(parts)))

    def macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        lay = self.layout
        widths = [shape_of(node.inputs[i]) if ir.has_input(node, i) else None for i in (lay.query, lay.value)]
        if widths[0] is None or widths[1] is None:
            return 0
        q_heads, kv_heads = self.heads(node)
        if not q_heads or not kv_heads:
            return 0
        v_width = int(widths[1][-1]) // kv_heads * q_heads  # each query head reads one V head
        return _attention_macs(shape_of, node, int(widths[0][-1]), v_width)

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        if kind != Kind.FUSED_ATTENTION:
            return None
        out = c.atoms(node.outputs[0])
        bias = self.layout.packed_bias
        params = float_size(ir.input_const(node, bias)) if bias is not None and c.first_use(node, bias) else 0
        return None if out is None else NodeCost(None, out, int(c.trace.node_macs.get(node.name, 0)), 0, params)


class PackedAttentionRule(OpRule):
    """com.microsoft Attention: ``x @ W_qkv + b`` packed in the op, a source of ``q + k + v`` atoms (module docstring)."""

    ops = ("Attention",)
    domain = MS

    @staticmethod
    def sizes(node: gs.Node, weight_shape: tuple[int, ...] | None = None) -> tuple[int, int, int] | None:
        """``(q, k, v)`` widths of the packed weight (its constant, or `weight_shape` where only shapes are known)."""
        if weight_shape is None:
            weight = ir.input_const(node, 1)
            weight_shape = None if weight is None else tuple(int(d) for d in weight.shape)
        if weight_shape is None or len(weight_shape) != 2:
            return None
        width = int(weight_shape[1])
        given = ir.attr(node, "qkv_hidden_sizes")
        if given:
            sizes = tuple(int(s) for s in given)
            return (sizes[0], sizes[1], sizes[2]) if len(sizes) == 3 and sum(sizes) == width else None
        third = width // 3
        return (third, third, third) if 3 * third == width else None

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        x_map = t.cmap(node.inputs[0])
        if ir.input_const(node, 1) is None:
            if x_map is not None:
                raise Freeze("the packed weight is not a constant")
            return
        sizes = self.sizes(node)
        heads = int(ir.attr(node, "num_heads", 0))
        if any(m is not None for i, m in t.traced_inputs(node) if i != 0):
            raise Freeze("a weight, mask or cache input carries channels")
        if sizes is None:
            raise Freeze("the packed weight is not [C, q + k + v]")
        shape = t.shape(node.inputs[0])
        if shape is None or len(shape) != 3 or (x_map is not None and x_map.axis != 2):
            raise Freeze("the input is not [B, S, C]")
        if heads < 2 or sizes[0] != sizes[1] or any(s % heads for s in sizes):
            raise Freeze("the head count does not divide the packed sizes")
        if ir.has_input(node, 2) and ir.input_const(node, 2) is None:
            raise Freeze("the bias is not a constant")
        if int(ir.attr(node, "do_rotary", 0)) or int(ir.attr(node, "past_present_share_buffer", 0)):
            raise Freeze("rotary or a shared past / present buffer inside the op")
        if ir.has_input(node, 4) or ir.has_input(node, 6):
            raise Freeze("a past K/V cache input fixes the head count")
        if _present_used(t, node, (1,)):
            raise Freeze("a present K/V cache output is used: its head count is fixed")
        if ir.has_input(node, 3) and len(t.shape(node.inputs[3]) or ()) == 4:
            raise Freeze("a 4-D mask_index (a head axis) is not sliced")
        _check_head_operands(t, node, Layout(0, 0, 0, (), (), head_bias=(5,)), heads)
        t.set_kind(node, Kind.FUSED_ATTENTION)
        if x_map is not None:
            t.touch(x_map.atoms, node, Role.IN)
        _, atoms = t.new_source(node, node.outputs[0], 2, sum(sizes), 1)
        q, k, v = np.split(atoms, [sizes[0], sizes[0] + sizes[1]])
        out_atoms = unite_heads(t, node, ChannelMap(2, q), ChannelMap(2, k), ChannelMap(2, v), heads, heads)
        t.touch(atoms, node, Role.HEADS)
        t.set_map(node.outputs[0], ChannelMap(2, out_atoms))

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        if kind != Kind.FUSED_ATTENTION:
            return
        sizes = self.sizes(node)
        assert sizes is not None
        heads = int(ir.attr(node, "num_heads"))
        keep_v = a.keep(node.outputs[0])
        keep_in = a.keep(node.inputs[0])
        weight = ir.input_const(node, 1)
        assert weight is not None
        if keep_in is not None:
            edit.set_input_const(node, 1, np.take(weight, keep_in, axis=0))
        kept = _kept_heads(keep_v, sizes[2], heads)
        if kept is None:
            return
        columns, start = [], 0
        for size in sizes:
            dim = size // heads
            columns.append(start + (kept[:, None] * dim + np.arange(dim)[None, :]).reshape(-1))
            start += size
        cols = np.concatenate(columns)
        weight = ir.input_const(node, 1)
        assert weight is not None
        edit.set_input_const(node, 1, np.take(weight, cols, axis=1))
        bias = ir.input_const(node, 2)
        if bias is not None:
            edit.set_input_const(node, 2, np.take(bias, cols))
        edit.set_attr(node, "num_heads", int(kept.size))
        if ir.attr(node, "qkv_hidden_sizes"):
            edit.set_attr(node, "qkv_hidden_sizes", [int(size // heads * kept.size) for size in sizes])
        _slice_head_operands(a, node, Layout(0, 0, 0, (), (), head_bias=(5,)), kept)

    def macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        sizes = self.sizes(node, shape_of(node.inputs[1]))
        shape = shape_of(node.inputs[0])
        if sizes is None or shape is None or len(shape) != 3:
            return 0
        projection = int(np.prod(shape, dtype=np.int64)) * sum(sizes)
        return projection + _attention_macs(shape_of, node, sizes[0], sizes[2])

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        if kind != Kind.FUSED_ATTENTION:
            return None
        out = c.atoms(node.outputs[0])
        weight = float_size(ir.input_const(node, 1)) if c.first_use(node, 1) else 0
        bias = float_size(ir.input_const(node, 2)) if ir.has_input(node, 2) and c.first_use(node, 2) else 0
        return NodeCost(c.atoms(node.inputs[0]), out, int(c.trace.node_macs.get(node.name, 0)), weight, bias)


register(PackedAttentionRule())
register(SeparateQKVRule(MS, "MultiHeadAttention", MHA_LAYOUT))
register(SeparateQKVRule(MS, "GroupQueryAttention", GQA_LAYOUT))
register(SeparateQKVRule("", "Attention", ONNX_LAYOUT, (23, 10_000)))
