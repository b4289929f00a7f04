"""Graph access: loading, normalising, reading initializers, attributes and shapes, exporting.

Everything else in the package reads graphs through these functions and writes them through
`graph.edit` (the only writer of nodes and tensors), so the IR library (onnx-graphsurgeon
today) can be swapped without touching the passes.

Life cycle of a model here:

    proto = load_model(path)            # onnx.ModelProto, external data loaded, errors mapped
    graph = to_graph(proto)             # gs.Graph, Constant nodes and constant subgraphs folded
    shapes = static_shapes(graph, ...)  # name -> static shape, from strict inference on a skeleton
    ... passes read `graph` through the helpers below and edit it through `graph.edit` ...
    out = to_model(graph, like=proto)   # ModelProto, stale value_info dropped, shapes re-inferred
    save_model(out, path)               # atomic write, external data when needed

Large models: the weights are parsed once (`load_model`) and never serialized just to be
measured or checked. Sizes come from the tensors' headers (`payload_bytes`,
`serialized_size`, `exceeds_proto_limit`), shape inference and the weight-free checks run on
a `skeleton`, and a model that is serialized anyway (for onnxruntime and the file) hands the
same bytes to the checker (`serialize`, `check_model(serialized=...)`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .errors import ModelError, UsageError

log = logging.getLogger(__name__)

#: protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTO_LIMIT = 2**31 - 2**24
#: initializers at least this large go to an external file when external data is written.
EXTERNAL_THRESHOLD = 1024

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file with its external data; map every failure to one clear line."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    if not p.is_file():
        raise UsageError(f"{p}: not a file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf raises DecodeError, external data raises OSError/ValueError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{p}: not a readable ONNX model (truncated or not ONNX): {msg}") from None
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise ModelError(f"{p}: not an ONNX model (no graph, no opset or no IR version)")
    return model


def check_model(
    model: onnx.ModelProto, *, full: bool, what: str, path: str | os.PathLike[str] | None = None,
    serialized: bytes | None = None,
) -> None:
    """onnx.checker on a model of any size; `full` adds strict shape inference.

    `serialized` (the model's own bytes, when the caller has them) or `path` (the file the
    model was loaded from, unchanged) spare serializing the weights again: the checker then
    parses those (in C++) instead.
    """
    try:
        if serialized is not None:
            onnx.checker.check_model(serialized, full_check=full)
        elif path is not None and os.path.getsize(path) < PROTO_LIMIT:
            onnx.checker.check_model(os.fspath(path), full_check=full)
        elif not exceeds_proto_limit(model):
            onnx.checker.check_model(model, full_check=full)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                _save_external(model, path)
                onnx.checker.check_model(str(path), full_check=full)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{what} fails the ONNX checker: {first}") from None


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


# ----------------------------------------------------------------------------- graph


def to_graph(model: onnx.ModelProto, source: str | os.PathLike[str] | None = None) -> gs.Graph:
    """Import into graph-surgeon, name every node, fold Constant nodes and weight subgraphs.

    Shape subgraphs are folded only when every graph input is fully static: a dynamic
    batch must stay dynamic in the output. Ops that expand constants (Expand, Tile, a
    Gather that repeats rows) are never folded, so the model cannot grow.

    `source` is the file `model` was loaded from, unchanged: the initializers' arrays are
    then read from it straight into numpy (one copy, see `_detach`).
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
    _detach(graph, _raw_data_in_file(source) if source is not None else None)
    _name_nodes(graph)
    _keep_output_names(graph)
    static = _all_inputs_static(model)
    if static:
        shapes = static_shapes(model, fixed_input_shapes(model))
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name in shapes:
                tensor.shape = list(shapes[tensor.name])
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # graph-surgeon folds with onnxruntime; its warnings are noise here
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        graph.fold_constants(fold_shapes=static, error_ok=True, should_exclude_node=_not_folded)
    except Exception as exc:  # folding is an optimisation; tracing is conservative without it
        log.warning("constant folding skipped: %s", exc)
    graph.cleanup().toposort()
    _detach(graph)  # folding turns Constant nodes into constants that still point into the caller's model
    from .graph import qdq

    qdq.fold_weights(graph)  # QDQ weights are float constants while pruning, quantized again on export
    _share_equal_constants(graph)
    if static:
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
                tensor.shape = None
    return graph


