"""Stream intermediate tensors of a model over a calibration set with onnxruntime.

``expose_tensors`` copies the model and appends the requested intermediate tensors as graph
outputs (element type from ``value_info`` / shape inference, shape left open); ``exposed_session``
gives a session of the same model, without the copy. ``stream_tensors``
runs one session batch by batch and yields ``{name: array}`` for the requested tensors only, so
the caller reduces them (``stats``) and memory stays bounded by one batch.

A model whose inputs have a static batch dimension ``b`` is run with batches of exactly ``b``
(any remainder that cannot fill a batch is skipped with a warning).

While a stream is open, numpy/scipy BLAS runs with one thread (``threads.blas_limited``): the
limit covers each onnxruntime ``run`` and the caller's reduction of each batch between two
``next()`` calls, and is released when the stream ends or is closed (see ``threads``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from .. import ir
from ..errors import CalibrationError, ModelError
from .sources import CalibrationSet
from .threads import blas_limited, stream_blas_threads

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _known_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Tensor types from the graph's value_info, inputs and outputs, with shape inference if possible."""
    graph = model.graph
    try:
        # on the weight-free skeleton: inferring the model itself serializes and returns two copies of its weights
        graph = onnx.shape_inference.infer_shapes(ir.skeleton(model), strict_mode=False).graph
    except Exception as exc:  # inference is best effort (custom ops, >2 GB models, ...)
        log.debug("shape inference failed (%s); using existing value_info only", exc)
    return {
        vi.name: vi.type
        for vi in (*graph.value_info, *graph.input, *graph.output)
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
    }


def _produced(model: onnx.ModelProto) -> set[str]:
    return {out for node in model.graph.node for out in node.output if out}


def _added_outputs(model: onnx.ModelProto, names: Sequence[str], types_of: onnx.ModelProto | None
                   ) -> list[onnx.ValueInfoProto]:
    """Graph outputs to append so that `model` also returns the named node outputs (none already present)."""
    produced = _produced(model)
    missing = [n for n in names if n not in produced]
    if missing:
        raise ModelError(f"tensor(s) not produced by any node of the model: {', '.join(missing)}")
    present = {vi.name for vi in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in present]
    if not wanted:
        return []
    types = _known_types(model if types_of is None else types_of)
    added = []
    for name in wanted:
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.tensor_type.elem_type = types[name].tensor_type.elem_type
        added.append(vi)
    return added


def expose_tensors(model: onnx.ModelProto, names: Sequence[str], *, types_of: onnx.ModelProto | None = None
                   ) -> onnx.ModelProto:
    """Copy of ``model`` with the named node outputs added as graph outputs (originals kept); `model` itself
    when they are all graph outputs already (the caller must not modify the result). `types_of`: the model
    whose element types the added outputs take (`model` itself by default; a weightless copy's caller gives
    the model with its weights, which type inference needs)."""
    added = _added_outputs(model, names, types_of)
    if not added:
        return model  # nothing to add: a copy would only copy the weights (a cut model's are its outputs already)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(added)
    return exposed


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read by a node's subgraphs (If/Loop/Scan bodies), besides its inputs."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                names.update(t for t in (*inner.input, *subgraph_inputs(inner)) if t and t not in local)
    return names


def names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every name `nodes` read: their inputs and what their subgraphs read from outside."""
    return {t for n in nodes for t in (*n.input, *subgraph_inputs(n))}


def _weights_read(model: onnx.ModelProto, weights: onnx.ModelProto | None) -> list[onnx.TensorProto]:
    """`model`'s initializers, and those of `weights` its nodes read that it does not hold (a weightless cut)."""
    own = list(model.graph.initializer)
    if weights is None or weights is model:
        return own
    held = {t.name for t in own}
    used = names_read(model.graph.node)
    return own + [t for t in weights.graph.initializer if t.name in used and t.name not in held]


