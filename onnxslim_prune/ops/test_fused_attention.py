"""Fused attention ops: com.microsoft Attention / MultiHeadAttention / GroupQueryAttention, ai.onnx Attention (23).

Each model zeroes the Q, K and V slices of some heads (the smallest L1 norms, so `l1` removes exactly
them; for GQA a K/V head and its query heads): a head whose V slice is zero outputs zero, so the
pruned model computes the original's outputs to 1e-5 while the head-count attributes follow. The
contrib ops have no ONNX schema, so their graphs are built with `onnx.helper`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..channels import Kind, Role
from .testing import assert_same_outputs, attribute, group_of, initializer, parse, prune_l1, trace_of, weights, zeroed

MS = "com.microsoft"


def _columns(heads: tuple[int, ...], dim: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(offset + h * dim + d for h in heads for d in range(dim))


def _model(nodes: list[onnx.NodeProto], inputs: list[tuple[str, list[int]]], outputs: list[str],
           inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The graph, with the fused op's output shape stated (onnx has no shape inference for contrib ops)."""
    shape = inputs[0][1]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
        value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, [*shape[:2], _width(nodes, inits)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _width(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray]) -> int:
    """The fused op's output width: the V hidden size (packed: a third of the weight) times n_rep."""
    if "wv" in inits:
        return int(inits["wq"].shape[1])
    return int(inits["w" if "w" in inits else "wq"].shape[1]) // 3  # packed: in the op's weight, or in the query


def _attribute(model: onnx.ModelProto, op: str, name: str) -> object:
    node = next(n for n in model.graph.node if n.op_type == op)
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def test_packed_qkv_attention_prunes_heads_through_its_weight() -> None:
    """com.microsoft Attention, weight [C, 3 x 8], 4 heads of 2: heads 1 and 3 zero in Q, K, V and the bias."""
    cols = _columns((1, 3), 2) + _columns((1, 3), 2, 8) + _columns((1, 3), 2, 16)
    model = _model(
        [helper.make_node("Attention", ["x", "w", "b", "", "", "ab"], ["a"], domain=MS, num_heads=4, name="att"),
         helper.make_node("MatMul", ["a", "wo"], ["y"], name="proj")],
        [("x", [1, 4, 8])], ["y"],
        {"w": zeroed(weights(8, 24), cols, axis=1), "b": zeroed(weights(24, seed=1), cols),
         "ab": weights(1, 4, 4, 4, seed=3), "wo": weights(8, 8, seed=2)})
    trace = trace_of(model)
    group = group_of(trace, "att", Role.OUT)
    assert group.size == 4 and group.prunable == 4  # one class per head: its Q, K and V columns
    assert ("att", Role.HEADS) in {(m.node, m.role) for m in group.members}
    assert ("proj", Role.IN) in {(m.node, m.role) for m in group.members}
    assert trace.node_kind["att"] == Kind.FUSED_ATTENTION
    result = prune_l1(model)
    assert initializer(result.model, "w").shape == (8, 12) and initializer(result.model, "b").shape == (12,)
    assert initializer(result.model, "ab").shape == (1, 2, 4, 4)  # the attention bias keeps its kept heads
    assert initializer(result.model, "wo").shape == (4, 8)
    assert _attribute(result.model, "Attention", "num_heads") == 2
    # MACs: packed projection 4 x 8 x 24, scores and context 4 x 4 x (8 + 8), output projection 4 x 8 x 8; halved
    assert (result.report.before.macs, result.report.after.macs) == (1280, 640)
    assert_same_outputs(model, result.model)


def _separate(op: str, attrs: dict[str, Any], q_width: int, kv_width: int, zero_q: tuple[int, ...],
              zero_kv: tuple[int, ...], extra_inputs: list[str] | None = None, outputs: tuple[str, ...] = ("a",),
              inits: dict[str, np.ndarray] | None = None, channels: int = 8) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node(op, ["q", "k", "v", *(extra_inputs or [])], list(outputs), domain=MS, name="att", **attrs),
             helper.make_node("MatMul", ["a", "wo"], ["y"], name="proj")]
    values = {"wq": zeroed(weights(channels, q_width), zero_q, axis=1),
              "wk": zeroed(weights(channels, kv_width, seed=1), zero_kv, axis=1),
              "wv": zeroed(weights(channels, kv_width, seed=2), zero_kv, axis=1),
              "wo": weights(q_width, channels, seed=3), **(inits or {})}
    return _model(nodes, [("x", [1, 4, channels])], ["y"], values)


def test_multi_head_attention_prunes_heads_of_its_projections() -> None:
    """MultiHeadAttention on separate Q, K, V MatMuls, packed bias [3 x 8] and a per-head attention bias."""
    zero = _columns((0, 2), 2)
    bias = zeroed(weights(24, seed=4), zero + _columns((0, 2), 2, 8) + _columns((0, 2), 2, 16))
    model = _separate("MultiHeadAttention", {"num_heads": 4}, 8, 8, zero, zero, ["b", "", "ab"],
                      inits={"b": bias, "ab": weights(1, 4, 4, 4, seed=5)})
    group = group_of(trace_of(model), "q", Role.OUT)
    assert group.size == 4 and {m.node for m in group.members if m.role == Role.OUT} == {"q", "k", "v"}
    result = prune_l1(model)
    for name in ("wq", "wk", "wv"):
        assert initializer(result.model, name).shape == (8, 4)
    assert initializer(result.model, "b").shape == (12,) and initializer(result.model, "ab").shape == (1, 2, 4, 4)
    assert initializer(result.model, "wo").shape == (4, 8)
    assert _attribute(result.model, "MultiHeadAttention", "num_heads") == 2
    # MACs: four 4 x 8 x 8 projections and the op's 4 x 4 x (8 + 8); halved
    assert (result.report.before.macs, result.report.after.macs) == (1280, 640)
    assert_same_outputs(model, result.model)


