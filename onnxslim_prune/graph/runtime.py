"""onnxruntime sessions of in-memory models, without the serialized copy of their weights.

A session made from ``model.SerializeToString()`` holds, while it is built, the proto's weights,
their bytes, onnxruntime's parse of those bytes and its own tensors: four copies (SmolLM2-135M:
2.6 GB peak for a 0.65 GB model, and a run builds a session per statistics pass). A large model
is instead written to a scratch folder as a weightless model plus one external-data file of
page-aligned tensors; onnxruntime maps that file instead of copying it (the tensors it prepacks
become its own copy, the rest stay file-backed pages) and the folder is removed as soon as the
session exists (on Linux a mapped file lives on after its name is gone). Measured on SmolLM2-135M:
a 1.46 GB peak instead of 2.58 GB, and 1 s to build instead of 11 s.

Small models (and other systems, where a mapped file cannot be removed) keep the serialized path:
the same values either way, as the tensors are byte for byte the same.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from .io import (MAPPED_MIN_BYTES, PROTO_LIMIT, append_aligned, external_header, file_view_values, tensor_bytes,
                 viewed_span, without_initializers)

#: weights (summed over the initializers written out) from which a session is built from a scratch file
SCRATCH_SESSION_BYTES = 64 << 20
_MAPPED_FILES_OUTLIVE_NAMES = sys.platform.startswith("linux")
#: the session option that tells onnxruntime where a view's external tensors lie
_FOLDER_ENTRY = "session.model_external_initializers_file_folder_path"


def calibration_options(*, optimize: bool = True) -> ort.SessionOptions:
    """Options of a session that only computes calibration values (never one that is timed).

    onnxruntime's memory pattern (``enable_mem_pattern``) plans one block for every activation of a run at a
    given input shape and keeps it: a statistics pass over SmolLM2-135M's residual sums, 32 windows of 128
    tokens, peaked 1.2 GB higher with it (3,355 against 2,124 MiB resident) and ran no faster (9.2 s against
    8.9 s). Without it the arena still reuses freed blocks; the values are the same. The caller reduces each
    batch with numpy between runs: idle threads must not spin meanwhile. Errors only: the library never prints.
    `optimize` False: no graph optimisation (a run that reads shapes, not values).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def weights_out_of_line(initializers: Iterable[onnx.TensorProto]) -> int:
    """Bytes of the initializers a scratch session would write to its data file."""
    return sum(_out_of_line(t) for t in initializers)


def takes_scratch_file(initializers: Iterable[onnx.TensorProto]) -> bool:
    """Whether `inference_session` builds a session of a model with these initializers from a scratch file."""
    return _MAPPED_FILES_OUTLIVE_NAMES and weights_out_of_line(initializers) >= SCRATCH_SESSION_BYTES


def _out_of_line(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's raw data when large enough for the data file (a view's stay in its own file)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return 0
    size = tensor_bytes(tensor)
    return size if size >= MAPPED_MIN_BYTES else 0


def inference_session(
    model: onnx.ModelProto,
    options: ort.SessionOptions,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    initializers: Iterable[onnx.TensorProto] | None = None,
) -> ort.InferenceSession:
    """A session of `model`, whose initializers are `initializers` when given (then `model` has none of its own:
    a cut or an exposed model made without copying the weights into it).

    Large weights go through a scratch external-data file (module docstring); the model is never
    serialized with them. `options` serve one session: a view's binds them to its file's folder (onnxruntime then
    looks for every external tensor there), so options already bound are refused, not reused.
    """
    if _bound_folder(options) is not None:
        raise ValueError("inference_session: these SessionOptions were bound to a view's folder by an earlier "
                         "session; give each session its own")
    tensors = list(model.graph.initializer) if initializers is None else list(initializers)
    viewed = _viewed_folder(tensors)
    if viewed is not None and not takes_scratch_file(tensors):
        # a view of the input file (`io.file_view`): onnxruntime maps the weights from that file itself
        bare = model if initializers is not None else without_initializers(model)
        options.add_session_config_entry(_FOLDER_ENTRY, viewed)
        return ort.InferenceSession(_with_views(bare, tensors, viewed).SerializeToString(), options,
                                    providers=list(providers))
    if not _any_viewed(tensors) and not takes_scratch_file(tensors):
        if initializers is None:
            payload = model.SerializeToString() if model.ByteSize() < PROTO_LIMIT else None
        else:
            whole = onnx.ModelProto()
            whole.CopyFrom(model)
            whole.graph.initializer.extend(tensors)
            payload = whole.SerializeToString() if whole.ByteSize() < PROTO_LIMIT else None
            del whole
        if payload is not None:
            return ort.InferenceSession(payload, options, providers=list(providers))
    folder = Path(tempfile.mkdtemp(prefix="onnxslim-session-"))
    try:
        path = _write_scratch(model if initializers is not None else without_initializers(model), tensors, folder)
        return ort.InferenceSession(str(path), options, providers=list(providers))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bound_folder(options: ort.SessionOptions) -> str | None:
    """The external-initializers folder a view's session set on `options`, None when unset."""
    try:
        return options.get_session_config_entry(_FOLDER_ENTRY) or None
    except RuntimeError:  # onnxruntime raises for a key never set
        return None


def _viewed_folder(tensors: Sequence[onnx.TensorProto]) -> str | None:
    """The one folder of the files the `io.file_view` tensors among `tensors` refer to (None: none, or several:
    the scratch file then takes copies of them)."""
    folders = {os.path.dirname(span[0]) for span in map(viewed_span, tensors) if span is not None}
    return folders.pop() if len(folders) == 1 else None


def _any_viewed(tensors: Sequence[onnx.TensorProto]) -> bool:
    return any(viewed_span(t) is not None for t in tensors)


def _with_views(bare: onnx.ModelProto, tensors: Sequence[onnx.TensorProto], folder: str) -> onnx.ModelProto:
    """`bare` with `tensors`, the viewed ones referring to their file by its name in `folder` (as onnxruntime
    resolves external data of a model made from bytes)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(bare)
    for tensor in tensors:
        header = skeleton.graph.initializer.add()
        header.CopyFrom(tensor)
        span = viewed_span(tensor)
        if span is not None:
            for entry in header.external_data:
                if entry.key == "location":
                    entry.value = os.path.relpath(span[0], folder)
    return skeleton


def _write_scratch(bare: onnx.ModelProto, tensors: Sequence[onnx.TensorProto], folder: Path) -> Path:
    """`bare` (no initializers) with `tensors` as its initializers, the large ones (and views) in ``weights.bin``."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(bare)
    offset = 0
    with open(folder / "weights.bin", "wb") as data:
        for tensor in tensors:
            viewed = file_view_values(tensor)
            if viewed is None and not _out_of_line(tensor):
                skeleton.graph.initializer.append(tensor)  # small: copied as it is
                continue
            raw = tensor.raw_data if viewed is None else viewed.tobytes()  # one tensor's bytes at a time
            start, offset = append_aligned(data, offset, raw)
            skeleton.graph.initializer.append(external_header(tensor, "weights.bin", start, len(raw)))
            del raw
    path = folder / "model.onnx"
    path.write_bytes(skeleton.SerializeToString())
    return path
