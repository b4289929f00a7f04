"""Graphs whose large weights stay in files while a pass works on a few of them.

The refit of a large model (`methods.reconstruct`) reads and rewrites one level's layers at a time,
yet a graph-surgeon graph holds every weight as a numpy array: SmolLM2-135M's pruned weights
(0.5 GB) sat beside the refit's frontiers and sessions from its first level to its last.

A model that is a `io.file_view` (its large tensors refer to their bytes in a file) is imported
with ``ir.to_graph(..., lazy_views=True)``: those constants hold `FileValues`, which
graph-surgeon loads when a pass reads ``.values`` (and then keeps the array) and exports as the
same reference otherwise, so an export (a refit stage, the result) copies no weights. After a
step, `settle` puts the graph back in that state: a constant that was only read drops its array
again (an edit replaces a constant's values and never writes into them, `edit`, so the array
loaded is still the file's), and one given new values has them written to a `io.ScratchFile`
and refers there.
"""

from __future__ import annotations

import sys
import weakref

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .io import MAPPED_MIN_BYTES, ScratchFile, file_view_values

#: the `FileValues` a constant was imported or settled with (kept while graph-surgeon holds its array instead)
_HOME = "_onnxslim_file_values"


class FileValues(gs.ir.tensor.LazyValues):  # type: ignore[misc]
    """The values of a `io.file_view` tensor, read from its file on demand (graph-surgeon's lazy values)."""

    def __init__(self, header: onnx.TensorProto) -> None:
        own = onnx.TensorProto()
        own.CopyFrom(header)  # graph-surgeon's export renames its lazy tensor in place: never the caller's proto
        super().__init__(own)
        self._loaded: weakref.ref[np.ndarray] | None = None

    def load(self) -> np.ndarray:
        values = file_view_values(self.tensor)
        if values is None:
            raise ValueError(f"{self.tensor.name}: not a file view")
        self._loaded = weakref.ref(values)
        return values

    def holds(self, values: object) -> bool:
        """Whether `values` is the very array this tensor last loaded (read, not replaced)."""
        return self._loaded is not None and self._loaded() is values


def make_lazy(constant: gs.Constant, header: onnx.TensorProto) -> None:
    """`constant` reads its values from the file `header` (a `io.file_view` tensor) refers to."""
    values = FileValues(header)
    constant._values = values  # noqa: SLF001 - graph-surgeon's own slot for lazy values
    setattr(constant, _HOME, values)


def is_lazy(constant: gs.Constant) -> bool:
    return isinstance(constant._values, FileValues)  # noqa: SLF001


def settle(graph: gs.Graph, scratch: ScratchFile) -> int:
    """Drop the arrays of file-backed constants that were only read; write those given new values to `scratch`.

    Returns the bytes written. Only float constants of at least `io.MAPPED_MIN_BYTES` stored as they are
    exported move to the file (a folded QDQ weight is quantized on export and stays in memory).
    """
    from . import qdq

    written = 0
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or is_lazy(tensor):
            continue
        values = tensor._values  # noqa: SLF001
        home = getattr(tensor, _HOME, None)
        if isinstance(home, FileValues) and home.holds(values):
            tensor._values = home  # noqa: SLF001 - read only: the file still has these values
            continue
        if (not isinstance(values, np.ndarray) or values.dtype.kind != "f" or values.nbytes < MAPPED_MIN_BYTES
                or values.dtype != np.dtype(tensor.export_dtype) or qdq.scheme_of(tensor) is not None
                or sys.byteorder != "little"):
            continue
        make_lazy(tensor, scratch.keep(tensor.name, values))
        written += values.nbytes
    return written
