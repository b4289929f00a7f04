"""Attention heads as exporters write them: separate and fused projections, a run-time target, GQA; exact oracles.

Each model zeroes the Q, K and V slices of some heads (the smallest L1 norms, so `l1` removes
exactly them); a head whose V slice is zero outputs zero, so the pruned model computes the
original's outputs (to 1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ..channels import Kind, Role
from .testing import assert_same_outputs, group_of, initializer, parse, prune_l1, trace_of, weights, zeroed

#: heads 1 and 3 of 4 (head_dim 2) of an 8-channel projection
ZERO_HEADS = (2, 3, 6, 7)


def _attention_text(extra: str = "") -> str:
    return """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8] x) => (float[1,4,8] y) {
      q0 = MatMul (x, wq)
      q = Add (q0, bq)
      k = MatMul (x, wk)
      v = MatMul (x, wv)
      qh = Reshape (q, split)
      kh = Reshape (k, split)
      vh = Reshape (v, split)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      kt = Transpose <perm = [0, 2, 3, 1]> (kh)
      vt = Transpose <perm = [0, 2, 1, 3]> (vh)
      s = MatMul (qt, kt)
      sc = Mul (s, scale)
      sm = Add (sc, mask)
      p = Softmax <axis = -1> (sm)
      o = MatMul (p, vt)
      ot = Transpose <perm = [0, 2, 1, 3]> (o)
      om = Reshape (ot, merge)
      y = MatMul (om, wo)
    }""" + extra


def test_heads_of_separate_projections_prune_whole() -> None:
    model = parse(
        _attention_text(),
        wq=zeroed(weights(8, 8), ZERO_HEADS, axis=1), bq=zeroed(weights(8, seed=1), ZERO_HEADS),
        wk=zeroed(weights(8, 8, seed=2), ZERO_HEADS, axis=1), wv=zeroed(weights(8, 8, seed=3), ZERO_HEADS, axis=1),
        wo=weights(8, 8, seed=4), split=np.array([1, 4, 4, 2]), merge=np.array([1, 4, 8]), scale=np.array(0.7),
        mask=weights(1, 1, 1, 4, seed=5),
    )
    trace = trace_of(model)
    group = group_of(trace, "MatMul_0", Role.OUT)
    assert group.size == 4  # one class per head, holding its Q, K and V channels
    assert {m.node for m in group.members if m.role == Role.OUT} == {"MatMul_0", "MatMul_2", "MatMul_3"}
    assert {(m.node, m.role) for m in group.members} >= {("MatMul_10", Role.HEADS), ("MatMul_14", Role.HEADS),
                                                         ("MatMul_17", Role.IN)}
    assert trace.node_kind["MatMul_10"] == Kind.BATCH_MATMUL
    result = prune_l1(model)
    for name in ("wq", "wk", "wv"):
        assert initializer(result.model, name).shape == (8, 4)
    assert initializer(result.model, "wo").shape == (4, 8)
    assert initializer(result.model, "split").tolist() == [1, 4, 2, 2]  # the head count follows
    assert initializer(result.model, "merge").tolist() == [1, 4, 4]
    assert_same_outputs(model, result.model)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_fused_qkv_with_a_dynamic_batch_rewrites_the_concat_built_targets() -> None:
    """timm's layout: one qkv weight, Reshape [B, N, 3, H, D] built by a Concat at run time, Gather per part."""
    fused = [g * 8 + c for g in range(3) for c in ZERO_HEADS]
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[B,4,8] x) => (float[B,4,8] y) {
      qkv = MatMul (x, wqkv)
      sh = Shape (x)
      b = Gather <axis = 0> (sh, i0)
      bu = Unsqueeze (b, ax0)
      t5 = Concat <axis = 0> (bu, n4, three, heads, dim)
      r = Reshape (qkv, t5)
      tr = Transpose <perm = [2, 0, 3, 1, 4]> (r)
      q = Gather <axis = 0> (tr, i0)
      k = Gather <axis = 0> (tr, i1)
      v = Gather <axis = 0> (tr, i2)
      kt = Transpose <perm = [0, 1, 3, 2]> (k)
      s = MatMul (q, kt)
      p = Softmax <axis = -1> (s)
      o = MatMul (p, v)
      ot = Transpose <perm = [0, 2, 1, 3]> (o)
      c = Gather <axis = 0> (sh, i2)
      cu = Unsqueeze (c, ax0)
      t3 = Concat <axis = 0> (bu, n4, cu)
      om = Reshape (ot, t3)
      y = MatMul (om, wo)
    }""", wqkv=zeroed(weights(8, 24), tuple(fused), axis=1), wo=weights(8, 8, seed=1), i0=np.array(0),
        i1=np.array(1), i2=np.array(2), ax0=np.array([0]), n4=np.array([4]), three=np.array([3]), heads=np.array([4]),
        dim=np.array([2]))
    group = group_of(trace_of(model), "MatMul_0", Role.OUT)
    assert group.size == 4 and group.prunable == 4
    result = prune_l1(model)
    assert initializer(result.model, "wqkv").shape == (8, 12) and initializer(result.model, "wo").shape == (4, 8)
    x = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32)  # another batch than traced
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    shapes = {t.name: numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}
    assert [2] in shapes.values() and [4] in shapes.values()  # 2 heads kept; the merged width 2 x 2 = 4


def test_grouped_query_attention_prunes_a_kv_head_with_its_query_heads() -> None:
    """Llama's repeat_kv (Unsqueeze, Expand, Reshape): K/V head j serves query heads 2j, 2j + 1."""
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8] x) => (float[1,4,8] y) {
      q = MatMul (x, wq)
      k = MatMul (x, wk)
      v = MatMul (x, wv)
      qh = Reshape (q, split_q)
      kh = Reshape (k, split_kv)
      vh = Reshape (v, split_kv)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      kt = Transpose <perm = [0, 2, 1, 3]> (kh)
      vt = Transpose <perm = [0, 2, 1, 3]> (vh)
      ku = Unsqueeze (kt, ax2)
      vu = Unsqueeze (vt, ax2)
      ke = Expand (ku, rep)
      ve = Expand (vu, rep)
      kr = Reshape (ke, heads4)
      vr = Reshape (ve, heads4)
      ktt = Transpose <perm = [0, 1, 3, 2]> (kr)
      s = MatMul (qt, ktt)
      p = Softmax <axis = -1> (s)
      o = MatMul (p, vr)
      ot = Transpose <perm = [0, 2, 1, 3]> (o)
      om = Reshape (ot, merge)
      y = MatMul (om, wo)
    }""", wq=zeroed(weights(8, 8), (4, 5, 6, 7), axis=1), wk=zeroed(weights(8, 4, seed=1), (2, 3), axis=1),
        wv=zeroed(weights(8, 4, seed=2), (2, 3), axis=1), wo=weights(8, 8, seed=3), split_q=np.array([1, 4, 4, 2]),
        split_kv=np.array([1, 4, 2, 2]), ax2=np.array([2]), rep=np.array([1, 2, 2, 4, 2]),
        heads4=np.array([1, 4, 4, 2]), merge=np.array([1, 4, 8]))
    trace = trace_of(model)
    group = group_of(trace, "MatMul_0", Role.OUT)
    assert group.size == 2  # one class per GQA group: a K/V head and its two query heads
    assert trace.node_kind["Expand_11"] == Kind.EXPAND
    result = prune_l1(model)
    assert initializer(result.model, "wq").shape == (8, 4) and initializer(result.model, "wk").shape == (8, 2)
    assert initializer(result.model, "rep").tolist() == [1, 1, 2, 4, 2]
    shapes = [numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer]
    assert [1, 4, 2, 2] in shapes and [1, 2, 4, 2] in shapes  # the query split and the repeated K/V heads
    assert_same_outputs(model, result.model)


def test_matmul_between_activations_on_the_contracted_axis_unites_both_operands() -> None:
    """``(x Wa) @ (x Wb)^T``: the contracted channels of both projections are one class each."""
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,6] x) => (float[1,4,4] y) {
      a = MatMul (x, wa)
      b = MatMul (x, wb)
      bt = Transpose <perm = [0, 2, 1]> (b)
      y = MatMul (a, bt)
    }""", wa=zeroed(weights(6, 8), (1, 4, 5, 6), axis=1), wb=zeroed(weights(6, 8, seed=1), (1, 4, 5, 6), axis=1))
    group = group_of(trace_of(model), "MatMul_0", Role.OUT)
    assert group.size == 8 and {m.node for m in group.members if m.role == Role.OUT} == {"MatMul_0", "MatMul_1"}
    result = prune_l1(model)
    assert initializer(result.model, "wa").shape == (6, 4) and initializer(result.model, "wb").shape == (6, 4)
    assert_same_outputs(model, result.model)


