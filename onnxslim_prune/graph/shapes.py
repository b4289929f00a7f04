"""Static shapes: input-shape parsing, strict inference on a weight-free skeleton, and export with fresh shapes.

A `skeleton` turns large float initializers into typed graph inputs, so inference (which needs only small
shape constants) costs kilobytes for a model of any size. `to_model` drops stale value_info and re-infers.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import ModelError, UsageError
from . import edit, filebacked
from .io import FLOAT_TYPES, MAPPED_MIN_BYTES, exceeds_proto_limit, save_external, without_initializers
from .read import EqualValues
from .runtime import calibration_options, inference_session

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


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


def skeleton(model: onnx.ModelProto, min_elements: int = 64) -> onnx.ModelProto:
    """A weight-free copy: large initializers become typed graph inputs.

    Shape inference needs the values of small shape constants only, so this copy
    infers as the real model does while staying a few kilobytes for any model size.
    """
    out = without_initializers(model)
    graph = out.graph
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) >= min_elements and init.data_type in FLOAT_TYPES:
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
        if int(np.prod(tensor.shape, dtype=np.int64)) < min_elements or dtype not in FLOAT_TYPES:
            continue
        work.inputs.append(edit.stand_in_for(tensor, dtype))
    out = gs.export_onnx(work, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    return out


def export_onnx(graph: gs.Graph, do_type_check: bool) -> onnx.ModelProto:
    """``gs.export_onnx``, the same bytes, with the weights copied once.

    graph-surgeon makes every initializer first, then copies them into the graph and the graph
    into the model: three copies of the weights at its peak (SmolLM2-135M: 1.2 GB past the
    graph's own). Here the graph is exported with its constants standing in as names, then each
    initializer is made and appended in graph-surgeon's own order, one at a time.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
    from onnx_graphsurgeon.ir.tensor import SparseValues

    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    if not constants or any(isinstance(t._values, SparseValues) for t in constants):  # noqa: SLF001
        return gs.export_onnx(graph, do_type_check=do_type_check)
    work = graph.copy()  # tensors and nodes are copied, weight arrays are shared
    # what copy() leaves out (an unknown attribute of a gs.Graph is looked up as a registered function)
    work.producer_name, work.producer_version = graph.producer_name, graph.producer_version
    stand_ins = set()
    for tensor in list(work.tensors().values()):
        if not isinstance(tensor, gs.Constant):
            continue
        stand_in = edit.stand_in_for(tensor, tensor.dtype)
        stand_ins.add(tensor.name)
        for tensors in (work.inputs, work.outputs):
            tensors[:] = [stand_in if t is tensor else t for t in tensors]
    out = gs.export_onnx(work, do_type_check=do_type_check)
    kept = [vi for vi in out.graph.value_info if vi.name not in stand_ins]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    for tensor in constants:
        out.graph.initializer.append(OnnxExporter.export_tensor_proto(tensor))
    return out


def export_weightless(graph: gs.Graph, like: onnx.ModelProto, min_bytes: int = MAPPED_MIN_BYTES
                      ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph's export without its large weights, and those weights by name (the graph's own arrays).

    `export_fast` copies every weight into the model; a caller that needs only some of them (a
    calibration stage: `calib.engine.StagedPasses.advance`) takes them from the mapping instead.
    Constants of at least `min_bytes` whose values are stored as exported are left out: their
    names stay on the nodes' inputs, produced by nothing in the model.
    """
    work = graph.copy()  # tensors and nodes are copied, weight arrays are shared
    weights: dict[str, np.ndarray] = {}
    for tensor in list(work.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor in work.inputs or filebacked.is_lazy(tensor):
            continue  # a file-backed weight is exported as its reference to the file (`filebacked`)
        values = np.asarray(tensor.values)
        if values.nbytes < min_bytes or values.dtype != np.dtype(tensor.export_dtype):
            continue
        weights[tensor.name] = values
        edit.stand_in_for(tensor, values.dtype)
    return export_fast(work, like), weights


def static_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Shape], runnable: Callable[[], onnx.ModelProto] | None = None
) -> dict[str, Shape]:
    """Every tensor's static shape for the given input shapes (strict inference, data propagation).

    Shapes inference cannot give are read off one onnxruntime run, which needs the weights:
    when `model` is a skeleton (`export_skeleton`), `runnable` makes the full model (only then).
    """
    inferred, types = _inferred_dims(skeleton(model), input_shapes)
    shapes: dict[str, Shape] = {name: dims for name, dims in inferred.items() if all(d >= 0 for d in dims)}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in model.graph.node:  # a contrib op onnx cannot infer: its outputs typed like its first input
        if node.domain not in ("", "ai.onnx") and node.input and node.input[0] in types:
            for o in filter(None, node.output):
                types.setdefault(o, types[node.input[0]])
    missing = [o for n in model.graph.node for o in n.output if o and o not in shapes and o in types]
    if missing:
        skel = skeleton(model)
        if _stand_in_bytes(skel, input_shapes) > ZERO_WEIGHTS_RUN_BYTES:
            shapes.update(_shapes_by_running(skel, input_shapes, missing, types, zero_weights=True))
        else:
            shapes.update(_shapes_by_running(model if runnable is None else runnable(), input_shapes, missing, types))
    return shapes


#: weights past which the run for shapes feeds zeros for them instead of building a session holding them
#: (SmolLM2-135M: 652 MB, whose full run held the model's bytes and a session beside the loaded model)
ZERO_WEIGHTS_RUN_BYTES = 256 << 20


def _stand_in_bytes(skel: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> int:
    """Bytes of the skeleton's weight stand-ins (its graph inputs that are not the model's inputs)."""
    total = 0
    for vi in skel.graph.input:
        if vi.name in input_shapes:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        if all(d >= 0 for d in dims) and vi.type.tensor_type.elem_type:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize
            total += int(np.prod(dims, dtype=np.int64)) * itemsize
    return total


def _inferred_dims(skel: onnx.ModelProto, input_shapes: Mapping[str, Shape], *, quiet: bool = False
                   ) -> tuple[dict[str, Shape], dict[str, int]]:
    """Strict inference (data propagation) of a skeleton at `input_shapes`: every tensor's dims (-1 where unknown)
    and element types. `skel` is changed (its inputs fixed)."""
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
        if not quiet:
            log.warning("strict shape inference failed (%s); retrying leniently", str(exc).splitlines()[0])
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
    return shapes, types


def shape_invariant_dims(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> dict[str, tuple[int | None, ...]]:
    """Per tensor, the dims that do not depend on the dynamic input dims (None where they do, or are unknown).

    Inferred twice: at `input_shapes`, and with every dynamic dim of the model's inputs moved by one
    (``d -> d - 1``, or ``d + 1`` below 3: equal dims stay equal). A dim equal in both and not
    symbolically tied to an input's named dim is a property of the network (a head count, a head
    size), which a dynamic export reads at run time with ``Gather(Shape(x), i)``; `normalize.to_graph`
    folds those reads, so the graph's head splits look like a static export's. Empty when a probe
    cannot be inferred.
    """
    inits = {i.name for i in model.graph.initializer}
    dynamic = {vi.name: [i for i, d in enumerate(vi.type.tensor_type.shape.dim) if not is_static_dim(d)]
               for vi in model.graph.input if vi.name not in inits}
    moved = {name: tuple(_moved(d) if i in dynamic.get(name, ()) else d for i, d in enumerate(shape))
             for name, shape in input_shapes.items()}
    try:
        first, _ = _inferred_dims(skeleton(model), input_shapes, quiet=True)
        second, _ = _inferred_dims(skeleton(model), moved, quiet=True)
    except Exception as exc:  # an optimisation only: the dynamic reads then freeze, as before
        log.info("no shape-invariant dims: %s", str(exc).splitlines()[0])
        return {}
    out: dict[str, tuple[int | None, ...]] = {}
    for name, a in first.items():
        b = second.get(name)
        if b is not None and len(b) == len(a):
            out[name] = tuple(x if x >= 0 and x == y else None for x, y in zip(a, b))
    return out


def _moved(d: int) -> int:
    return d - 1 if d > 2 else d + 1


def _shapes_by_running(
    model: onnx.ModelProto, input_shapes: Mapping[str, Shape], names: list[str], types: Mapping[str, int],
    *, zero_weights: bool = False,
) -> dict[str, Shape]:
    """Shapes inference could not give, read off one onnxruntime run on zero inputs.

    `zero_weights`: `model` is a skeleton whose weight stand-ins are fed zeros (pages the OS maps
    to its zero page: not resident), so no copy of the weights is made; shapes that depend on a
    large weight's values would differ, which is why only a large model runs this way.
    """
    known = {o.name for o in model.graph.output}
    extra = [onnx.helper.make_tensor_value_info(n, types[n], None) for n in names if n not in known]
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name in input_shapes:
            feeds[vi.name] = np.zeros(input_shapes[vi.name], dtype=dtype)
        elif zero_weights:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            if all(d >= 0 for d in dims):
                feeds[vi.name] = np.zeros(dims, dtype=dtype)
    # the probe outputs are added to the model itself for the serialization (a copy would copy the weights)
    count = len(model.graph.output)
    model.graph.output.extend(extra)
    try:
        sess = inference_session(model, calibration_options(optimize=False))
        shapes = _fetched_shapes(sess, names, feeds)
    except Exception as exc:  # tracing stays conservative: unknown shapes freeze
        log.warning("could not run the model to read shapes: %s", str(exc).splitlines()[0])
        return {}
    finally:
        del model.graph.output[count:]
    log.info("read %d tensor shapes from an onnxruntime run", len(names))
    return shapes


#: most bytes of probed tensors one shape-reading run returns (the first run takes `FIRST_SHAPE_FETCH` outputs)
SHAPE_FETCH_BYTES = 64 << 20
FIRST_SHAPE_FETCH = 32


def _fetched_shapes(sess: ort.InferenceSession, names: list[str], feeds: Mapping[str, np.ndarray]) -> dict[str, Shape]:
    """The shapes of `names`, fetched a part at a time so that the outputs of one run stay near
    `SHAPE_FETCH_BYTES`: a run returns every output it is asked for at once (SmolLM2-135M's 816 tensors of one
    window, 0.6 GB beside the selection's statistics, were the peak of its run); a run computes only what the
    outputs it fetches need."""
    shapes: dict[str, Shape] = {}
    fetched_bytes, start, size = 0, 0, FIRST_SHAPE_FETCH
    while start < len(names):
        part = names[start:start + size]
        for name, value in zip(part, sess.run(part, feeds)):
            shapes[name] = tuple(np.shape(value))
            fetched_bytes += int(getattr(value, "nbytes", 0))
        start += len(part)
        size = max(FIRST_SHAPE_FETCH, int(SHAPE_FETCH_BYTES * start / max(fetched_bytes, 1)))
    return shapes


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export, restore the original's metadata and output contract, drop stale shapes, re-infer."""
    graph.cleanup().toposort()
    out = export_onnx(graph, do_type_check=True)
    from . import qdq

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
        first: EqualValues[str] = EqualValues()
        for init in candidates:  # initializer order: the first of equal values is kept
            # the values, not the serialized proto: that holds the name (and its length); a kept one's values are
            # converted again only if a later one samples alike (no copy of them is held meanwhile)
            keeper = first.first(init.name, numpy_helper.to_array(init), reload=partial(numpy_helper.to_array, init))
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
            save_external(model, src)
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), check_type=True, strict_mode=True, data_prop=True)
            return onnx.load(str(dst), load_external_data=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"pruned model fails strict shape inference: {first}") from None


def export_fast(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export without re-inference or checks: for scoring candidate plans, never for output."""
    graph.cleanup().toposort()
    out = export_onnx(graph, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    del out.graph.output[:]
    out.graph.output.extend(like.graph.output)
    del out.graph.value_info[:]
    return out