def _gqa(rotary: bool = False, present_out: bool = False) -> onnx.ModelProto:
    """4 query heads, 2 K/V heads, head size 16 (onnxruntime's minimum with rotary): K/V head 1, query heads 2, 3 zero."""
    attrs: dict[str, Any] = {"num_heads": 4, "kv_num_heads": 2, **({"do_rotary": 1} if rotary else {})}
    inits: dict[str, np.ndarray] = {"sl": np.array([3], np.int32), "tl": np.array(4, np.int32)}
    extra = ["", "", "sl", "tl"]
    if rotary:
        angle = np.arange(16)[:, None] * 0.1 * np.arange(1, 9)[None, :]
        inits |= {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}
        extra += ["cos", "sin"]
    outputs = ("a", "pk", "pv")
    model = _separate("GroupQueryAttention", attrs, 64, 32, _columns((2, 3), 16), _columns((1,), 16), extra,
                      outputs, inits, channels=16)
    if present_out:
        model.graph.output.append(helper.make_tensor_value_info("pk", TensorProto.FLOAT, [1, 2, 4, 16]))
    return model


def test_group_query_attention_prunes_a_kv_head_with_its_query_heads() -> None:
    for rotary in (False, True):
        model = _gqa(rotary)
        group = group_of(trace_of(model), "q", Role.OUT)
        assert group.size == 2 and group.prunable == 2  # one class per GQA group: a K/V head and 2 query heads
        result = prune_l1(model)
        assert initializer(result.model, "wq").shape == (16, 32) and initializer(result.model, "wk").shape == (16, 16)
        assert initializer(result.model, "wo").shape == (32, 16)
        assert _attribute(result.model, "GroupQueryAttention", "num_heads") == 2
        assert _attribute(result.model, "GroupQueryAttention", "kv_num_heads") == 1
        assert_same_outputs(model, result.model)


def test_a_kv_cache_graph_output_or_input_freezes_the_heads() -> None:
    group = group_of(trace_of(_gqa(present_out=True)), "q", Role.OUT)
    assert group.is_frozen and any("present K/V cache" in r for r in group.reasons)
    model = _separate("MultiHeadAttention", {"num_heads": 4}, 8, 8, (), (), ["", "", "", "pk", "pv"])
    model.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 3, 2]) for n in ("pk", "pv")])
    group = group_of(trace_of(model), "q", Role.OUT)
    assert group.is_frozen and any("past K/V cache" in r for r in group.reasons)
    result = prune_l1(model)
    assert initializer(result.model, "wq").shape == (8, 8)  # the heads stay; the graph inputs keep their shapes


def test_a_run_time_mask_with_a_head_axis_or_packed_qkv_freezes_with_its_reason() -> None:
    model = _separate("MultiHeadAttention", {"num_heads": 4}, 8, 8, (), (), ["", "", "ab"])
    model.graph.input.append(helper.make_tensor_value_info("ab", TensorProto.FLOAT, [1, 4, 4, 4]))
    group = group_of(trace_of(model), "q", Role.OUT)
    assert group.is_frozen and any("head axis and is not a constant" in r for r in group.reasons)
    packed = _model([helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
                     helper.make_node("GroupQueryAttention", ["q", "", "", "", "", "sl", "tl"], ["a", "pk", "pv"],
                                      domain=MS, num_heads=2, kv_num_heads=2, name="att"),
                     helper.make_node("MatMul", ["a", "wo"], ["y"], name="proj")],
                    [("x", [1, 4, 16])], ["y"], {"wq": weights(16, 96), "wo": weights(32, 16, seed=1),
                                                 "sl": np.array([3], np.int32), "tl": np.array(4, np.int32)})
    group = group_of(trace_of(packed), "q", Role.OUT)
    assert group.size == 96 and group.is_frozen and any("packed QKV" in r for r in group.reasons)
    result = prune_l1(model)
    assert initializer(result.model, "wq").shape == (8, 8)  # the heads stay
    assert_same_outputs(model, result.model)


def test_onnx_attention_23_prunes_grouped_heads_and_recounts_both_attributes() -> None:
    """ai.onnx Attention (opset 23) on [B, S, H D] inputs: 4 query heads, 2 K/V heads of 2; K/V head 0 zero."""
    model = parse("""<ir_version: 10, opset_import: ["" : 23]>
    g (float[1,4,8] x) => (float[1,4,8] y) {
      q = MatMul (x, wq)
      k = MatMul (x, wk)
      v = MatMul (x, wv)
      a = Attention <q_num_heads = 4, kv_num_heads = 2> (q, k, v, mask)
      y = MatMul (a, wo)
    }""", wq=zeroed(weights(8, 8), _columns((0, 1), 2), axis=1), wk=zeroed(weights(8, 4, seed=1), (0, 1), axis=1),
        wv=zeroed(weights(8, 4, seed=2), (0, 1), axis=1), wo=weights(8, 8, seed=3), mask=weights(1, 4, 4, 4, seed=4))
    group = group_of(trace_of(model), "MatMul_0", Role.OUT)
    assert group.size == 2 and ("Attention_3", Role.HEADS) in {(m.node, m.role) for m in group.members}
    result = prune_l1(model)
    assert initializer(result.model, "wq").shape == (8, 4) and initializer(result.model, "wk").shape == (8, 2)
    assert initializer(result.model, "mask").shape == (1, 2, 4, 4) and initializer(result.model, "wo").shape == (4, 8)
    assert attribute(result.model, "Attention_3", "q_num_heads") == 2
    assert attribute(result.model, "Attention_3", "kv_num_heads") == 1
    assert_same_outputs(model, result.model)
