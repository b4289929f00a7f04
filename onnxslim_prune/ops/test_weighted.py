"""Conv, ConvTranspose, Gemm, MatMul: sources and consumers, sliced weights, exact outputs, MACs."""

from __future__ import annotations

from ..channels import Kind, Role
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
