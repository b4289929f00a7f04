"""The constant-operand rule: a bias-like constant on the channel axis is sliced; a broadcast one is not."""

from __future__ import annotations

import numpy as np

from ..channels import Kind, Role
from .elementwise import operand_channel_axis, sliced_axis
from .testing import assert_same_outputs, group_of, initializer, parse, prune_l1, trace_of, weights, zeroed


def test_aligned_axis_of_a_broadcast_operand() -> None:
    # output [N, C, H, W] with channels on axis 1
    assert operand_channel_axis((1, 4, 1, 1), 1, 4) == 1
    assert operand_channel_axis((4, 1, 1), 1, 4) == 0  # right-aligned: a_x = c - (r - r_x)
    assert operand_channel_axis((1, 1, 1), 1, 4) is None  # broadcasts over the channels
    assert operand_channel_axis((5,), 1, 4) is None  # too short to reach the channel axis
    assert sliced_axis((4, 1, 1), 1, 4, 4) == 0
    assert sliced_axis((4, 1, 1), 1, 4, 8) is None


def test_constant_operand_is_sliced_and_residual_operands_are_united() -> None:
    gone = (1, 2)
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,5,5] x) => (float[1,2,5,5] y) {
      a = Conv (x, w1)
      b = Conv (x, w2)
      s = Add (a, b)
      m = Mul (s, scale)
      t = Add (m, shift)
      y = Conv (t, w3)
    }""", w1=zeroed(weights(4, 3, 1, 1), gone), w2=zeroed(weights(4, 3, 1, 1, seed=1), gone),
        scale=weights(4, 1, 1) + 2, shift=zeroed(weights(1, 4, 1, 1), gone, axis=1), w3=weights(2, 4, 1, 1))
    trace = trace_of(model)
    group = group_of(trace, "Conv_0", Role.OUT)
    assert len(group.spaces) == 2  # both convs' outputs: one residual group
    assert trace.node_kind["Mul_3"] == Kind.CONST_OPERAND and trace.node_kind["Add_4"] == Kind.CONST_OPERAND
    result = prune_l1(model)
    assert initializer(result.model, "scale").shape == (2, 1, 1)
    assert initializer(result.model, "shift").shape == (1, 2, 1, 1)
    assert_same_outputs(model, result.model)


def test_an_untraced_operand_with_channels_freezes() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,5,5] x, float[1,4,1,1] z) => (float[1,2,5,5] y) {
      a = Conv (x, w1)
      s = Add (a, z)
      y = Conv (s, w2)
    }""", w1=weights(4, 3, 1, 1), w2=weights(2, 4, 1, 1))
    group = group_of(trace_of(model), "Conv_0", Role.OUT)
    assert group.is_frozen and any("an untraced operand has a channel dimension" in r for r in group.reasons)
    assert np.isfinite(group.macs)
