"""The method a run uses when the user names none: the one that measured best for that kind of model.

Without calibration data every method that can run is a data-free criterion, and ``l1`` (Li et
al. 2017) is the documented default. With ``--calib`` the tool picks by the kind of model, from
the real-model suite (benchmarks/results/real_suite.md, eval data no run saw):

- a transformer (attention: a Softmax over a MatMul of two activations): ``obs``. all-MiniLM-L6-v2
  at 85% / 60% of the MACs: embedding cosine 0.968 / 0.881 against ldrf 0.934 / 0.853, contrib
  0.946 / 0.828 and the former default (l1 + refit) 0.943 / 0.689.
- anything else (CNNs, MLPs): ``thinet``. EfficientNet-Lite1 at 85% of the MACs: top-1 agreement
  63.8% against ldrf 58.0% and the former default 29.8% (at 75%: 44.2% / 44.5% / 13.7%, top-5
  76.2% / 72.3% / 28.8%), and the fastest of the three.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import onnx

DATA_FREE_DEFAULT = "l1"


class ModelKind(str, Enum):
    TRANSFORMER = "transformer"
    OTHER = "other"

    @property
    def described(self) -> str:
        return "a transformer" if self is ModelKind.TRANSFORMER else "a model without attention (CNN, MLP)"


DATA_DRIVEN_DEFAULTS: dict[ModelKind, str] = {ModelKind.TRANSFORMER: "obs", ModelKind.OTHER: "thinet"}
#: every method a run without ``--method`` may get (each is a channel method a search can allocate)
DEFAULT_METHODS = (DATA_FREE_DEFAULT, *DATA_DRIVEN_DEFAULTS.values())


@dataclass(frozen=True)
class DefaultMethod:
    """The method chosen for a run without ``--method``, and why (the report and the log say it)."""

    name: str
    reason: str


def _nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


_PASS_THROUGH = frozenset({"Add", "Mul", "Div", "Where", "Cast", "Sub", "DequantizeLinear", "QuantizeLinear"})
_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


def model_kind(model: onnx.ModelProto) -> ModelKind:
    """TRANSFORMER when some Softmax reads (through scaling, masking and casts) a MatMul of two activations."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    nodes = list(_nodes(graph))
    constants |= {out for n in nodes if n.op_type == "Constant" for out in n.output}
    producer = {out: n for n in nodes for out in n.output}
    if any(n.op_type in _ATTENTION_OPS for n in nodes):
        return ModelKind.TRANSFORMER
    for softmax in (n for n in nodes if n.op_type == "Softmax"):
        todo, seen = list(softmax.input[:1]), set()
        while todo:
            name = todo.pop()
            node = producer.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.op_type == "MatMul" and not any(i in constants for i in node.input):
                return ModelKind.TRANSFORMER
            if node.op_type in _PASS_THROUGH:
                todo.extend(i for i in node.input if i not in constants)
    return ModelKind.OTHER


def default_method(model: onnx.ModelProto, *, with_data: bool) -> DefaultMethod:
    """The method of a run that names none (module docstring)."""
    if not with_data:
        return DefaultMethod(DATA_FREE_DEFAULT, "the data-free default (no --calib)")
    kind = model_kind(model)
    name = DATA_DRIVEN_DEFAULTS[kind]
    return DefaultMethod(name, f"the real-model suite's best with --calib for {kind.described}")
