"""Reading a graph: nodes by name, constant values, attributes, dtypes (writing is `graph.edit`'s alone)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .io import file_view_values


def value_digest(values: np.ndarray) -> str:
    """A hash of an array's values (not its name): equal digests, equal tensors."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


T = TypeVar("T")


class EqualValues(Generic[T]):
    """The first of byte-equal arrays, as equal `value_digest`s find it, without hashing every byte of every array.

    An array is keyed by its dtype, shape and a hash of `SAMPLE` evenly strided elements (the stride set by the
    size alone, so equal arrays sample alike); only arrays whose keys meet are compared in full, byte by byte.
    Weights of one shape almost never share a sample unless they are equal, so the cost is a copy-free look at
    a few thousand elements of each (sha256 over VGG-16's repeated 512x512x3x3 convolutions took most of a second).
    """

    SAMPLE = 4096

    def __init__(self) -> None:
        self._kept: dict[tuple[str, tuple[int, ...], bytes], list[tuple[T, Callable[[], np.ndarray]]]] = {}

    def first(self, item: T, values: np.ndarray, reload: Callable[[], np.ndarray] | None = None) -> T:
        """The first item given whose values have `values`' bytes (`item` itself when none had).

        `reload` gives `values` again when a later array is compared with it (so the caller need not keep them
        alive: a converted initializer); None holds `values` (an array the graph holds anyway).
        """
        array = np.asarray(values)
        if array.dtype.hasobject:  # no byte view: keyed by the digest of all of it, as before
            key = (array.dtype.str, array.shape, bytes.fromhex(value_digest(array)))
            return self._kept.setdefault(key, [(item, lambda: array)])[0][0]
        flat = array.reshape(-1)
        sample = flat[:: max(1, flat.size // self.SAMPLE)]
        key = (array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(sample).tobytes()).digest())
        kept = self._kept.setdefault(key, [])
        for keeper, kept_values in kept:
            if _same_bytes(kept_values(), array):
                return keeper
        kept.append((item, reload if reload is not None else (lambda: array)))
        return item


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


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
    """The tensor's values (a `io.file_view` tensor's read from its file)."""
    viewed = file_view_values(tensor)
    return numpy_helper.to_array(tensor) if viewed is None else viewed



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