def test_matmul_with_channels_on_one_batch_operand_only_freezes() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8] x, float[1,2,4,4] z) => (float[1,2,4,4] y) {
      q = MatMul (x, wq)
      qh = Reshape (q, split)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      y = MatMul (z, qt)
    }""", wq=weights(8, 8), split=np.array([1, 4, 2, 4]))
    group = group_of(trace_of(model), "MatMul_0", Role.OUT)
    assert group.is_frozen and any("untraced operand has a channel dimension" in r for r in group.reasons)


# ----------------------------------------------------------------------------- FFN and the hidden size


def test_swiglu_neurons_prune_exactly() -> None:
    """Llama's gated MLP: gate and up projections coupled by the Mul, then down; hidden size kept by the graph I/O."""
    zero = (0, 2, 5)
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8] x) => (float[1,4,8] y) {
      gt = MatMul (x, wg)
      sg = Sigmoid (gt)
      si = Mul (gt, sg)
      up = MatMul (x, wu)
      m = Mul (si, up)
      d = MatMul (m, wd)
      y = Add (x, d)
    }""", wg=zeroed(weights(8, 6), zero, axis=1), wu=zeroed(weights(8, 6, seed=1), zero, axis=1), wd=weights(6, 8, seed=2))
    group = group_of(trace_of(model), "MatMul_0", Role.OUT)
    assert {m.node for m in group.members if m.role == Role.OUT} == {"MatMul_0", "MatMul_3"} and group.size == 6
    result = prune_l1(model)
    assert initializer(result.model, "wg").shape == (8, 3) and initializer(result.model, "wd").shape == (3, 8)
    assert_same_outputs(model, result.model)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


def _run_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def test_hidden_size_through_embedding_layernorm_and_residual() -> None:
    """The residual stream: embedding table columns, position embedding, LayerNorm, residual Add, consumers' rows.

    LayerNorm then normalises over the kept channels (the documented rule): the pruned model equals
    numpy's computation with every hidden-sized tensor sliced to the kept channels.
    """
    zero = (1, 3, 5, 7)
    w = {"emb": weights(10, 8), "pos": weights(1, 4, 8, seed=1), "g1": weights(8, seed=2), "b1": weights(8, seed=3),
         "w1": weights(8, 6, seed=4), "w2": zeroed(weights(6, 8, seed=5), zero, axis=1), "wout": weights(8, 3, seed=6)}
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (int64[1,4] ids) => (float[1,4,3] y) {
      e = Gather (emb, ids)
      h = Add (e, pos)
      n = LayerNormalization <axis = -1> (h, g1, b1)
      f = MatMul (n, w1)
      a = Relu (f)
      d = MatMul (a, w2)
      r = Add (h, d)
      y = MatMul (r, wout)
    }""", **w)
    trace = trace_of(model)
    hidden = group_of(trace, "Gather_0", Role.OUT)
    assert trace.node_kind["Gather_0"] == Kind.EMBEDDING and trace.node_kind["LayerNormalization_2"] == Kind.LAYER_NORM
    assert hidden.size == 8 and {m.node for m in hidden.members if m.role == Role.OUT} == {"Gather_0", "MatMul_5"}
    result = prune_l1(model)
    kept = [c for c in range(8) if c not in zero]
    assert initializer(result.model, "emb").shape == (10, 4) and initializer(result.model, "pos").shape == (1, 4, 4)
    assert initializer(result.model, "g1").shape == (4,) and initializer(result.model, "wout").shape == (4, 3)
    ids = np.array([[3, 0, 9, 4]], dtype=np.int64)
    s = {k: v[..., kept] if k in ("emb", "pos", "g1", "b1", "w2") else v for k, v in w.items()}
    s["w1"], s["wout"] = w["w1"][kept], w["wout"][kept]
    h = s["emb"][ids] + s["pos"]
    n = _layer_norm(h, s["g1"], s["b1"])
    f = np.maximum(n @ s["w1"], 0)  # the FFN group is pruned too: its zero-scored half goes, numpy keeps it all
    ffn_keep = result.plan.for_group(group_of(trace, "MatMul_3", Role.OUT).index)
    assert ffn_keep is not None and ffn_keep.kept == 3
    pruned = _run_feeds(result.model, {"ids": ids})
    ffn = [i for i, c in enumerate(group_of(trace, "MatMul_3", Role.OUT).classes) if c not in ffn_keep.pruned]
    expected = (h + f[..., ffn] @ s["w2"][ffn]) @ s["wout"]
    np.testing.assert_allclose(pruned, expected, rtol=1e-4, atol=1e-4)