def value_digest(values: np.ndarray) -> str:
    """A hash of an array's values (not its name): equal digests, equal tensors."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _detach(graph: gs.Graph, in_file: RawData | None = None) -> None:
    """Load every lazy constant (graph tensors and Constant-node attributes) into numpy.

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
        if in_file is not None and isinstance(lazy, gs.ir.tensor.LazyValues):
            values = in_file.read(lazy.tensor)
            if values is not None:
                constant.values = values
    for constant in tensors + attributes:
        _ = constant.values  # the property replaces the lazy reference with the loaded array


@dataclass(frozen=True)
class RawData:
    """Where the main graph's initializers keep their raw data in a model file (see `_raw_data_in_file`)."""

    path: str
    #: initializer name -> (offset, length) of its raw_data bytes, its element type and dims
    spans: Mapping[str, tuple[int, int, int, tuple[int, ...]]]

    def read(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """The tensor's values read from the file (a fresh, writable array), or None to load it from the proto."""
        span = self.spans.get(tensor.name)
        if span is None or tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type in _PACKED_BITS:
            return None
        offset, length, data_type, dims = span
        if data_type != tensor.data_type or dims != tuple(tensor.dims):
            return None
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, TypeError, ValueError):
            return None
        count = _elements(tensor)
        if dtype.hasobject or count * dtype.itemsize != length or sys.byteorder != "little":
            return None
        try:
            values = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
        except (OSError, ValueError):
            return None
        return values.reshape(tuple(tensor.dims)) if values.size == count else None


def _raw_data_in_file(path: str | os.PathLike[str]) -> RawData | None:
    """The spans of the main graph's initializers' raw data in `path` (names met twice are left out)."""
    import mmap

    spans: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}
    repeated: set[str] = set()
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, wire, a, b in _fields(buf, 0, len(buf)):
                if number != _MODEL_GRAPH or wire != 2:
                    continue
                for n, w, c, d in _fields(buf, a, b):
                    if n != _GRAPH_INITIALIZER or w != 2:
                        continue
                    name, span, data_type, dims = "", None, 0, []
                    for field, kind, start, end in _fields(buf, c, d):
                        if field == _TENSOR_NAME and kind == 2:
                            name = bytes(buf[start:end]).decode("utf-8")
                        elif field == _TENSOR_RAW_DATA and kind == 2:
                            span = (start, end - start)
                        elif field == _TENSOR_DATA_TYPE and kind == 0:
                            data_type = start
                        elif field == _TENSOR_DIMS and kind == 0:
                            dims.append(start)
                        elif field == _TENSOR_DIMS and kind == 2:  # packed
                            at = start
                            while at < end:
                                dim, at = _varint(buf, at)
                                dims.append(dim)
                    if name in spans or name in repeated:
                        spans.pop(name, None)
                        repeated.add(name)
                    elif span is not None:
                        spans[name] = (*span, data_type, tuple(_signed(d) for d in dims))
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    return RawData(os.fspath(path), spans)


def _share_equal_constants(graph: gs.Graph) -> None:
    """Consumers of value-identical constants read one constant object.

    Exporters alias one weight to several layers through Identity nodes; folding gives each
    alias a copy. Sharing them again (lossless: the values are equal) lets the tracer see
    the sharing and prune those layers alike, so the pruned model cannot hold more
    parameters than the original.
    """
    by_shape: dict[tuple[str, tuple[int, ...]], list[gs.Constant]] = defaultdict(list)
    for tensor in graph.tensors().values():
        # group by shape and dtype first; only same-shaped candidates are hashed
        shape = tuple(int(d) for d in tensor.shape) if isinstance(tensor, gs.Constant) else ()
        if isinstance(tensor, gs.Constant) and tensor.outputs and int(np.prod(shape)) > 1:
            by_shape[(np.dtype(tensor.dtype).str, shape)].append(tensor)
    for candidates in by_shape.values():
        if len(candidates) < 2:
            continue
        first: dict[str, gs.Constant] = {}
        for tensor in sorted(candidates, key=lambda t: t.name):
            keeper = first.setdefault(value_digest(tensor.values), tensor)
            if keeper is tensor:
                continue
            for node in list(tensor.outputs):
                for i, t in enumerate(list(node.inputs)):
                    if t is tensor:
                        node.inputs[i] = keeper  # graph-surgeon's input lists update both ends


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
    from .graph import qdq

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


# ----------------------------------------------------------------------------- shapes


