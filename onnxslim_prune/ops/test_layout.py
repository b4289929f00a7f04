"""Concat offsets, Split sizes, Slice bounds and the Flatten block mapping, with exact outputs."""

from __future__ import annotations

import numpy as np

from ..channels import ChannelMap, Kind, Role
from .layout import reshape_channel_map
from onnx import numpy_helper

from .testing import assert_same_outputs, group_of, initializer, parse, prune_l1, trace_of, weights, zeroed


def test_flatten_block_mapping_repeats_each_channel_over_its_positions() -> None:
    mapped = reshape_channel_map((1, 3, 2, 2), (1, 12), ChannelMap(1, np.array([7, 8, 9])))
    assert mapped is not None and mapped.axis == 1
    assert mapped.atoms.tolist() == [7] * 4 + [8] * 4 + [9] * 4
    assert reshape_channel_map((1, 4, 3), (1, 2, 6), ChannelMap(1, np.arange(4))) is None  # splits the channels


def test_concat_of_two_sources_feeds_one_consumer() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
      a = Conv (x, w1)
      b = Conv (x, w2)
      c = Concat <axis = 1> (a, b)
      y = Conv (c, w3)
    }""", w1=zeroed(weights(4, 3, 1, 1), (0, 1)), w2=zeroed(weights(4, 3, 1, 1, seed=1), (2, 3)), w3=weights(2, 8, 1, 1))
    trace = trace_of(model)
    assert trace.node_kind["Concat_2"] == Kind.CONCAT
    assert ("Concat_2", Role.CONCAT) in {(m.node, m.role) for m in group_of(trace, "Conv_0", Role.OUT).members}
    result = prune_l1(model)
    assert initializer(result.model, "w3").shape == (2, 4, 1, 1)
    assert_same_outputs(model, result.model)


def test_split_sizes_and_flatten_into_gemm_are_recounted() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,2,2] x) => (float[1,3] y, float[1,2,2,2] z) {
      a = Conv (x, w1)
      p, q = Split <axis = 1> (a, sizes)
      f = Flatten (p)
      y = Gemm (f, wg)
      z = Conv (q, w2)
    }""", w1=zeroed(weights(8, 3, 1, 1), (0, 1, 4, 5)), sizes=np.array([4, 4]), wg=weights(16, 3), w2=weights(2, 4, 1, 1))
    trace = trace_of(model)
    assert trace.node_kind["Split_1"] == Kind.SPLIT and trace.node_kind["Flatten_2"] == Kind.FLATTEN
    result = prune_l1(model)
    assert initializer(result.model, "wg").shape == (8, 3)  # 2 kept channels x 4 positions
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    sizes = next(t for t in result.model.graph.initializer if t.name == split.input[1])
    assert numpy_helper.to_array(sizes).tolist() == [2, 2]  # opset 13: the sizes input, recounted
    assert_same_outputs(model, result.model)


def test_slice_bounds_are_recounted_over_kept_channels() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
      a = Conv (x, w1)
      s = Slice (a, starts, ends, axes)
      y = Conv (s, w2)
    }""", w1=zeroed(weights(8, 3, 1, 1), (1, 2, 3, 5)), starts=np.array([2]), ends=np.array([8]), axes=np.array([1]),
        w2=weights(2, 6, 1, 1))
    trace = trace_of(model)
    assert trace.node_kind["Slice_1"] == Kind.SLICE
    result = prune_l1(model)
    # removed 1, 2, 3, 5: kept 0, 4, 6, 7; the slice [2, 8) took 4, 6, 7 of them -> [1, 4)
    assert initializer(result.model, "starts").tolist() == [1] and initializer(result.model, "ends").tolist() == [4]
    assert initializer(result.model, "w2").shape == (2, 3, 1, 1)
    assert_same_outputs(model, result.model)
