"""Conv, ConvTranspose, Gemm, MatMul: sources and consumers, sliced weights, exact outputs, MACs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from .. import ir
from ..judge import validate
from ..calib import conv_patches
from ..channels import Kind, Role
from . import lookup
from .registry import OpRule
from .testing import assert_same_outputs, attribute, group_of, initializer, parse, prune_l1, trace_of, weights, zeroed

OPSET13 = '<ir_version: 8, opset_import: ["" : 13]>'


def test_conv_pair_removes_the_zero_filters_exactly() -> None:
    model = parse(f"""{OPSET13}
    g (float[1,3,8,8] x) => (float[1,5,8,8] y) {{
      h = Conv <pads = [1,1,1,1]> (x, w1, b1)
      r = Relu (h)
      y = Conv <pads = [1,1,1,1]> (r, w2)
    }}""", w1=zeroed(weights(4, 3, 3, 3), (1, 2)), b1=zeroed(weights(4), (1, 2)), w2=weights(5, 4, 3, 3))
    trace = trace_of(model)  # nodes are named op_index on load
    first = group_of(trace, "Conv_0", Role.OUT)
    assert first.size == 4 and first.prunable == 4
    assert {(m.node, m.role) for m in first.members} == {("Conv_0", Role.OUT), ("Relu_1", Role.PASS), ("Conv_2", Role.IN)}
    assert group_of(trace, "Conv_2", Role.OUT).is_frozen  # a graph output keeps its channels
    assert trace.node_kind == {"Conv_0": Kind.CONV, "Conv_2": Kind.CONV}
    # MACs = |W| * H_out * W_out * N
    assert first.macs == 4 * 3 * 9 * 64 + 5 * 4 * 9 * 64
    result = prune_l1(model)
    assert initializer(result.model, "w1").shape == (2, 3, 3, 3)
    assert initializer(result.model, "b1").shape == (2,)
    assert initializer(result.model, "w2").shape == (5, 2, 3, 3)
    assert_same_outputs(model, result.model)


def test_depthwise_conv_couples_input_and_output_and_recounts_group() -> None:
    model = parse(f"""{OPSET13}
    g (float[1,3,8,8] x) => (float[1,5,8,8] y) {{
      a = Conv (x, w1)
      d = Conv <group = 4, pads = [1,1,1,1]> (a, wd)
      y = Conv (d, w2)
    }}""", w1=zeroed(weights(4, 3, 1, 1), (0, 3)), wd=weights(4, 1, 3, 3), w2=weights(5, 4, 1, 1))
    trace = trace_of(model)
    assert trace.node_kind["Conv_1"] == Kind.DEPTHWISE
    assert (("Conv_1", Role.DEPTHWISE)) in {(m.node, m.role) for m in group_of(trace, "Conv_0", Role.OUT).members}
    result = prune_l1(model)
    assert initializer(result.model, "wd").shape == (2, 1, 3, 3)
    assert attribute(result.model, "d", "group") == 2
    assert_same_outputs(model, result.model)


def test_gemm_trans_b_and_matmul_slice_rows_and_columns() -> None:
    model = parse(f"""{OPSET13}
    g (float[2,6] x) => (float[2,3] y) {{
      h = Gemm <transB = 1> (x, w1, b1)
      r = Relu (h)
      y = MatMul (r, w2)
    }}""", w1=zeroed(weights(8, 6), (0, 5, 6)), b1=zeroed(weights(8), (0, 5, 6)), w2=weights(8, 3))
    trace = trace_of(model)
    assert trace.node_kind == {"Gemm_0": Kind.GEMM, "MatMul_2": Kind.MATMUL}
    assert [s.axis for s in trace.sources] == [0, 1]  # the weight axis of the output channels
    result = prune_l1(model, 0.375)
    assert initializer(result.model, "w1").shape == (5, 6)  # transB: [N, K], N sliced
    assert initializer(result.model, "w2").shape == (5, 3)  # [K, N], K sliced
    assert_same_outputs(model, result.model)


def test_conv_transpose_slices_its_output_axis() -> None:
    model = parse(f"""{OPSET13}
    g (float[1,3,4,4] x) => (float[1,2,8,8] y) {{
      u = ConvTranspose <strides = [2,2], kernel_shape = [2,2]> (x, wt)
      y = Conv (u, w2)
    }}""", wt=zeroed(weights(3, 4, 2, 2), (1, 2), axis=1), w2=weights(2, 4, 1, 1))
    assert trace_of(model).node_kind["ConvTranspose_0"] == Kind.CONV_TRANSPOSE
    result = prune_l1(model)
    assert initializer(result.model, "wt").shape == (3, 2, 2, 2)
    assert_same_outputs(model, result.model)


def _affine_case(text: str, **ws: np.ndarray) -> tuple[onnx.ModelProto, gs.Graph, gs.Node, OpRule]:
    model = parse(text, **ws)
    graph = ir.to_graph(model)
    node = graph.nodes[0]
    rule = lookup(node.domain, node.op, 13)
    assert rule is not None
    return model, graph, node, rule


@pytest.mark.parametrize("kind, text, ws", [
    (Kind.CONV, """g (float[2,3,5,5] x) => (float[2,4,3,3] y) { y = Conv (x, w, b) }""",
     {"w": weights(4, 3, 3, 3), "b": weights(4, seed=1)}),
    (Kind.GEMM, """g (float[2,6] x) => (float[2,4] y) { y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, b) }""",
     {"w": weights(4, 6), "b": weights(4, seed=1)}),
    (Kind.MATMUL, """g (float[2,6] x) => (float[2,4] y) { m = MatMul (x, w)  y = Add (m, b) }""",
     {"w": weights(6, 4), "b": weights(4, seed=1)}),
])
def test_the_affine_form_reproduces_the_layer_and_writes_back(kind: Kind, text: str, ws: dict[str, np.ndarray]) -> None:
    """``Y = X W + b`` on rows (im2col for a Conv) equals onnxruntime's output to 1e-5; writing W' = 2W, b' = b + 1 back
    gives the layer ``2 X W + b + 1``."""
    model, graph, node, rule = _affine_case(f"{OPSET13}\n{text}", **ws)
    affine = rule.read_affine(node, kind)
    assert affine is not None and affine.b is not None and affine.w.shape[1] == 4
    x = np.random.default_rng(0).standard_normal(tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim))
    x = x.astype(np.float32)
    rows = conv_patches(x, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)) if kind == Kind.CONV else x

    def layer_rows(m: onnx.ModelProto) -> np.ndarray:
        y = validate.session(m).run(None, {"x": x})[0]
        return y.transpose(0, 2, 3, 1).reshape(-1, 4) if kind == Kind.CONV else y

    np.testing.assert_allclose(rows @ affine.w + affine.b, layer_rows(model), rtol=1e-5, atol=1e-5)
    rule.write_affine(node, kind, 2 * affine.w, affine.b + 1)
    np.testing.assert_allclose(layer_rows(ir.to_model(graph, like=model)), 2 * (rows @ affine.w) + affine.b + 1,
                               rtol=1e-5, atol=1e-5)


def test_grouped_conv_has_no_affine_form_and_gemm_indexes_inputs_by_trans_b() -> None:
    _, _, conv, rule = _affine_case(f"""{OPSET13}
    g (float[1,4,5,5] x) => (float[1,4,5,5] y) {{ y = Conv <group = 2> (x, w) }}""", w=weights(4, 2, 1, 1))
    assert rule.read_affine(conv, Kind.GROUPED) is None
    assert rule.weight_in_axis(conv, Kind.GROUPED) == 1
    _, _, gemm, rule = _affine_case(f"""{OPSET13}
    g (float[2,6] x) => (float[2,4] y) {{ y = Gemm <transB = 1> (x, w) }}""", w=weights(4, 6))
    assert rule.weight_in_axis(gemm, Kind.GEMM) == 1
    affine = rule.read_affine(gemm, Kind.GEMM)
    assert affine is not None and affine.b is not None and not affine.b.any()  # no C: a zero bias the refit may set


def test_take2_gathers_the_same_bytes_as_fancy_indexing() -> None:
    from onnxslim_prune.ops.weighted import take2

    rng = np.random.default_rng(0)
    conv = rng.standard_normal((6, 5, 3, 3)).astype(np.float16)  # [out, in, kh, kw]
    gemm = rng.standard_normal((7, 9)).astype(np.float32).T  # a transposed view: not C-contiguous
    cases = [(conv, np.array([5, 0, 2]), np.array([1, 4])), (gemm, np.array([0, 3, 8]), np.array([6, -1, 2])),
             (gemm, np.array([], dtype=np.int64), np.array([1])),
             (conv, np.array([True, False, True, True, False, False]), np.array([0, 2, 3]))]
    for weight, keep0, keep1 in cases:
        got, want = take2(weight, keep0, keep1), weight[np.ix_(keep0, keep1)]
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
        assert got.tobytes() == want.tobytes()