def parse_input_shape(text: str) -> tuple[str, Shape]:
    """Parse ``NAME:1x3x224x224`` (the last ``:`` separates, so ``input:0:1x3`` works)."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}: expected NAME:DxDx... with positive integers")
    return name, shape


def parse_input_shapes(items: Iterable[str]) -> dict[str, Shape]:
    """Repeated `--input-shape` items into a mapping."""
    return dict(parse_input_shape(item) for item in items)


def is_static_dim(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A fixed size; some exporters (Paddle) write -1 or 0 for a dynamic one."""
    return dim.HasField("dim_value") and dim.dim_value > 0


def dynamic_non_batch_dims(model: onnx.ModelProto, overrides: Mapping[str, Shape] | None = None) -> dict[str, list[int]]:
    """Per graph input without an --input-shape, its dynamic axes other than the batch (they become 1)."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[int]] = {}
    for vi in model.graph.input:
        if vi.name in inits or vi.name in (overrides or {}):
            continue
        axes = [i for i, d in enumerate(vi.type.tensor_type.shape.dim) if i > 0 and not is_static_dim(d)]
        if axes:
            out[vi.name] = axes
    return out


def fixed_input_shapes(model: onnx.ModelProto, overrides: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """Static shapes of the real graph inputs: overrides first, then static dims, then 1."""
    overrides = dict(overrides or {})
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, Shape] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.name in overrides:
            shape = overrides.pop(vi.name)
            if len(shape) != len(dims):
                raise UsageError(f"--input-shape {vi.name}: rank {len(shape)} given, the model's input has rank {len(dims)}")
            for got, dim in zip(shape, dims):
                if is_static_dim(dim) and dim.dim_value != got:
                    raise UsageError(
                        f"--input-shape {vi.name}: {'x'.join(map(str, shape))} contradicts the model's static shape "
                        f"{'x'.join(str(d.dim_value) if is_static_dim(d) else '?' for d in dims)}"
                    )
        else:
            shape = tuple(d.dim_value if is_static_dim(d) else 1 for d in dims)
        shapes[vi.name] = shape
    if overrides:
        raise UsageError(f"--input-shape names no model input: {', '.join(sorted(overrides))} (inputs: {', '.join(shapes)})")
    return shapes


def skeleton(model: onnx.ModelProto, min_elements: int = 64) -> onnx.ModelProto:
    """A weight-free copy: large initializers become typed graph inputs.

    Shape inference needs the values of small shape constants only, so this copy
    infers as the real model does while staying a few kilobytes for any model size.
    """
    out = _without_initializers(model)
    graph = out.graph
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) >= min_elements and init.data_type in _FLOAT_TYPES:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)
    return out


def export_skeleton(graph: gs.Graph, like: onnx.ModelProto, min_elements: int = 64) -> onnx.ModelProto:
    """`skeleton` of the graph's export, made without exporting (copying) its weights.

    The same model as ``skeleton(export)`` for shape inference: every float constant of at
    least `min_elements` elements becomes a typed graph input, the rest stay initializers;
    opset and IR version are `like`'s. The graph itself is not modified.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    work = graph.copy()  # tensors and nodes are copied, weight arrays are shared
    for tensor in list(work.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor in work.inputs:
            continue
        dtype = dtype_to_onnx(tensor.export_dtype)
        if int(np.prod(tensor.shape, dtype=np.int64)) < min_elements or dtype not in _FLOAT_TYPES:
            continue
        stand_in = gs.Variable(tensor.name, dtype=dtype, shape=list(tensor.shape))
        for node in list(tensor.outputs):
            for i, t in enumerate(list(node.inputs)):
                if t is tensor:
                    node.inputs[i] = stand_in
        work.inputs.append(stand_in)
    out = gs.export_onnx(work, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    return out


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the initializers, field by field: the weights are never copied.

    (Taking the initializers out and putting them back with `extend` would copy every one.)
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every set field but `skip`, whose value is never read (reading a bytes field copies it)."""
    for descriptor in source.DESCRIPTOR.fields:
        name = descriptor.name
        if name == skip:
            continue
        value = getattr(source, name)
        if hasattr(value, "extend"):  # a repeated field (upb descriptors no longer say so themselves)
            if len(value):
                getattr(target, name).extend(value)
        elif not source.HasField(name):
            continue
        elif hasattr(value, "CopyFrom"):
            getattr(target, name).CopyFrom(value)
        else:
            setattr(target, name, value)


def static_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Shape], runnable: Callable[[], onnx.ModelProto] | None = None
) -> dict[str, Shape]:
    """Every tensor's static shape for the given input shapes (strict inference, data propagation).

    Shapes inference cannot give are read off one onnxruntime run, which needs the weights:
    when `model` is a skeleton (`export_skeleton`), `runnable` makes the full model (only then).
    """
    skel = skeleton(model)
    for vi in skel.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for dim, value in zip(dims, input_shapes[vi.name]):
                dim.Clear()
                dim.dim_value = value
    del skel.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        log.warning("strict shape inference failed (%s); retrying leniently", str(exc).splitlines()[0])
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[vi.name] = tuple(dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = [o for n in model.graph.node for o in n.output if o and o not in shapes and o in types]
    if missing:
        shapes.update(_shapes_by_running(model if runnable is None else runnable(), input_shapes, missing, types))
    return shapes


def _shapes_by_running(
    model: onnx.ModelProto, input_shapes: Mapping[str, Shape], names: list[str], types: Mapping[str, int]
) -> dict[str, Shape]:
    """Shapes inference could not give, read off one onnxruntime run on zero inputs."""
    import onnxruntime as ort

    known = {o.name for o in model.graph.output}
    extra = [onnx.helper.make_tensor_value_info(n, types[n], None) for n in names if n not in known]
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits and vi.name in input_shapes:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            feeds[vi.name] = np.zeros(input_shapes[vi.name], dtype=dtype)
    # the probe outputs are added to the model itself for the serialization (a copy would copy the weights)
    count = len(model.graph.output)
    model.graph.output.extend(extra)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        values = sess.run(names, feeds)
    except Exception as exc:  # tracing stays conservative: unknown shapes freeze
        log.warning("could not run the model to read shapes: %s", str(exc).splitlines()[0])
        return {}
    finally:
        del model.graph.output[count:]
    log.info("read %d tensor shapes from an onnxruntime run", len(names))
    return {n: tuple(np.shape(v)) for n, v in zip(names, values)}


# ----------------------------------------------------------------------------- export


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export, restore the original's metadata and output contract, drop stale shapes, re-infer."""
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    from .graph import qdq

    qdq.export(out, (t for t in graph.tensors().values() if isinstance(t, gs.Constant)))
    out.ir_version = like.ir_version
    out.producer_name = like.producer_name
    out.producer_version = like.producer_version
    out.domain = like.domain
    out.model_version = like.model_version
    out.doc_string = like.doc_string
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    # Graph inputs and outputs keep exactly the original's names, types and (symbolic) shapes.
    del out.graph.input[:]
    out.graph.input.extend(vi for vi in like.graph.input if vi.name not in {i.name for i in like.graph.initializer})
    del out.graph.output[:]
    out.graph.output.extend(like.graph.output)
    del out.graph.value_info[:]
    share_identical_initializers(out)
    if _skeleton_infers(out):  # the weights are neither serialized nor parsed back
        out.graph.value_info.extend(_infer_skeleton(out).graph.value_info)
        return out
    inferred = infer_strict(out)
    # inference may refine a symbolic output dim; the output contract is the original's declaration
    del inferred.graph.output[:]
    inferred.graph.output.extend(like.graph.output)
    return inferred


def share_identical_initializers(model: onnx.ModelProto) -> None:
    """Let nodes share one copy of byte-identical initializers.

    Exporters alias one weight to several layers through Identity; folding makes a copy
    per alias. Where the copies are still equal after pruning, one is kept.
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # names may be captured by subgraphs; leave them alone
    protected = {v.name for v in [*graph.input, *graph.output]}
    # only initializers of equal type and dims can be equal: those alone are read and hashed
    by_shape: dict[tuple[int, tuple[int, ...]], list[onnx.TensorProto]] = defaultdict(list)
    for init in graph.initializer:
        if init.name not in protected and init.data_location != onnx.TensorProto.EXTERNAL:
            by_shape[(init.data_type, tuple(init.dims))].append(init)
    alias: dict[str, str] = {}
    for candidates in by_shape.values():
        if len(candidates) < 2:
            continue
        first: dict[str, str] = {}
        for init in candidates:  # initializer order: the first of equal values is kept
            # the values, not the serialized proto: that holds the name (and its length)
            keeper = first.setdefault(value_digest(numpy_helper.to_array(init)), init.name)
            if keeper != init.name:
                alias[init.name] = keeper
    if not alias:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    for index in reversed(range(len(graph.initializer))):  # deleted in place: the kept ones are not copied
        if graph.initializer[index].name in alias:
            del graph.initializer[index]


def _skeleton_infers(model: onnx.ModelProto) -> bool:
    """Strict inference on `skeleton(model)` finds what it finds on `model`.

    Not with subgraphs (their value_info lives inside the nodes) nor with an initializer that
    is also a graph input (the skeleton would declare it twice).
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return False
    inputs = {vi.name for vi in graph.input}
    return not any(init.name in inputs for init in graph.initializer)


def _infer_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference on the weight-free `skeleton` of `model` (see `_skeleton_infers`)."""
    skel = skeleton(model)
    if exceeds_proto_limit(skel):  # huge non-float constants: the file-based path handles any size
        return infer_strict(model)
    try:
        return onnx.shape_inference.infer_shapes(skel, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"pruned model fails strict shape inference: {first}") from None


def check_inference(model: onnx.ModelProto) -> None:
    """Raise `ModelError` unless strict shape inference passes (on the skeleton where it can)."""
    if _skeleton_infers(model):
        _infer_skeleton(model)
    else:
        infer_strict(model)


def infer_strict(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference on a model of any size; the result carries fresh value_info."""
    try:
        if not exceeds_proto_limit(model):
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            _save_external(model, src)
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), check_type=True, strict_mode=True, data_prop=True)
            return onnx.load(str(dst), load_external_data=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"pruned model fails strict shape inference: {first}") from None


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, as `save_model` writes them without external data; None past protobuf's limit."""
    return None if exceeds_proto_limit(model) else model.SerializeToString()


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external: bool = False, serialized: bytes | None = None
) -> None:
    """Write atomically: a temporary file in the same folder, then a rename.

    External data is written when asked (the input had it) or when the model
    exceeds protobuf's limit; its data file is named after the output.
    `serialized` is `serialize(model)` when the caller has it already (it is then
    written as it is, and the model is not serialized again).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    check_writable_folder(folder)
    external = external or (serialized is None and exceeds_proto_limit(model))
    fd, tmp_name = _temporary(folder, target.name)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{target.name}.data"
    tmp_data = folder / f".{data_name}.tmp"
    try:
        if external:
            _save_external(model, tmp, location=tmp_data.name)
            if tmp_data.exists():  # absent when every tensor is under the threshold
                _rename_external_location(tmp, tmp_data.name, data_name)
                default_permissions(tmp_data)
                os.replace(tmp_data, folder / data_name)
        else:
            tmp.write_bytes(model.SerializeToString() if serialized is None else serialized)
        default_permissions(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()


def _temporary(folder: Path, name: str) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"{folder}: cannot write there: {exc.strerror or exc}") from None


def check_writable_folder(folder: Path) -> None:
    """Raise `UsageError` unless a file can really be created in `folder` (root ignores os.access)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    fd, name = _temporary(folder, "write-check")
    os.close(fd)
    Path(name).unlink(missing_ok=True)


