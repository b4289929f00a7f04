"""Reading a graph: nodes by name, constant values, attributes, dtypes (writing is `graph.edit`'s alone)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def value_digest(values: np.ndarray) -> str:
    """A hash of an array's values (not its name): equal digests, equal tensors."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def node_by_name(graph: gs.Graph) -> dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or folded Constant), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def input_const(node: gs.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or node.inputs[index].name == "":
        return None
    return const_value(node.inputs[index])


def has_input(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index].name != ""


def attr(node: gs.Node, name: str, default: Any = None) -> Any:
    return node.attrs.get(name, default)


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """An independent copy (weights are shared until replaced, and edits here always replace)."""
    return graph.copy()


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)



def token_mask_input(model: onnx.ModelProto) -> str | None:
    """The graph input that marks padding tokens, ``attention_mask`` as Hugging Face exports write it: rank 2
    ``[N, T]``, integer, boolean or float, its name containing "mask"; None when there is none.

    Where it is 0 a token is padding: the model computes an output there that nothing reads (a sentence
    embedding pools over the mask), so calibration rows and the verdict leave those positions out.
    """
    initializers = {t.name for t in model.graph.initializer}
    for spec in model.graph.input:
        tensor = spec.type.tensor_type
        if spec.name in initializers or "mask" not in spec.name.lower() or len(tensor.shape.dim) != 2:
            continue
        if tensor.elem_type in _MASK_TYPES:
            return str(spec.name)
    return None


_MASK_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT,
                         onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16})
