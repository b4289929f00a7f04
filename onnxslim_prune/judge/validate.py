"""Validation of a pruned model against its original, and the size figures of a model.

A pruned model is accepted only if it passes ``onnx.checker.check_model(full_check=True)``,
strict shape inference, loads in onnxruntime, runs, and its graph outputs keep the
original's names, element types and shapes (symbolic dims included) and give finite values
wherever the original's are finite. How closely it follows the original is measured, not
assumed, on the verdict's samples (see `verdict` for the figures and `api` for which
samples: held-out evaluation or calibration data, else `RANDOM_SAMPLES` seeded random inputs).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .. import ir
from ..errors import ValidationError
from ..analysis.trace import node_macs
from .verdict import AgreementAccumulator, OutputAgreement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStats:
    """Size figures of a model.

    `file_bytes` is the model's serialized size (`ModelProto.ByteSize()`): the size of the
    file written without external data. With external data the .onnx file is smaller and
    the rest is in its data file; the figure stays the serialized size.
    """

    params: int
    macs: int
    file_bytes: int


def model_stats(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], *, file_bytes: int | None = None
) -> ModelStats:
    """Parameters, MACs of the weighted ops at `input_shapes`, serialized size.

    `file_bytes` is the serialized size when the caller knows it (the length of the bytes it
    wrote or ran); otherwise it is counted from the tensors' headers (`ir.serialized_size`),
    never by serializing the model.
    """
    shapes = ir.static_shapes(model, input_shapes)
    graph = gs.import_onnx(ir.skeleton(model))

    def shape_of(t: gs.Tensor) -> tuple[int, ...] | None:
        return shapes.get(t.name)

    macs = sum(node_macs(n, shape_of) for n in graph.nodes)
    size = ir.serialized_size(model) if file_bytes is None else file_bytes
    return ModelStats(ir.count_parameters(model), int(macs), int(size))


def session(
    model: onnx.ModelProto, threads: int = 0, *, path: str | os.PathLike[str] | None = None,
    serialized: bytes | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session of `model`.

    `serialized` (the model's bytes, `ir.serialize`) or `path` (the unchanged file it was
    loaded from) spare serializing the model: onnxruntime reads those instead. A large model that
    holds its weights is made from them (`ir.inference_session`: no bytes, no parse of a copy),
    which costs less memory at its peak than either.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if ir.takes_scratch_file(model.graph.initializer) or ir.is_file_view(model):
        return ir.inference_session(model, opts)
    if serialized is not None:
        return ort.InferenceSession(serialized, opts, providers=["CPUExecutionProvider"])
    if path is not None:
        return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    return ir.inference_session(model, opts)


def random_inputs(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int, token_ids: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal for floats, zeros for integers and booleans.

    `token_ids` (`token_id_inputs`): integer inputs drawn uniformly in ``[0, vocabulary)`` instead,
    from their own generator so the float inputs stay the same draws.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for index, vi in enumerate(model.graph.input):
        if vi.name not in shapes:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating):
            out[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif token_ids and vi.name in token_ids:
            ids = np.random.default_rng([seed, index, 0x1D5]).integers(0, token_ids[vi.name], size=shape)
            out[vi.name] = ids.astype(dtype)
        else:
            out[vi.name] = np.zeros(shape, dtype=dtype)
    return out


#: ops an id tensor passes through unchanged on its way to an embedding's Gather
_ID_PRESERVING = frozenset({"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
#: ops between an embedding table's initializer and its Gather (fp16 / QDQ tables)
_TABLE_PRESERVING = frozenset({"Cast", "Identity", "DequantizeLinear"})


def token_id_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index an embedding table (a Gather on a constant), with the smallest vocabulary.

    An id past the vocabulary is an onnxruntime error, and all-zero ids make every sample the same
    (no correlation across samples): random ids in range exercise the structure. They are not text:
    the verdict on them is structure only (`verdict`).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}

    def table_shape(name: str) -> tuple[int, ...] | None:
        for _ in range(4):
            if name in dims:
                return dims[name]
            node = producer.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                return None if value is None else tuple(value.dims)
            if node.op_type not in _TABLE_PRESERVING or not node.input:
                return None
            name = node.input[0]
        return None

    found: dict[str, int] = {}
    initializers = set(dims)
    for vi in model.graph.input:
        elem = vi.type.tensor_type.elem_type
        if vi.name in initializers or elem not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            continue
        vocab: list[int] = []
        frontier, seen = [vi.name], {vi.name}
        while frontier:
            name = frontier.pop()
            for node in consumers.get(name, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                    shape = table_shape(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if shape and -len(shape) <= axis < len(shape) and shape[axis] > 0:
                        vocab.append(int(shape[axis]))
                elif node.op_type in _ID_PRESERVING and node.input and node.input[0] == name:
                    for out in node.output:
                        if out not in seen:
                            seen.add(out)
                            frontier.append(out)
        if vocab:
            found[vi.name] = min(vocab)
    return found


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, dict(feeds))


#: seeded random samples of a data-free verdict (enough for a correlation across samples)
RANDOM_SAMPLES = 16
#: fewest random samples of a data-free verdict on a large model
MIN_RANDOM_SAMPLES = 4
#: weight bytes up to which a data-free verdict takes all `RANDOM_SAMPLES`
RANDOM_SAMPLES_FULL_BYTES = 64 << 20


def random_samples_for(model: onnx.ModelProto) -> int:
    """Random samples of a data-free verdict: `RANDOM_SAMPLES`, fewer for large models (at least `MIN_RANDOM_SAMPLES`).

    Random inputs prove structure, not function, and a handful of samples proves structure
    as well as 16; on VGG-16 (528 MB) the 16 samples through the original were the slowest
    stage of a data-free run (8.7 of 23 s). Scaled by the weights' bytes, inversely, so the
    count is deterministic: 64 MB or less 16, ResNet-50 (97 MB) 10, VGG-16 4.
    """
    size = ir.payload_bytes(model)
    if size <= RANDOM_SAMPLES_FULL_BYTES:
        return RANDOM_SAMPLES
    return max(MIN_RANDOM_SAMPLES, int(RANDOM_SAMPLES * RANDOM_SAMPLES_FULL_BYTES / size))
Feeds = list[dict[str, np.ndarray]]
Outputs = list[list[np.ndarray]]


def sample_feeds(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], limit: int | None = None) -> Feeds:
    """Up to `limit` samples of `arrays` (batch first), in batches the model accepts."""
    count = min(len(a) for a in arrays.values())
    count = count if limit is None else min(count, limit)
    static = ir.static_batch(model)
    batch = static or 32
    if static:
        count -= count % static  # a fixed batch cannot take a remainder; a dynamic one takes it as a smaller batch
    return [{k: np.ascontiguousarray(a[i : i + batch]) for k, a in arrays.items()} for i in range(0, count, batch)]


def calibration_feeds(model: onnx.ModelProto, calib: Any, limit: int | None = None) -> Feeds:
    """Batches of a `CalibrationSet` (up to `limit` samples) that the model accepts."""
    static = ir.static_batch(model)
    feeds: Feeds = []
    taken = 0
    for batch in calib.iter_batches(static or 32, drop_last=static is not None):
        if limit is not None and taken >= limit:
            break
        if limit is not None and not static and taken + len(next(iter(batch.values()))) > limit:
            batch = {k: v[: limit - taken] for k, v in batch.items()}
        feeds.append(batch)
        taken += len(next(iter(batch.values())))
    return feeds


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int, samples: int = RANDOM_SAMPLES) -> Feeds:
    """`samples` seeded random samples (fewer batches of a static batch size); token ids within each vocabulary.

    Only the data-free verdict takes these: they prove structure, not function (`verdict`).
    """
    batch = ir.static_batch(model) or 1
    ids = token_id_inputs(model)
    return [random_inputs(model, shapes, seed + i, ids) for i in range(max(1, -(-samples // batch)))]


def feed_samples(feeds: Feeds) -> int:
    return sum(len(next(iter(f.values()))) if f else 1 for f in feeds)


def open_session(
    model: onnx.ModelProto, what: str = "model", *, path: str | os.PathLike[str] | None = None,
    serialized: bytes | None = None,
) -> ort.InferenceSession:
    """`session`, with a failure raised as `ValidationError` (the model does not load in onnxruntime)."""
    try:
        return session(model, path=path, serialized=serialized)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValidationError(f"{what} does not run in onnxruntime: {str(exc).splitlines()[0]}") from None


def outputs_of(
    model: onnx.ModelProto, feeds: Feeds, what: str = "model", progress: Callable[[int, int], None] | None = None,
    *, sess: ort.InferenceSession | None = None, shrink: bool = False,
) -> Outputs:
    """Every output of `model` on every feed (one session, freed afterwards; or `sess`, the caller's).

    `shrink`: onnxruntime gives its arena back after each run (`shrinking`), for a session kept afterwards.
    Raises `ValidationError` if the model does not run.
    """
    try:
        sess = session(model) if sess is None else sess
        options = shrinking() if shrink else None
        runs = []
        for done, feed in enumerate(feeds, start=1):
            runs.append(sess.run(None, feed, options))
            if progress is not None:
                progress(done, len(feeds))
        return runs
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValidationError(f"{what} does not run in onnxruntime: {str(exc).splitlines()[0]}") from None


class HeldOutputs:
    """The original's outputs on the verdict's batches: in memory while they fit `budget` bytes, beyond it on disk.

    Holding every batch costs samples x output size: a language model's logits on 205
    windows of 128 tokens are 5 GB. A batch past the budget is written to ``.npy`` files in
    a temporary folder and read back (bit for bit) when the verdict reads it, so the
    original's session is not needed again beside the pruned model's. The folder is removed
    by `close`, when the object is collected, and at interpreter exit (Ctrl-C included).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        #: bytes written to disk
        self.spilled_bytes = 0
        self._batches: list[list[np.ndarray] | list[Path]] = []
        self._in_memory: list[bool] = []
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        #: the first batch's outputs' shapes (the verdict reads the output ranks and classes off them)
        self.first_shapes: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def kept(self) -> int:
        """How many batches are held in memory."""
        return sum(self._in_memory)

    @property
    def folder(self) -> Path | None:
        """Where the batches past the budget are (None: none are)."""
        return None if self._folder is None else Path(self._folder.name)

    def add(self, outputs: list[np.ndarray]) -> None:
        if not self._batches:
            self.first_shapes = tuple(tuple(o.shape) for o in outputs)
        size = sum(o.nbytes for o in outputs)
        if self.nbytes + size <= self.budget:
            self._batches.append(outputs)
            self._in_memory.append(True)
            self.nbytes += size
            return
        if self._folder is None:
            # TemporaryDirectory removes itself when collected and at exit (weakref.finalize)
            self._folder = tempfile.TemporaryDirectory(prefix="onnxslim-reference-")
            log.info("verdict: the original's outputs past %d MiB are kept on disk in %s", self.budget >> 20,
                     self._folder.name)
        paths = []
        for k, output in enumerate(outputs):
            path = Path(self._folder.name) / f"{len(self._batches)}-{k}.npy"
            np.save(path, output, allow_pickle=False)
            paths.append(path)
        self._batches.append(paths)
        self._in_memory.append(False)
        self.spilled_bytes += size

    def get(self, index: int) -> list[np.ndarray]:
        """Batch `index`'s outputs, from memory or read back from disk (the same bits)."""
        held = self._batches[index]
        if self._in_memory[index]:
            return held  # type: ignore[return-value]
        return [np.load(path, allow_pickle=False) for path in held]  # type: ignore[arg-type]

    def close(self) -> None:
        """Remove the folder of the batches past the budget (those held in memory go with this object)."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def shrinking() -> ort.RunOptions:
    """Run options that give onnxruntime's arena back after the run.

    A session kept for later (the pruned model's across the verdict's batches) otherwise holds
    the arena its largest batch grew: EfficientNet-Lite1 at 240x240 about 11 MB a sample,
    2.9 GB after a batch of 256. The shrink costs the next run its allocations, so timed runs
    never use it.
    """
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def rebatched(feeds: Feeds, most: int) -> Feeds:
    """`feeds` with every batch larger than `most` samples split (views, same sample order)."""
    out: Feeds = []
    for feed in feeds:
        count = len(next(iter(feed.values()))) if feed else 0
        if count <= most:
            out.append(feed)
            continue
        out.extend({k: v[start : start + most] for k, v in feed.items()} for start in range(0, count, most))
    return out


def check_dtypes(original: onnx.ModelProto, pruned: onnx.ModelProto, outputs: Sequence[np.ndarray]) -> None:
    expected = {o.name: o for o in original.graph.output}
    for vi, value in zip(pruned.graph.output, outputs):
        want = onnx.helper.tensor_dtype_to_np_dtype(expected[vi.name].type.tensor_type.elem_type)
        if value.dtype != want:
            raise ValidationError(f"output {vi.name}: dtype {value.dtype}, expected {want}")


def agreement_of(
    original: onnx.ModelProto, pruned: onnx.ModelProto, reference: Outputs, outputs: Outputs, feeds: Feeds
) -> tuple[OutputAgreement, ...]:
    """Per-output agreement of `outputs` with `reference` over `feeds` (see `verdict`).

    Raises `ValidationError` if an output's dtype or shape changed, or the pruned model gives
    non-finite values where the original does not.
    """
    acc = AgreementOf(original, pruned)
    for ref, out, feed in zip(reference, outputs, feeds):
        acc.add(ref, out, feed)
    return acc.results()


class AgreementOf:
    """`agreement_of`, fed one batch of both models' outputs at a time (nothing else is held)."""

    def __init__(self, original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
        self._models = (original, pruned)
        self._acc = AgreementAccumulator([o.name for o in original.graph.output])
        self._checked = False
        self._mask = ir.token_mask_input(original)

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feed: Mapping[str, np.ndarray]) -> None:
        if not self._checked:
            check_dtypes(*self._models, outputs)
            self._checked = True
        mask = None if self._mask is None else feed.get(self._mask)
        if mask is not None and not np.all(mask):
            reference, outputs = without_padding(reference, np.asarray(mask)), without_padding(outputs, np.asarray(mask))
        self._acc.add(reference, outputs, feed_samples([dict(feed)]))

    def results(self) -> tuple[OutputAgreement, ...]:
        return self._acc.results()


def without_padding(values: Sequence[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """`values` with the positions of padding tokens (`ir.token_mask_input` 0) set to zero, in the outputs whose
    leading axes are the mask's ``[N, T]``: both models then agree there exactly and add nothing to the cosine."""
    out = []
    for value in values:
        if value.ndim >= 2 and value.shape[:2] == mask.shape and np.issubdtype(value.dtype, np.floating):
            keep = (mask != 0).reshape(mask.shape + (1,) * (value.ndim - 2))
            value = np.where(keep, value, np.zeros((), dtype=value.dtype))
        out.append(value)
    return out


def compare(
    original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: Feeds,
    sessions: tuple[ort.InferenceSession | None, ort.InferenceSession | None] = (None, None),
) -> tuple[OutputAgreement, ...]:
    """Run both models on `feeds` (one session at a time, or the caller's `sessions`) and measure their agreement.

    With both sessions given, batch by batch: one batch of each model's outputs is held at a time.
    """
    first, second = sessions
    if first is None or second is None:
        reference = outputs_of(original, feeds, "original model", sess=first)
        return agreement_of(original, pruned, reference, outputs_of(pruned, feeds, "pruned model", sess=second), feeds)
    acc = AgreementOf(original, pruned)
    for feed in feeds:
        acc.add(outputs_of(original, [feed], "original model", sess=first, shrink=True)[0],
                outputs_of(pruned, [feed], "pruned model", sess=second, shrink=True)[0], feed)
    return acc.results()


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


def check_structure(original: onnx.ModelProto, pruned: onnx.ModelProto, *, serialized: bytes | None = None,
                    path: str | os.PathLike[str] | None = None) -> None:
    """The checker (full), the input/output contract and strict shape inference; running is checked by the verdict.

    `serialized` is `ir.serialize(pruned)` when the caller has it, `path` a file that holds `pruned` whole (a
    `ir.ScratchFile`'s copy of a view): the checker reads those instead.
    """
    ir.check_model(pruned, full=True, what="pruned model", serialized=serialized, path=path)
    check_contract(original, pruned)
    ir.check_inference(pruned)
