"""Running models with onnxruntime, written here and not taken from the tool, so a benchmark's figures are its own.

    from lib.runtime import accuracy, remeasure
    accuracy(model, images, labels)            # top-1 of a classifier on Fashion-MNIST arrays
    remeasure(original, pruned, rounds=40)     # interleaved single-thread CPU medians of two files
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

#: samples per onnxruntime call of `accuracy` (bounded memory on the 10,000-image test split)
BATCH = 500


def session(model: onnx.ModelProto | Path | bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session (warnings off); `threads` > 0 fixes the intra-op threads (and one inter-op thread)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def predictions(model: onnx.ModelProto | Path | bytes, images: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The argmax of the first output ([N, classes]) on `images` fed to the first input, in `batch`es."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0].argmax(axis=1) for i in range(0, len(images), batch)])


def accuracy(model: onnx.ModelProto | Path | bytes, images: np.ndarray, labels: np.ndarray, batch: int = BATCH) -> float:
    """Top-1 accuracy of a classifier whose first output is [N, classes]."""
    return float(np.mean(predictions(model, images, batch) == labels))


def seeded_feed(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Standard normal float inputs, zeros for integer and boolean ones, of the given static shapes."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        feed[vi.name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
    return feed


def static_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """The real graph inputs' shapes, every symbolic dimension set to `batch`."""
    inits = {i.name for i in model.graph.initializer}
    return {vi.name: tuple(d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim)
            for vi in model.graph.input if vi.name not in inits}


def check_valid(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> None:
    """The checker (full) and strict shape inference, and with `original` its graph inputs' and outputs' names and
    element types; raises what the checks raise (ValueError for a changed input or output)."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    if original is not None:
        for what in ("input", "output"):
            got, want = ([(v.name, v.type.tensor_type.elem_type) for v in getattr(m.graph, what)] for m in (model, original))
            if got != want:
                raise ValueError(f"graph {what}s changed: {got} instead of {want}")


def remeasure(original: Path, pruned: Path, rounds: int) -> dict[str, float]:
    """Interleaved medians of the two files, single-threaded sessions, one seeded input of the model's shape."""
    sessions = [session(p, threads=1) for p in (original, pruned)]
    inp = sessions[0].get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    cpu: list[list[float]] = [[], []]
    wall: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            w0, t0 = time.perf_counter(), time.thread_time()
            sessions[i].run(None, feed)
            cpu[i].append(time.thread_time() - t0)
            wall[i].append(time.perf_counter() - w0)
    before, after = (1e3 * statistics.median(t) for t in cpu)
    wall_before, wall_after = (1e3 * statistics.median(t) for t in wall)
    return {"before_ms": before, "after_ms": after, "ratio": after / before, "wall_before_ms": wall_before,
            "wall_after_ms": wall_after, "wall_ratio": wall_after / wall_before}