def _rmsnorm(dtype: str) -> str:
    """x [1, 4, 8] -> MatMul wa -> RMSNorm as exporters decompose it (Pow, ReduceMean, Add eps, Sqrt, Reciprocal, Mul,
    Mul gamma) -> MatMul wb -> y [1, 4, 3], in `dtype`."""
    return f"""<ir_version: 8, opset_import: ["" : 17]>
    g ({dtype}[1,4,8] x) => ({dtype}[1,4,3] y) {{
      h = MatMul (x, wa)
      p = Pow (h, two)
      ms = ReduceMean <axes = [-1]> (p)
      ae = Add (ms, eps)
      sq = Sqrt (ae)
      inv = Reciprocal (sq)
      nn = Mul (h, inv)
      n = Mul (nn, gamma)
      y = MatMul (n, wb)
    }}"""


def test_rmsnorm_as_exporters_decompose_it_passes_the_hidden_size() -> None:
    """Pow, ReduceMean over the channels, Add eps, Sqrt, Reciprocal, Mul, Mul gamma: the mean runs over the kept
    channels and is scaled back to the original's count, so zero channels prune away with the outputs unchanged."""
    zero = (0, 6)
    w = {"wa": zeroed(weights(8, 8), zero, axis=1), "gamma": weights(8, seed=1), "wb": weights(8, 3, seed=2),
         "two": np.array(2.0), "eps": np.array(1e-6)}
    model = parse(_rmsnorm("float"), **w)
    trace = trace_of(model)
    assert trace.node_kind["ReduceMean_2"] == Kind.CHANNEL_MEAN
    result = prune_l1(model, ratio=0.25)
    assert initializer(result.model, "wa").shape == (8, 6) and initializer(result.model, "gamma").shape == (6,)
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    h = x @ w["wa"]
    expected = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * w["gamma"] @ w["wb"]
    np.testing.assert_allclose(_run_feeds(result.model, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in result.model.graph.node].count("Mul") == 3  # the mean's scale 6/8 joins x / rms, gamma


def test_a_float16_rmsnorm_scales_its_mean_in_its_own_type() -> None:
    """The mean's scale is a float16 constant in a float16 model (its inner tensors carry no types): the pruned model
    passes strict shape inference and gives the original's outputs on zero channels."""
    model = onnx.parser.parse_model(_rmsnorm("float16"))
    values = {"wa": zeroed(weights(8, 8), (0, 6), axis=1), "gamma": weights(8, seed=1), "wb": weights(8, 3, seed=2),
              "two": np.array(2.0), "eps": np.array(1e-3)}
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float16), k) for k, v in values.items())
    result = prune_l1(model, ratio=0.25)
    scale = next(t for t in result.model.graph.initializer if t.name.endswith("_kept_share"))
    assert scale.data_type == onnx.TensorProto.FLOAT16 and numpy_helper.to_array(scale).ravel().tolist() == [0.75]
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float16)
    np.testing.assert_array_equal(_run_feeds(result.model, {"x": x}), _run_feeds(model, {"x": x}))


