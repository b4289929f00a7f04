"""Which normalisation reads a tensor: recovery compares a block's output as that norm sees it (`recover.fit`).

An error on a residual stream reaches every later layer through a norm over the hidden size: a LayerNorm
centres each token and divides it by its standard deviation, an RMSNorm divides it by its root mean square.
Tokens differ widely in that spread (BERT's tenfold; a Llama model's first token carries "massive activations",
SmolLM2-135M's residual stream at layer 20 holds 99% of its squared values in 1% of the tokens), so an error
compared unweighted is an error on those few tokens only. Found here: the norm ops over the last axis, and the
decompositions exporters write for them (PyTorch's Llama RMSNorm: ``Cast, Pow 2, ReduceMean, Add eps, Sqrt,
Div / Reciprocal, Mul``; a LayerNorm before opset 17: ``ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div``).

Pure graph analysis: no torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx

from .read import to_array


class NormKind(str, Enum):
    LAYER = "layer"  # centred over the last axis, then divided by its standard deviation
    RMS = "rms"  # divided by its root mean square over the last axis, not centred


@dataclass(frozen=True)
class NormRead:
    """The norm over the last axis that reads a tensor."""

    kind: NormKind
    epsilon: float


#: norm ops over an ``axis`` attribute (default -1), by what they compute
NORM_OPS = {"LayerNormalization": NormKind.LAYER, "SimplifiedLayerNormalization": NormKind.RMS,
            "RMSNormalization": NormKind.RMS}
#: element types a Cast may pass a value on in (a Cast to float before an RMSNorm)
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


@dataclass(frozen=True)
class _Node:
    op_type: str
    input: tuple[str, ...]
    output: tuple[str, ...]
    attrs: Mapping[str, object]


class _Graph:
    """The readers of every tensor and the constants (initializers and Constant nodes) of a model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.readers: dict[str, list[_Node]] = defaultdict(list)
        self.constants: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            node = _Node(n.op_type, tuple(n.input), tuple(n.output),
                         {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
            for name in node.input:
                if name:
                    self.readers[name].append(node)
            value = node.attrs.get("value")
            if node.op_type == "Constant" and node.output and isinstance(value, onnx.TensorProto):
                self.constants[node.output[0]] = value

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else to_array(tensor)

    def scalar(self, node: _Node, other_than: str) -> float | None:
        """The one-element constant operand of a binary `node` whose other operand is `other_than`."""
        if len(node.input) != 2 or other_than not in node.input:
            return None
        value = self.constant(node.input[1] if node.input[0] == other_than else node.input[0])
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def only(self, name: str, op: str) -> _Node | None:
        """The reader of `name` of type `op`, when exactly one is."""
        found = [n for n in self.readers.get(name, ()) if n.op_type == op]
        return found[0] if len(found) == 1 else None

    def last_axis_mean(self, node: _Node) -> bool:
        """A ReduceMean over the last axis only, keeping it (``axes`` an attribute, or an input from opset 18)."""
        if node.op_type != "ReduceMean" or node.attrs.get("keepdims", 1) != 1:
            return False
        axes = node.attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.constant(node.input[1])
            axes = None if value is None else value.reshape(-1).tolist()
        return isinstance(axes, (list, tuple)) and list(axes) == [-1]

    def root_of_mean_square(self, squared_of: str) -> float | None:
        """The epsilon of ``sqrt(mean(x ** 2, -1) + eps)`` built from `squared_of` (``x``), read back by a
        Div or Mul with ``x`` (None when the chain is not there)."""
        for power in self.readers.get(squared_of, ()):
            if power.op_type != "Pow" or power.input[0] != squared_of or self.scalar(power, squared_of) != 2.0:
                continue
            mean = self.only(power.output[0], "ReduceMean")
            if mean is None or not self.last_axis_mean(mean):
                continue
            add = self.only(mean.output[0], "Add")
            eps = None if add is None else self.scalar(add, mean.output[0])
            root = None if add is None else self.only(add.output[0], "Sqrt")
            if eps is not None and root is not None and self._divides(squared_of, root.output[0]):
                return eps
        return None

    def _divides(self, x: str, root: str) -> bool:
        """``x / root`` or ``x * (1 / root)`` (a Reciprocal, or a Div of a constant by it)."""
        for node in self.readers.get(root, ()):
            if node.op_type == "Div" and node.input == (x, root):
                return True
            if node.op_type == "Reciprocal" or (node.op_type == "Div" and node.input[1] == root):
                if any(m.op_type == "Mul" and x in m.input for m in self.readers.get(node.output[0], ())):
                    return True
        return False


def _read(graph: _Graph, name: str) -> NormRead | None:
    for node in graph.readers.get(name, ()):
        kind = NORM_OPS.get(node.op_type)
        if kind is not None and node.input[0] == name:
            if node.attrs.get("axis", -1) == -1:  # a positive last axis is rare in exports: treated as no norm
                epsilon = node.attrs.get("epsilon", 1e-5)
                return NormRead(kind, float(epsilon) if isinstance(epsilon, (int, float)) else 1e-5)
        passes = node.op_type == "Identity" or (node.op_type == "Cast" and node.attrs.get("to") in FLOAT_TYPES)
        if passes and (through := _read(graph, node.output[0])) is not None:
            return through
    eps = graph.root_of_mean_square(name)
    if eps is not None:
        return NormRead(NormKind.RMS, eps)
    for mean in graph.readers.get(name, ()):  # a decomposed LayerNorm: x - mean(x), then its RMS
        if not graph.last_axis_mean(mean):
            continue
        for sub in graph.readers.get(mean.output[0], ()):
            if sub.op_type == "Sub" and sub.input == (name, mean.output[0]):
                eps = graph.root_of_mean_square(sub.output[0])
                if eps is not None:
                    return NormRead(NormKind.LAYER, eps)
    return None


def norms_reading(model: onnx.ModelProto, names: Sequence[str]) -> list[NormRead | None]:
    """Per name, the norm over the last axis that reads it (None: none does)."""
    graph = _Graph(model)
    return [_read(graph, name) for name in names]
