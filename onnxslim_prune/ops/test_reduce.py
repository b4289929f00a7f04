"""Reductions over other axes pass the channels (moving the axis without keepdims); over them, freeze."""

from __future__ import annotations

import numpy as np

from ..channels import Role
from .testing import group_of, parse, trace_of, weights

REDUCE = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,4,4] x) => (float[1,{out}] y) {{
  a = Conv (x, w1)
  p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (a)
  r = ReduceMean <axes = {axes}, keepdims = 0> (p)
  y = Gemm (r, wg)
}}"""


def test_reduce_over_space_moves_nothing_but_the_axis() -> None:
    model = parse(REDUCE.format(out=5, axes="[2,3]"), w1=weights(4, 3, 1, 1), wg=weights(4, 5))
    trace = trace_of(model)
    group = group_of(trace, "Conv_0", Role.OUT)
    assert {(m.node, m.role) for m in group.members} >= {("MaxPool_1", Role.PASS), ("ReduceMean_2", Role.PASS),
                                                        ("Gemm_3", Role.IN)}
    assert trace.maps["r"].axis == 1 and trace.maps["r"].size == 4
    assert not group.is_frozen


def test_reduce_over_the_channels_freezes() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,4,4] x) => (float[1,1,4,4] y) {
      a = Conv (x, w1)
      y = ReduceSum <keepdims = 1> (a, axes)
    }""", w1=weights(4, 3, 1, 1), axes=np.array([1]))
    group = group_of(trace_of(model), "Conv_0", Role.OUT)
    assert group.is_frozen and any("reduces across channels" in r for r in group.reasons)