@pytest.mark.parametrize("qdq", [False, True])
def test_class_token_and_a_dynamic_flatten_follow_the_hidden_size(qdq: bool) -> None:
    """timm's ViT stem with a dynamic batch: Conv, Shape/Slice/Concat/Reshape (flatten(2)), Transpose, Concat with an
    expanded class token, position embedding; a channel-count read into the attention's merge shape is pinned.
    `qdq`: the expanded token passes an activation QuantizeLinear / DequantizeLinear pair (onnxruntime's QDQ form).

    The class token and the filters of the removed channels are zero (they quantize to the zero point), so the
    outputs are unchanged.
    """
    zero = (1, 2)
    pair = """qs = Constant <value = float {0.02}> ()
      qz = Constant <value = uint8 {128}> ()
      ctq = QuantizeLinear (ct, qs, qz)
      ctd = DequantizeLinear (ctq, qs, qz)
      tok = Concat <axis = 1> (ctd, t)""" if qdq else "tok = Concat <axis = 1> (ct, t)"
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[B,1,4,4] x) => (float[B,5,2] y) {
      c = Conv <strides = [2, 2], kernel_shape = [2, 2]> (x, wc)
      sh = Shape (c)
      sl = Slice (sh, s0, s2, s0)
      tg = Concat <axis = 0> (sl, minus1)
      f = Reshape (c, tg)
      t = Transpose <perm = [0, 2, 1]> (f)
      sh2 = Shape (t)
      b = Gather <axis = 0> (sh2, i0)
      bu = Unsqueeze (b, s0)
      ex = Concat <axis = 0> (bu, minus1, minus1)
      one = ConstantOfShape <value = int64[1] {1}> (three)
      neg = Mul (one, minus1)
      eq = Equal (ex, neg)
      es = Where (eq, one, ex)
      ct = Expand (cls, es)
      """ + pair + """
      h = Add (tok, pos)
      hc = Gather <axis = 0> (sh2, i2)
      hu = Unsqueeze (hc, s0)
      five = Constant <value = int64[1] {5}> ()
      mt = Concat <axis = 0> (bu, five, hu)
      hr = Reshape (h, mt)
      y = MatMul (hr, wo)
    }""", wc=zeroed(weights(4, 1, 2, 2), zero), s0=np.array([0]), s2=np.array([2]), minus1=np.array([-1]),
        i0=np.array(0), i2=np.array(2), three=np.array([3]), cls=zeroed(weights(1, 1, 4, seed=1), zero, axis=2),
        pos=zeroed(weights(1, 5, 4, seed=2), zero, axis=2), wo=weights(4, 2, seed=3))
    group = group_of(trace_of(model), "Conv_0", Role.OUT)
    assert group.size == 4 and group.prunable == 4
    result = prune_l1(model)
    assert initializer(result.model, "cls").shape == (1, 1, 2) and initializer(result.model, "wo").shape == (2, 2)
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run_feeds(result.model, {"x": x}), _run_feeds(model, {"x": x}), rtol=1e-5, atol=1e-5)


def test_heads_ffn_and_hidden_take_their_own_ratios() -> None:
    """``--heads 0 --hidden 0``: only the FFN loses its half; the parts are told apart by their members."""
    from .. import api
    from ..channels import TransformerPart, transformer_part

    w = {"emb": weights(10, 8), "pos": weights(1, 4, 8, seed=1), "g1": weights(8, seed=2), "b1": weights(8, seed=3),
         "w1": weights(8, 6, seed=4), "w2": weights(6, 8, seed=5), "wout": weights(8, 3, seed=6)}
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (int64[1,4] ids) => (float[1,4,3] y) {
      e = Gather (emb, ids)
      h = Add (e, pos)
      n = LayerNormalization <axis = -1> (h, g1, b1)
      f = MatMul (n, w1)
      a = Relu (f)
      d = MatMul (a, w2)
      r = Add (h, d)
      y = MatMul (r, wout)
    }""", **w)
    trace = trace_of(model)
    parts = {transformer_part(trace.node_kind, g) for g in trace.groups if not g.is_frozen}
    assert parts == {TransformerPart.HIDDEN, TransformerPart.FFN}
    result = api.prune(model, "l1", 0.5, latency=False, params={"hidden": 0.0})
    assert initializer(result.model, "emb").shape == (10, 8) and initializer(result.model, "w1").shape == (8, 3)
    heads = parse(_attention_text(), wq=weights(8, 8), bq=weights(8, seed=1), wk=weights(8, 8, seed=2),
                  wv=weights(8, 8, seed=3), wo=weights(8, 8, seed=4), split=np.array([1, 4, 4, 2]),
                  merge=np.array([1, 4, 8]), scale=np.array(0.7), mask=weights(1, 1, 1, 4, seed=5))
    kept = api.prune(heads, "l1", 0.5, latency=False, params={"heads": 0.25})
    assert initializer(kept.model, "wq").shape == (8, 6)  # 1 of 4 heads