def default_permissions(path: Path) -> None:
    """mkstemp creates 0600 files; a written model gets the usual 0666 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or f"{path.name}.data",
        size_threshold=EXTERNAL_THRESHOLD,
    )


def _rename_external_location(path: Path, old: str, new: str) -> None:
    """Point the external-data references of a just-written file at the final data file name."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001 - stable helper
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    path.write_bytes(model.SerializeToString())


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def external_data_files(path: str | os.PathLike[str]) -> set[Path]:
    """The files a model's tensors keep their external data in (resolved); empty if none or unreadable."""
    return set(external_data_of(path).files)


@dataclass(frozen=True)
class ExternalData:
    """Where a model file keeps tensor data outside itself (see `external_data_of`)."""

    files: frozenset[Path]  # resolved
    initializers: bool  # some initializer of the main graph is stored outside


def external_data_of(path: str | os.PathLike[str]) -> ExternalData:
    """The external-data references of a model file, read without parsing (or reading) its tensors.

    The protobuf wire format is walked through a memory map: only the headers of the
    messages on the way to each tensor (graph, nodes, attributes, subgraphs) are decoded,
    and every tensor's data is skipped by its length, so a model of any size costs a few
    milliseconds and no memory. A file that is not a readable model has no external data.
    """
    import mmap

    folder = Path(path).resolve().parent
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            locations, initializers = _scan_model(buf)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return ExternalData(frozenset(), False)
    return ExternalData(frozenset((folder / loc).resolve() for loc in locations), initializers)


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: Any, start: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of one message's fields; nothing is copied."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # groups are not used by ONNX
            raise ValueError(f"unexpected wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


# field numbers of onnx.proto on the way to a tensor's external data
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14


def _signed(value: int) -> int:
    """An int64 field's varint as the signed value."""
    return value - (1 << 64) if value >= 1 << 63 else value
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _scan_model(buf: Any) -> tuple[set[str], bool]:
    """(external-data locations of every tensor, whether a main-graph initializer is external)."""
    locations: set[str] = set()
    initializers = False

    def tensor(start: int, end: int) -> bool:
        external = False
        for number, wire, a, b in _fields(buf, start, end):
            if number == _TENSOR_DATA_LOCATION and wire == 0:
                external = a == onnx.TensorProto.EXTERNAL
            elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
                key = value = None
                for n, w, c, d in _fields(buf, a, b):
                    if w == 2 and n in (_ENTRY_KEY, _ENTRY_VALUE):
                        text = bytes(buf[c:d]).decode("utf-8")
                        key, value = (text, value) if n == _ENTRY_KEY else (key, text)
                if key == "location" and value is not None:
                    locations.add(value)
        return external

    def sparse(start: int, end: int) -> None:
        for number, wire, a, b in _fields(buf, start, end):
            if wire == 2 and number in (_SPARSE_VALUES, _SPARSE_INDICES):
                tensor(a, b)

    def graph(start: int, end: int, main: bool) -> None:
        nonlocal initializers
        for number, wire, a, b in _fields(buf, start, end):
            if wire != 2:
                continue
            if number == _GRAPH_INITIALIZER:
                external = tensor(a, b)
                initializers = initializers or (main and external)
            elif number == _GRAPH_SPARSE_INITIALIZER:
                sparse(a, b)
            elif number == _GRAPH_NODE:
                for n, w, c, d in _fields(buf, a, b):
                    if n == _NODE_ATTRIBUTE and w == 2:
                        attribute(c, d)

    def attribute(start: int, end: int) -> None:
        for number, wire, a, b in _fields(buf, start, end):
            if wire != 2:
                continue
            if number in (_ATTR_T, _ATTR_TENSORS):
                tensor(a, b)
            elif number in (_ATTR_G, _ATTR_GRAPHS):
                graph(a, b, main=False)
            elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
                sparse(a, b)

    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == 2:
            graph(a, b, main=True)
    return locations, initializers


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and tensor attributes (Constant values), subgraphs included."""
    out: list[onnx.TensorProto] = []

    def walk(graph: onnx.GraphProto) -> None:
        out.extend(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    out.append(attribute.t)
                out.extend(attribute.tensors)
                for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                    walk(sub)

    walk(model.graph)
    return out


def input_had_external_data(path: str | os.PathLike[str]) -> bool:
    """Some initializer of the file's main graph is stored outside it (its tensors are not read)."""
    return external_data_of(path).initializers


# ----------------------------------------------------------------------------- sizes
#
# `ModelProto.ByteSize()` serializes the whole model to count its bytes (upb has no cached
# size): for a model of several hundred MB that is seconds and a second copy in memory. The
# figures below come from the tensors' headers instead.

#: payload bytes per element of the element types that are packed below one byte
_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                 ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, name)}
#: a model whose tensor payload is this far under `PROTO_LIMIT` is under it: the rest of a
#: graph (nodes, names, shapes) is far smaller; closer to the limit `ByteSize` decides
SIZE_MARGIN = 2**28


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def _raw_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the raw data of a valid tensor: element count times element size (nothing is read)."""
    bits = _PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        return -(-_elements(tensor) * bits // 8)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):  # an element type numpy cannot hold: read the length
        return len(tensor.raw_data)
    return _elements(tensor) * itemsize


def tensor_bytes(tensor: onnx.TensorProto, *, external: bool = False) -> int:
    """Bytes of a tensor's values as stored, counted without reading them.

    Raw data: element count times element size; typed fields: their lengths times the
    field's width; strings: their lengths. Data stored outside the file counts only with
    `external` (its "length" entry, else the element count): the model's own bytes do not
    hold it.
    """
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        if not external:
            return 0
        length = next((e.value for e in tensor.external_data if e.key == "length"), None)
        return int(length) if length is not None else _raw_bytes(tensor)
    if tensor.HasField("raw_data"):
        return _raw_bytes(tensor)
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(v) for v in tensor.string_data)
    return (4 * (len(tensor.float_data) + len(tensor.int32_data))
            + 8 * (len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data)))


def payload_bytes(model: onnx.ModelProto, *, external: bool = False) -> int:
    """Bytes of every tensor's values (initializers, sparse initializers, Constant attributes, subgraphs).

    A lower estimate of the serialized size (the nodes, names and shapes come on top, a few
    kilobytes to megabytes); with `external`, of the files a save with external data writes.
    """
    total = sum(tensor_bytes(t, external=external) for t in _all_tensors(model))
    for sparse in model.graph.sparse_initializer:
        total += tensor_bytes(sparse.values, external=external) + tensor_bytes(sparse.indices, external=external)
    return total


def exceeds_proto_limit(model: onnx.ModelProto) -> bool:
    """The model's serialization would reach `PROTO_LIMIT` (ByteSize is called only near the limit)."""
    payload = payload_bytes(model)
    if payload < PROTO_LIMIT - SIZE_MARGIN:
        return False
    if payload >= PROTO_LIMIT + SIZE_MARGIN:
        return True
    return model.ByteSize() >= PROTO_LIMIT


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _tensor_size(tensor: onnx.TensorProto) -> int:
    """`tensor.ByteSize()`, with its raw data counted, not serialized."""
    if not tensor.HasField("raw_data") or _raw_bytes(tensor) < 2**16:
        return int(tensor.ByteSize())
    header = onnx.TensorProto()
    _copy_fields(tensor, header, skip="raw_data")
    length = _raw_bytes(tensor)
    return int(header.ByteSize()) + 1 + _varint_size(length) + length  # raw_data is field 9: a 1-byte tag


