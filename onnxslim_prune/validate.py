"""Validation of a pruned model against its original, and the size figures of a model.

A pruned model is accepted only if it passes ``onnx.checker.check_model(full_check=True)``,
strict shape inference, loads in onnxruntime, runs, and its graph outputs keep the
original's names, element types and shapes (symbolic dims included). Agreement with
the original on the same inputs is measured, not assumed:

    max_abs = max |y - y0|,  max_rel = max_abs / max |y0|,
    cosine  = <y, y0> / (|y| |y0|)   (flattened, per output),
    top1    = mean(argmax y == argmax y0) over the last axis of a 2-D output.

Agreement is measured on real samples when there are any (up to `AGREEMENT_SAMPLES` of the
evaluation data, else of the calibration data) and otherwise on `RANDOM_FEEDS` seeded random
inputs: a single input would make top-1 agreement a coin of one sample.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import ir
from .errors import ValidationError
from .passes.trace import node_macs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int
    file_bytes: int


@dataclass(frozen=True)
class Agreement:
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None  # classifiers only
    samples: int = 1  # how many input samples the figures are over
    inputs: str = "seeded random inputs"  # where those samples came from


def model_stats(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> ModelStats:
    """Parameters, MACs of the weighted ops at `input_shapes`, serialized size."""
    shapes = ir.static_shapes(model, input_shapes)
    graph = gs.import_onnx(ir.skeleton(model))

    def shape_of(t: gs.Tensor) -> tuple[int, ...] | None:
        return shapes.get(t.name)

    macs = sum(node_macs(n, shape_of) for n in graph.nodes)
    return ModelStats(ir.count_parameters(model), int(macs), int(model.ByteSize()))


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if model.ByteSize() < ir.PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        ir._save_external(model, path)  # noqa: SLF001 - same package
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def random_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal for floats, zeros for integers and booleans."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating):
            out[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[vi.name] = np.zeros(shape, dtype=dtype)
    return out


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, dict(feeds))


AGREEMENT_SAMPLES = 64
RANDOM_FEEDS = 4
Feeds = list[dict[str, np.ndarray]]


def sample_feeds(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], limit: int = AGREEMENT_SAMPLES) -> Feeds:
    """Up to `limit` samples of `arrays` (batch first), in batches the model accepts."""
    count = min(min(len(a) for a in arrays.values()), limit)
    static = ir.static_batch(model)
    batch = static or 32
    if static:
        count -= count % static  # a fixed batch cannot take a remainder; a dynamic one takes it as a smaller batch
    return [{k: np.ascontiguousarray(a[i : i + batch]) for k, a in arrays.items()} for i in range(0, count, batch)]


def agreement_feeds(
    model: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]],
    seed: int,
    real: Mapping[str, np.ndarray] | None = None,
    real_name: str = "",
) -> tuple[Feeds, str]:
    """Feeds to compare outputs on, and what they are: `real` samples if given, else random ones."""
    feeds = sample_feeds(model, real) if real else []
    if feeds:
        return feeds, real_name
    return [random_inputs(model, shapes, seed + i) for i in range(RANDOM_FEEDS)], "seeded random inputs"


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: Feeds, inputs: str) -> Agreement:
    """Agreement of the two models' outputs over every feed (outputs joined along the batch).

    Raises `ValidationError` if the pruned model does not run, changes an output's dtype, or
    gives non-finite values where the original does not.
    """
    def outputs_of(model: onnx.ModelProto) -> list[list[np.ndarray]]:
        sess = session(model)  # one session at a time: each holds a copy of its weights
        return [sess.run(None, f) for f in feeds]

    reference = outputs_of(original)
    try:
        outputs = outputs_of(pruned)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValidationError(f"pruned model does not run in onnxruntime: {str(exc).splitlines()[0]}") from None
    expected = {o.name: o for o in original.graph.output}
    for vi, value in zip(pruned.graph.output, outputs[0]):
        want = onnx.helper.tensor_dtype_to_np_dtype(expected[vi.name].type.tensor_type.elem_type)
        if value.dtype != want:
            raise ValidationError(f"output {vi.name}: dtype {value.dtype}, expected {want}")

    def joined(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
        return [np.concatenate([np.atleast_1d(r[i]) for r in runs]) for i in range(len(runs[0]))]

    samples = sum(len(next(iter(f.values()))) if f else 1 for f in feeds)
    reference_joined, outputs_joined = joined(reference), joined(outputs)
    check_finite_where_original_is(reference_joined, outputs_joined, [o.name for o in pruned.graph.output])
    return replace(agreement(reference_joined, outputs_joined), samples=samples, inputs=inputs)


def check_finite_where_original_is(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], names: Sequence[str]) -> None:
    """A pruned model may not produce NaN or infinity where the original gives finite values."""
    for name, y0, y in zip(names, reference, outputs):
        if y0.dtype.kind == "f" and y.shape == y0.shape and np.any(np.isfinite(y0) & ~np.isfinite(y)):
            raise ValidationError(f"pruned model gives non-finite values in output {name} where the original does not")


def check_contract(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """Graph inputs and outputs: same names, element types and (symbolic) shapes."""
    for kind in ("input", "output"):
        init_names = {i.name for i in original.graph.initializer}
        before = [v for v in getattr(original.graph, kind) if v.name not in init_names]
        after_inits = {i.name for i in pruned.graph.initializer}
        after = [v for v in getattr(pruned.graph, kind) if v.name not in after_inits]
        if [v.SerializeToString() for v in before] != [v.SerializeToString() for v in after]:
            names = ", ".join(v.name for v in before)
            raise ValidationError(f"pruned model changed the graph {kind}s ({names})")


def validate(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: Feeds, inputs: str) -> Agreement:
    """Full validation (checker, input/output contract, strict inference, onnxruntime); the
    pruned model's agreement with the original on `feeds` (see `compare`)."""
    ir.check_model(pruned, full=True, what="pruned model")
    check_contract(original, pruned)
    ir.infer_strict(pruned)
    return compare(original, pruned, feeds, inputs)


def agreement(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> Agreement:
    max_abs, max_rel, cosines, top1 = 0.0, 0.0, [], []
    for y0, y in zip(reference, outputs):
        if y0.shape != y.shape:
            raise ValidationError(f"output shape {y.shape} differs from the original {y0.shape}")
        if not np.issubdtype(y0.dtype, np.floating):
            continue
        a, b = y0.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12))
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosines.append(float(a @ b / denom) if denom > 0 else 1.0)
        if y0.ndim == 2 and y0.shape[1] > 1:
            top1.append(float(np.mean(np.argmax(y0, axis=1) == np.argmax(y, axis=1))))
    return Agreement(max_abs, max_rel, min(cosines) if cosines else 1.0, float(np.mean(top1)) if top1 else None)