def test_l1_scores_a_head_with_its_output_projection_rows() -> None:
    """The issue's oracle: heads 1 and 3 have zero V columns and zero output-projection rows, so they contribute
    nothing, though their Q and K are the largest. ``l1`` counts every weight a head owns (Q, K, V columns and its
    rows of the output projection) and removes exactly them; Q, K and V alone would remove two others."""
    from .. import api
    from ..analysis.score import l1

    # every weight of magnitude 1 (random signs), so the scores are exact: a kept head owns 3 x 16 producer weights
    # and 16 output-projection weights (64); heads 1 and 3 own 2 x 16 x 1.75 = 56 in Q and K and nothing else
    signs = [np.sign(weights(8, 8, seed=s)).astype(np.float32) for s in range(4)]
    big = np.ones(8, dtype=np.float32)
    big[list(ZERO_HEADS)] = 1.75
    wo = signs[3].copy()
    wo[list(ZERO_HEADS), :] = 0.0
    model = parse(
        _attention_text(),
        wq=signs[0] * big, bq=weights(8, seed=1), wk=signs[1] * big, wv=zeroed(signs[2], ZERO_HEADS, axis=1), wo=wo,
        split=np.array([1, 4, 4, 2]), merge=np.array([1, 4, 8]), scale=np.array(0.7), mask=weights(1, 1, 1, 4, seed=5),
    )
    analysis = api.analyze(model)
    group = group_of(analysis.trace, "MatMul_0", Role.OUT)
    qkv_only = sum(np.abs(initializer(model, n)).reshape(8, 4, 2).sum(axis=(0, 2)) for n in ("wq", "wk", "wv"))
    assert qkv_only.tolist() == [48, 56, 48, 56]  # the producers' weights alone would keep heads 1 and 3
    assert l1(analysis.trace, analysis.graph, group).tolist() == [64, 56, 64, 56]
    result = prune_l1(model)
    assert initializer(result.model, "wq").shape == (8, 4) and initializer(result.model, "wo").shape == (4, 8)
    assert_same_outputs(model, result.model)


