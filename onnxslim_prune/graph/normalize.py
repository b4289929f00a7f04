"""From ModelProto to a normalised graph-surgeon graph: named nodes, Constant nodes and weight subgraphs folded,
lazy constants detached from the caller's proto, value-identical constants shared.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelError
from . import edit, filebacked
from .io import RawData, file_view_values, raw_data_in_file, viewed_span
from .read import EqualValues, const_value
from .shapes import Shape, dynamic_non_batch_dims, fixed_input_shapes, is_static_dim, shape_invariant_dims, static_shapes

log = logging.getLogger(__name__)

def to_graph(model: onnx.ModelProto, source: str | os.PathLike[str] | None = None,
             input_shapes: Mapping[str, Shape] | None = None, notes: list[str] | None = None, *,
             lazy_views: bool = False) -> gs.Graph:
    """Import into graph-surgeon, name every node, fold Constant nodes and weight subgraphs.

    Shape subgraphs are folded when every graph input is fully static. With dynamic dims other
    than the batch and `input_shapes` to trace at, only the run-time reads of dims that do not
    depend on the inputs (`shapes.shape_invariant_dims`: head counts and sizes of a dynamic
    transformer export) are folded: the batch and sequence stay dynamic in the output; `notes`
    gets a line saying how many. Ops that expand constants (Expand, Tile, a
    Gather that repeats rows) are never folded, so the model cannot grow.

    `source` is the file `model` was loaded from, unchanged: the initializers' arrays are
    then read from it straight into numpy (one copy, see `_detach`). With `lazy_views`, the tensors
    of a `io.file_view` stay in their file until a pass reads them (`filebacked`).
    """
    # stale intermediate shapes must not reach the graph; detach them without copying the weights
    saved_value_info = list(model.graph.value_info)
    del model.graph.value_info[:]
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise ModelError(f"cannot import the graph: {exc}") from None
    finally:
        model.graph.value_info.extend(saved_value_info)
    _detach(graph, raw_data_in_file(source) if source is not None else None, lazy_views=lazy_views)
    _name_nodes(graph)
    _keep_output_names(graph)
    static = _all_inputs_static(model)
    known: Mapping[str, tuple[int | None, ...]] = {}
    if static:
        known = static_shapes(model, fixed_input_shapes(model))
    elif input_shapes and dynamic_non_batch_dims(model):
        known = shape_invariant_dims(model, input_shapes)
    fold_shapes = bool(known)
    reads_before = sum(1 for n in graph.nodes if n.op == "Shape")
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name in known and (static or tensor not in (*graph.inputs, *graph.outputs)):
            tensor.shape = list(known[tensor.name])
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # graph-surgeon folds with onnxruntime; its warnings are noise here
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        graph.fold_constants(fold_shapes=fold_shapes, error_ok=True, should_exclude_node=_not_folded)
    except Exception as exc:  # folding is an optimisation; tracing is conservative without it
        log.warning("constant folding skipped: %s", exc)
    graph.cleanup().toposort()
    folded = reads_before - sum(1 for n in graph.nodes if n.op == "Shape")
    if folded and not static and notes is not None:
        notes.append(f"{folded} run-time shape read{'s' if folded > 1 else ''} of fixed dims (head counts, head sizes) "
                     "folded at the traced input shapes; the batch and sequence stay dynamic")
        log.info("%s", notes[-1])
    _detach(graph)  # folding turns Constant nodes into constants that still point into the caller's model
    from . import qdq

    qdq.fold_weights(graph)  # QDQ weights are float constants while pruning, quantized again on export
    _share_equal_constants(graph)
    if fold_shapes:
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
                tensor.shape = None
    return graph


def _detach(graph: gs.Graph, in_file: RawData | None = None, *, lazy_views: bool = False) -> None:
    """Load every lazy constant (graph tensors and Constant-node attributes) into numpy; with `lazy_views`, a
    view's tensor instead reads from its file when asked (`filebacked.FileValues`).

    A lazy constant is the caller's own TensorProto, and graph-surgeon's export renames it in
    place: the input model would change. Loading costs one copy of the weights, which the
    graph needs anyway; no serialized copy of the whole model is made. From the proto the
    loader makes two (protobuf hands out a copy of the raw bytes, and the array must be
    writable); an initializer found in `in_file` is read from the file into its array instead.
    """
    tensors = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    attributes = [v for node in graph.nodes for v in node.attrs.values() if isinstance(v, gs.Constant)]
    for constant in tensors:  # initializers only: Constant-node values are not in the file's spans
        lazy = constant._values  # noqa: SLF001 - graph-surgeon keeps no public handle on the lazy tensor
        if isinstance(lazy, gs.ir.tensor.LazyValues) and not isinstance(lazy, filebacked.FileValues):
            if lazy_views and viewed_span(lazy.tensor) is not None:
                filebacked.make_lazy(constant, lazy.tensor)
                continue
            # a view's tensor (`io.file_view`) is read from its file, whatever file the model came from
            values = file_view_values(lazy.tensor)
            if values is not None:
                constant.data_location = None  # exported with its values, as the loaded model had them
            elif in_file is not None:
                values = in_file.read(lazy.tensor)
            if values is not None:
                edit.load_values(constant, values)
    for constant in tensors + attributes:
        if not filebacked.is_lazy(constant):
            _ = constant.values  # the property replaces the lazy reference with the loaded array


def _share_equal_constants(graph: gs.Graph) -> None:
    """Consumers of value-identical constants read one constant object.

    Exporters alias one weight to several layers through Identity nodes; folding gives each
    alias a copy. Sharing them again (lossless: the values are equal) lets the tracer see
    the sharing and prune those layers alike, so the pruned model cannot hold more
    parameters than the original.
    """
    by_shape: dict[tuple[str, tuple[int, ...]], list[gs.Constant]] = defaultdict(list)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and filebacked.is_lazy(tensor):
            continue  # a view of a model this run exported: shared then, and reading it here would load it all
        # group by shape and dtype first; only same-shaped candidates are hashed
        shape = tuple(int(d) for d in tensor.shape) if isinstance(tensor, gs.Constant) else ()
        if isinstance(tensor, gs.Constant) and tensor.outputs and int(np.prod(shape)) > 1:
            by_shape[(np.dtype(tensor.dtype).str, shape)].append(tensor)
    for candidates in by_shape.values():
        if len(candidates) < 2:
            continue
        first: EqualValues[gs.Constant] = EqualValues()
        for tensor in sorted(candidates, key=lambda t: t.name):
            keeper = first.first(tensor, tensor.values)
            if keeper is tensor:
                continue
            for node in list(tensor.outputs):
                for i, t in enumerate(list(node.inputs)):
                    if t is tensor:
                        edit.replace_input(node, i, keeper)


def _all_inputs_static(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not all(is_static_dim(d) for d in dims):
            return False
    return True


def _not_folded(node: gs.Node) -> bool:
    """Nodes graph-surgeon must not fold: expanding ones, and stored weights' Casts (`graph.qdq` folds those)."""
    from . import qdq

    return _expands(node) or qdq.keeps_storage(node)


def _expands(node: gs.Node) -> bool:
    """Folding this node would store a constant larger than its constant inputs."""
    if node.op in ("Expand", "Tile"):
        return True
    if node.op == "Gather" and len(node.inputs) == 2:
        data, indices = (const_value(t) for t in node.inputs)
        if data is not None and indices is not None and data.ndim:
            axis = int(node.attrs.get("axis", 0)) % data.ndim
            return indices.size > data.shape[axis]
    return False


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, stable name (reports and --exclude refer to nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def _keep_output_names(graph: gs.Graph) -> None:
    """Folding must never turn a graph output into a bare constant; nothing to do but record."""
    for out in graph.outputs:
        if isinstance(out, gs.Constant):
            raise ModelError(f"graph output {out.name!r} is a constant; nothing to prune")

