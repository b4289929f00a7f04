"""Helpers of the op-family tests beside each rule: models in ONNX text syntax, weights by name.

    model = parse('''<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,5,8,8] y) { h = Conv (x, w1) ... }''', w1=..., w2=...)

Weights are given as numpy arrays and added as float32 (integer arrays: int64) initializers; `zeroed` makes a weight
whose chosen output channels are zero, so L1 pruning removes exactly them and the pruned
model must compute the original's outputs (`assert_same_outputs`): a numeric oracle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

from .. import api
from ..channels import Group, Trace


def parse(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, value in weights.items():
        array = np.asarray(value)
        array = array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)  # shapes stay int64
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, *shape]).standard_normal(shape).astype(np.float32)


def zeroed(w: np.ndarray, channels: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """`w` with the given channels along `axis` set to zero (the smallest L1 norm: pruned first)."""
    out = w.copy()
    index: list[Any] = [slice(None)] * out.ndim
    index[axis] = list(channels)
    out[tuple(index)] = 0.0
    return out


def trace_of(model: onnx.ModelProto) -> Trace:
    return api.analyze(model).trace


def group_of(trace: Trace, node: str, role: str) -> Group:
    return next(g for g in trace.groups if any(m.node == node and m.role == role for m in g.members))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The pruned value of initializer `name` (a renamed copy `name__node` where the rule had to copy it)."""
    found = [t for t in model.graph.initializer if t.name == name or t.name.startswith(f"{name}__")]
    assert found, f"no initializer {name}"
    return numpy_helper.to_array(found[0])


def attribute(model: onnx.ModelProto, node: str, name: str) -> object:
    n = next(n for n in model.graph.node if n.name == node or node in n.output)
    return onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == name))


def assert_same_outputs(original: onnx.ModelProto, pruned: onnx.ModelProto, seed: int = 0) -> None:
    import onnxruntime as ort

    feeds = {}
    for i in original.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
            for m in (original, pruned)]
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def prune_l1(model: onnx.ModelProto, ratio: float = 0.5) -> api.PruneResult:
    return api.prune(model, "l1", ratio, latency=False)
