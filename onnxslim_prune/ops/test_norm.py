"""BatchNormalization parameters sliced; Softmax's rule chosen by opset range."""

from __future__ import annotations

import numpy as np

from ..channels import Kind, Role
from .registry import lookup
from .testing import assert_same_outputs, group_of, initializer, parse, prune_l1, trace_of, weights, zeroed


def test_batch_norm_parameters_follow_the_kept_channels() -> None:
    gone = (0, 3)
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,6,6] x) => (float[1,2,6,6] y) {
      h = Conv (x, w1)
      n = BatchNormalization (h, gamma, beta, mean, var)
      r = Relu (n)
      y = Conv (r, w2)
    }""", w1=zeroed(weights(4, 3, 1, 1), gone), gamma=weights(4) + 2, beta=zeroed(weights(4), gone),
        mean=np.zeros(4), var=np.ones(4), w2=weights(2, 4, 1, 1))
    trace = trace_of(model)
    assert trace.node_kind["BatchNormalization_1"] == Kind.NORM
    assert ("BatchNormalization_1", Role.NORM) in {(m.node, m.role) for m in group_of(trace, "Conv_0", Role.OUT).members}
    result = prune_l1(model)
    for name in ("gamma", "beta", "mean", "var"):
        assert initializer(result.model, name).shape == (2,)
    assert_same_outputs(model, result.model)


SOFTMAX = """<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1,3,4,4] x) => (float[1,4,4,4] y) {{
  h = Conv (x, w1)
  y = Softmax <axis = {axis}> (h)
}}"""


def test_softmax_before_opset_13_normalises_the_flattened_axes() -> None:
    assert type(lookup("", "Softmax", 11)).__name__ == "FlattenedAxisNormRule"
    assert type(lookup("ai.onnx", "Softmax", 13)).__name__ == "AxisNormRule"
    # opset 11, axis 3: the flattened axes from 3 on hold no channel; axis 1: they do
    passes = trace_of(parse(SOFTMAX.format(opset=11, axis=3), w1=weights(4, 3, 1, 1)))
    assert ("Softmax_1", Role.PASS) in {(m.node, m.role) for g in passes.groups for m in g.members}
    frozen = trace_of(parse(SOFTMAX.format(opset=11, axis=1), w1=weights(4, 3, 1, 1)))
    assert any("normalises across channels" in r for g in frozen.groups for r in g.reasons)
    # opset 13, axis 3: only the last axis is normalised
    assert not any("normalises" in r for g in trace_of(parse(SOFTMAX.format(opset=13, axis=3), w1=weights(4, 3, 1, 1))).groups
                   for r in g.reasons)