def serialized_size(model: onnx.ModelProto) -> int:
    """`model.ByteSize()`, the size of the file `save_model` writes without external data,
    computed without serializing the initializers' raw data.

    Everything but the initializers is measured by protobuf itself (a few kilobytes for
    most models); each initializer adds its header, its raw data (element count times
    element size: a valid tensor's length) and the length prefixes. Exact for every valid
    model (a test compares it with ByteSize); unknown fields of a newer ONNX are not counted.
    """
    light = _without_initializers(model)
    bare = int(light.graph.ByteSize())
    full = bare + sum(1 + _varint_size(size) + size for size in map(_tensor_size, model.graph.initializer))  # tag 5: 1 byte
    return int(light.ByteSize()) - _varint_size(bare) - bare + _varint_size(full) + full


# ----------------------------------------------------------------------------- counting


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size of the runtime inputs, or None if any of them is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    sizes = set()
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or not is_static_dim(dims[0]):
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


#: integer element types that only weights use (shape constants and indices are int64 / int32)
_WEIGHT_INT_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT8", "UINT8", "INT16", "UINT16", "INT4", "UINT4")
                     if hasattr(onnx.TensorProto, name)}


def _quantized_inputs(model: onnx.ModelProto) -> set[str]:
    """Tensors a DequantizeLinear dequantizes and QLinearConv's int32 bias: quantized weights of any integer type."""
    names = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input}
    names |= {n.input[8] for n in model.graph.node if n.op_type == "QLinearConv" and len(n.input) > 8}
    return names


def count_parameters(model: onnx.ModelProto) -> int:
    """Weight elements of every dtype: float initializers, quantized ((u)int8, (u)int4, (u)int16) ones and
    any tensor a DequantizeLinear reads (an int32 bias); shape constants and indices are not parameters."""
    quantized = _quantized_inputs(model)

    def counts(t: onnx.TensorProto, name: str) -> bool:
        return t.data_type in _FLOAT_TYPES or t.data_type in _WEIGHT_INT_TYPES or name in quantized

    total = 0
    for init in model.graph.initializer:
        if counts(init, init.name):
            total += int(np.prod(init.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and counts(a.t, node.output[0] if node.output else ""):
                    total += int(np.prod(a.t.dims, dtype=np.int64))
    return total


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


# ----------------------------------------------------------------------------- copies and export


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """An independent copy (weights are shared until replaced, and edits here always replace)."""
    return graph.copy()


def export_fast(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export without re-inference or checks: for scoring candidate plans, never for output."""
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    del out.graph.output[:]
    out.graph.output.extend(like.graph.output)
    del out.graph.value_info[:]
    return out