def _dynamic_llama_block(wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray) -> onnx.ModelProto:
    """A Llama attention block as the TorchScript exporter writes it with a dynamic batch and sequence: 4 query heads
    and 2 K/V heads of size 4; the Reshape targets, RoPE's half-size slices and repeat_kv's Expand / Reshape shapes
    are all read off the tensors at run time (``Gather(Shape(t), i)``); cos / sin cut from cached tables by S."""
    rope = ""
    for t in ("q", "k"):
        rope += f"""
      {t}s = Shape ({t}t)
      {t}d = Gather <axis = 0> ({t}s, i3)
      {t}half = Div ({t}d, two)
      {t}hu = Unsqueeze ({t}half, ax0)
      {t}1 = Slice ({t}t, zero, {t}hu, ax3)
      {t}2 = Slice ({t}t, {t}hu, big, ax3)
      {t}n = Neg ({t}2)
      {t}rot = Concat <axis = -1> ({t}n, {t}1)
      {t}c = Mul ({t}t, cos)
      {t}r = Mul ({t}rot, sin)
      {t}e = Add ({t}c, {t}r)"""
    repeat = ""
    for t, src in (("rk", "ke"), ("rv", "vt")):
        repeat += f"""
      {t}sh = Shape ({src})
      {t}b = Gather <axis = 0> ({t}sh, i0)
      {t}h = Gather <axis = 0> ({t}sh, i1)
      {t}n2 = Gather <axis = 0> ({t}sh, i2)
      {t}d2 = Gather <axis = 0> ({t}sh, i3)
      {t}bu = Unsqueeze ({t}b, ax0)
      {t}huu = Unsqueeze ({t}h, ax0)
      {t}nu = Unsqueeze ({t}n2, ax0)
      {t}du = Unsqueeze ({t}d2, ax0)
      {t}5 = Concat <axis = 0> ({t}bu, {t}huu, rep, {t}nu, {t}du)
      {t}5f = Reshape ({t}5, m1)
      {t}eq = Equal ({t}5f, neg5)
      {t}5w = Where ({t}eq, ones5, {t}5f)
      {t}u = Unsqueeze ({src}, ax2)
      {t}x = Expand ({t}u, {t}5w)
      {t}hm = Mul ({t}h, two)
      {t}hmu = Unsqueeze ({t}hm, ax0)
      {t}4 = Concat <axis = 0> ({t}bu, {t}hmu, {t}nu, {t}du)
      {t}rep4 = Reshape ({t}x, {t}4)"""
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[B,S,8] x) => (float[B,S,8] y) {
      sh = Shape (x)
      b = Gather <axis = 0> (sh, i0)
      n = Gather <axis = 0> (sh, i1)
      bu = Unsqueeze (b, ax0)
      nu = Unsqueeze (n, ax0)
      split = Concat <axis = 0> (bu, nu, m1, four)
      q = MatMul (x, wq)
      k = MatMul (x, wk)
      v = MatMul (x, wv)
      qh = Reshape (q, split)
      kh = Reshape (k, split)
      vh = Reshape (v, split)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      kt = Transpose <perm = [0, 2, 1, 3]> (kh)
      vt = Transpose <perm = [0, 2, 1, 3]> (vh)
      cos = Slice (cos_table, zero, nu, zero)
      sin = Slice (sin_table, zero, nu, zero)""" + rope + repeat + """
      ktt = Transpose <perm = [0, 1, 3, 2]> (rkrep4)
      s = MatMul (qe, ktt)
      p = Softmax <axis = -1> (s)
      o = MatMul (p, rvrep4)
      ot = Transpose <perm = [0, 2, 1, 3]> (o)
      merge = Concat <axis = 0> (bu, nu, width)
      om = Reshape (ot, merge)
      y = MatMul (om, wo)
    }""", wq=wq, wk=wk, wv=wv, wo=wo, i0=np.array(0), i1=np.array(1), i2=np.array(2), i3=np.array(3),
        two=np.array(2), ax0=np.array([0]), ax2=np.array([2]), ax3=np.array([3]), zero=np.array([0]),
        big=np.array([1 << 30]), m1=np.array([-1]), four=np.array([4]), rep=np.array([2]), neg5=np.full(5, -1),
        ones5=np.ones(5, dtype=np.int64), width=np.array([16]), cos_table=np.cos(weights(32, 4, seed=9)),
        sin_table=np.sin(weights(32, 4, seed=9)))
    return model


def test_dynamic_llama_export_prunes_a_gqa_group_when_the_shape_is_known() -> None:
    """RoPE and repeat_kv read head sizes and counts at run time: traced at a known shape, those reads of fixed dims
    fold, a K/V head prunes with its query heads, and the model stays dynamic (exact on another batch and length)."""
    model = _dynamic_llama_block(
        wq=zeroed(weights(8, 16), tuple(range(8, 16)), axis=1), wk=zeroed(weights(8, 8, seed=1), (4, 5, 6, 7), axis=1),
        wv=zeroed(weights(8, 8, seed=2), (4, 5, 6, 7), axis=1), wo=zeroed(weights(16, 8, seed=3), tuple(range(8, 16))))
    from .. import api

    analysis = api.analyze(model, input_shapes={"x": (1, 6, 8)})
    group = group_of(analysis.trace, "MatMul_6", Role.OUT)  # q_proj
    assert group.size == 2 and group.prunable == 2  # a class per GQA group: K/V head j with query heads 2j, 2j + 1
    assert any("run-time shape reads" in n for n in analysis.notes)  # said in the dry-run and the report
    result = api.prune(model, "l1", 0.5, input_shapes={"x": (1, 6, 8)}, latency=False)
    assert initializer(result.model, "wq").shape == (8, 8) and initializer(result.model, "wk").shape == (8, 4)
    assert initializer(result.model, "wo").shape == (8, 8)
    dims = [d.dim_param or d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "S", 8]
    assert any(n.op_type == "Shape" for n in result.model.graph.node)  # batch and length are still read at run time
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)  # not the traced shape
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)