def exposed_session(
    model: onnx.ModelProto, names: Sequence[str], providers: Sequence[str] = ("CPUExecutionProvider",),
    weights: onnx.ModelProto | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session of `expose_tensors` (model, names), made without copying the model.

    The added outputs go on a weightless copy and the weights are handed over as they are
    (`ir.inference_session`: a large model's go through a scratch file, never serialized): a copy
    would hold the weights a third time while the session is made (SmolLM2: 0.5 GB more at
    every statistics pass). `weights`: the model a weightless cut of it reads its weights from.
    """
    options = ir.calibration_options()
    bare = ir.without_initializers(model)
    bare.graph.output.extend(_added_outputs(model, names, None))
    try:
        return ir.inference_session(bare, options, providers, initializers=_weights_read(model, weights))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load the model: {first}") from None


def _batch_plan(model: onnx.ModelProto, calib: CalibrationSet, batch_size: int) -> tuple[int, bool]:
    static = ir.static_batch(model)
    if static is None or static == batch_size:
        return batch_size, False
    dropped = calib.num_samples % static
    if calib.num_samples < static:
        raise CalibrationError(f"the model needs batches of {static} but {calib.source} has {calib.num_samples} samples")
    if dropped:
        # every statistics pass streams the set again: say it once per calibration set
        said = (calib.fingerprint, static)
        level = logging.DEBUG if said in _SAID else logging.WARNING
        _SAID.add(said)
        log.log(level, "model has a static batch of %d: skipping the last %d calibration samples", static, dropped)
    return static, True


_SAID: set[tuple[str, int]] = set()


def run_chunked(
    session: ort.InferenceSession, names: Sequence[str], feed: dict[str, np.ndarray], most: int | None, samples: int
) -> list[np.ndarray]:
    """``session.run(names, feed)`` on at most `most` samples at a time, outputs joined along the batch.

    onnxruntime's arena grows to one run's activations: EfficientNet-Lite1 at 240x240 takes about
    11 MB a sample, so a batch of 32 costs 350 MB whatever the budget. A batch of `samples` is split
    only when every fed array has those samples first and each output keeps them first (else, or
    when a part fails, the batch runs whole: a graph that folds the batch into other dims is never
    split): samples do not meet in an inference graph, so the values are those of one run.
    """
    if most is None or samples <= most or not feed or any(v.ndim == 0 or len(v) != samples for v in feed.values()):
        return session.run(list(names), feed)
    # each part is copied into outputs of the batch's size as it comes (parts gathered and then concatenated were
    # held twice: SmolLM2's logits, 805 MB for 32 windows, peaked 1.6 GB)
    joined: list[np.ndarray] = []
    try:
        for start in range(0, samples, most):
            count = min(most, samples - start)
            part = session.run(list(names), {k: v[start : start + most] for k, v in feed.items()})
            if not joined:
                joined = [np.empty((samples, *o.shape[1:]), o.dtype) if o.ndim else o for o in part]
            if not all(o.ndim and len(o) == count and o.shape[1:] == j.shape[1:] and o.dtype == j.dtype
                       for o, j in zip(part, joined)):
                del joined, part
                return session.run(list(names), feed)
            for o, j in zip(part, joined):
                j[start : start + count] = o
            del part
    except Exception:  # noqa: BLE001 - a graph that cannot take a part of the batch runs it whole
        joined = []
        return session.run(list(names), feed)
    return joined


def stream_tensors(
    model: onnx.ModelProto,
    calib: CalibrationSet,
    names: Sequence[str],
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    blas_threads: int | Literal["default"] | None = "default",
    weights: onnx.ModelProto | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: tensor}`` for each calibration batch; ``progress(done, total)`` after each.

    ``blas_threads``: BLAS/OpenMP threads while the stream is open (onnxruntime runs and the
    caller's work between batches): ``"default"`` = ``threads.stream_blas_threads()`` (1, or
    ``ONNXSLIM_PRUNE_BLAS_THREADS``), an int = that many, None = leave the libraries alone.
    Close a stream that is abandoned early (``close()`` or ``contextlib.closing``) to release
    the limit at once rather than when the generator is garbage-collected. ``weights``: the model
    `model` was cut from without its weights (`methods.reconstruct.weightless_cut`), which holds them.
    """
    wanted = list(dict.fromkeys(names))
    from_feed = [n for n in wanted if n in calib.names]
    fetch = [n for n in wanted if n not in calib.names]
    size, drop_last = _batch_plan(model, calib, batch_size)
    session = exposed_session(model, fetch, providers, weights) if fetch else None
    del model, weights  # a cut model held by nobody else (a statistics pass's) is freed: the session holds its weights
    total = calib.num_batches(size, drop_last=drop_last)
    limit = stream_blas_threads() if blas_threads == "default" else blas_threads
    if isinstance(limit, str):
        raise ValueError(f"blas_threads must be 'default', an int or None, got {limit!r}")
    with blas_limited(limit):  # held across every yield; released on exhaustion, error or close()
        for done, feed in enumerate(calib.iter_batches(size, drop_last=drop_last), start=1):
            try:
                values = session.run(fetch, feed) if session is not None else []
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CalibrationError(f"onnxruntime failed on a batch of {calib.source}: {first}") from None
            result = dict(zip(fetch, values))
            result.update({n: feed[n] for n in from_feed})
            if progress is not None:
                progress(done, total)
            yield {n: result[n] for n in wanted}
