"""Model files: loading, checking, atomic saving, external data, and sizes read from the tensors' headers.

Large models: the weights are parsed once (`load_model`) and never serialized just to be measured or
checked. Sizes come from the tensors' headers (`payload_bytes`, `serialized_size`, `exceeds_proto_limit`), and
a model that is serialized anyway (for onnxruntime and the file) hands the same bytes to the checker
(`serialize`, `check_model(serialized=...)`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from ..atomic import Outputs, cannot_write, temporary
from ..errors import ModelError, UsageError

#: protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTO_LIMIT = 2**31 - 2**24
#: initializers at least this large go to an external file when external data is written.
EXTERNAL_THRESHOLD = 1024


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
    missing = [what for what, absent in (("IR version", model.ir_version <= 0), ("graph", not model.HasField("graph")),
                                         ("opset", not model.opset_import)) if absent]
    if missing:
        raise ModelError(f"{p}: not an ONNX model (no {', no '.join(missing)})")
    if not model.graph.node:
        raise ModelError(f"{p}: the graph has no nodes: nothing to prune")
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
        stand_in = None if full or path is None or serialized is not None else _weights_checked_in_file(model, path)
        if serialized is not None:
            onnx.checker.check_model(serialized, full_check=full)
        elif stand_in is not None:
            onnx.checker.check_model(stand_in, full_check=False)
        elif path is not None and os.path.getsize(path) < PROTO_LIMIT:
            onnx.checker.check_model(os.fspath(path), full_check=full)
        elif not exceeds_proto_limit(model):
            onnx.checker.check_model(model, full_check=full)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                save_external(model, path)
                onnx.checker.check_model(str(path), full_check=full)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{what} fails the ONNX checker: {first}") from None


def _weights_checked_in_file(model: onnx.ModelProto, path: str | os.PathLike[str]) -> onnx.ModelProto | None:
    """For the structural check (`full=False`) of a model loaded from `path`: a copy whose initializers with raw data
    in the file are checked here, against their data's span in the file, and stand in for the checker as empty
    tensors of the same name and type.

    The checker's own check of such a tensor is that it has a type, one value field, and raw data of exactly its
    elements' size; everything else (nodes, names, opsets, other tensors) goes to the checker as it is, so a bad
    tensor fails with the checker's own message. Checking the file instead parsed all of it again in C++ (VGG-16:
    528 MB, over a second). None when a large initializer is not inline raw data in the file (external data,
    typed fields): the caller checks the file.
    """
    spans = raw_data_in_file(path)
    if spans is None:
        return None
    out = without_initializers(model)
    for init in model.graph.initializer:
        if _raw_data_checked(init, spans):
            out.graph.initializer.add(name=init.name, data_type=init.data_type, dims=[0])  # valid, no data
        elif _raw_bytes(init) >= EXTERNAL_THRESHOLD:
            return None
        else:
            out.graph.initializer.add().CopyFrom(init)
    return out


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _raw_data_checked(tensor: onnx.TensorProto, spans: RawData) -> bool:
    """The checker's tensor check passes `tensor`, whose raw data is at `spans` in the file it was loaded from."""
    span = spans.spans.get(tensor.name)
    if span is None or tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        return False
    _, length, data_type, dims = span
    if data_type != tensor.data_type or dims != tuple(tensor.dims) or any(d < 0 for d in dims):
        return False
    if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING) or data_type in _PACKED_BITS:
        return False
    if any(len(getattr(tensor, name)) for name in _TYPED_FIELDS):
        return False
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return False
    count = _elements(tensor)
    return count > 0 and length == count * itemsize


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


# ----------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class RawData:
    """Where the main graph's initializers keep their raw data in a model file (see `raw_data_in_file`)."""

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


def raw_data_in_file(path: str | os.PathLike[str]) -> RawData | None:
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


# ----------------------------------------------------------------------------- file views

#: a loaded model whose float weights pass this many bytes is held as a view of its file (`file_view`)
FILE_VIEW_BYTES = int(os.environ.get("ONNXSLIM_PRUNE_FILE_VIEW_BYTES", str(64 << 20)))
#: the smallest tensor kept in a data file rather than in the model: a view's, a session's scratch file, a refit
#: stage's weights taken by name (smaller ones are cheaper copied than referred to)
MAPPED_MIN_BYTES = 4096
#: alignment of the tensors a `ScratchFile` keeps (a page: mappable where they lie)
_PAGE = 4096


def file_view(model: onnx.ModelProto, path: str | os.PathLike[str]) -> onnx.ModelProto:
    """`model` with its large float initializers left in the file it was loaded from (`path`, unchanged), or `model`
    itself (less than `FILE_VIEW_BYTES` of them, or weights not inline in the file).

    Such a tensor keeps its name, type and dims and refers to its raw data where it lies in the file
    (`data_location` EXTERNAL, its *absolute* path as location: the mark of a view, never written out). The
    loaded model's copy of those bytes can then be freed: its sessions map them from the file
    (`runtime.inference_session`), `file_view_values` reads them, and the run holds the weights once, in its
    graph, instead of twice (SmolLM2-135M: 0.65 GB). Sizes count them as the model's own.
    """
    if payload_bytes(model) < FILE_VIEW_BYTES:
        return model
    spans = raw_data_in_file(path)
    if spans is None:
        return model
    moved = {init.name for init in model.graph.initializer if _viewable(init, spans)}
    if not moved or sum(_raw_bytes(i) for i in model.graph.initializer if i.name in moved) < FILE_VIEW_BYTES:
        return model
    location = os.path.abspath(spans.path)
    out = without_initializers(model)
    for init in model.graph.initializer:
        if init.name not in moved:
            out.graph.initializer.add().CopyFrom(init)
            continue
        offset, length, _, _ = spans.spans[init.name]
        out.graph.initializer.append(external_header(init, location, offset, length))
    return out


def external_header(like: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    """A tensor of `like`'s name, type and dims whose raw data is `length` bytes at `offset` of the file `location`."""
    header = onnx.TensorProto(name=like.name, data_type=like.data_type, dims=like.dims,
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        header.external_data.add(key=key, value=value)
    return header


def append_aligned(handle: BinaryIO, end: int, raw: bytes | memoryview) -> tuple[int, int]:
    """Write `raw` to the data file `handle` (now `end` bytes long) at the next page boundary: (its offset, the new
    end). Page-aligned tensors can be mapped where they lie (onnxruntime maps them instead of copying)."""
    end += handle.write(b"\0" * (-end % _PAGE))
    return end, end + handle.write(raw)


def _viewable(tensor: onnx.TensorProto, spans: RawData) -> bool:
    return (tensor.data_type in FLOAT_TYPES and _raw_bytes(tensor) >= MAPPED_MIN_BYTES
            and _raw_data_checked(tensor, spans))


def viewed_span(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(file, offset, length) of a tensor of a `file_view`; None for any other tensor."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not os.path.isabs(location) or "offset" not in entries or "length" not in entries:
        return None
    return location, int(entries["offset"]), int(entries["length"])


def is_file_view(model: onnx.ModelProto) -> bool:
    return any(viewed_span(t) is not None for t in model.graph.initializer)


def view_file(model: onnx.ModelProto) -> str | None:
    """The one file the tensors of a `file_view` refer to (None: no view, or a view of several files)."""
    files = {span[0] for span in map(viewed_span, model.graph.initializer) if span is not None}
    return files.pop() if len(files) == 1 else None


def file_view_values(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The values of a `file_view` tensor, read from its file (a fresh, writable array); None for any other."""
    span = viewed_span(tensor)
    if span is None:
        return None
    location, offset, length = span
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = _elements(tensor)
    values = np.fromfile(location, dtype=dtype, count=count, offset=offset)
    if values.size != count or count * dtype.itemsize != length:
        raise ModelError(f"{location}: the weights of {tensor.name!r} changed while the run read them")
    return values.reshape(tuple(tensor.dims))


class ScratchFile:
    """A temporary file that holds a model's weights for a while (`hold`), removed when the block ends (`with`),
    also on an error or Ctrl-C."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._kept = 0  # bytes written to the data file of `keep`

    def __enter__(self) -> ScratchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _made(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="onnxslim-held-"))
        return self._folder

    def keep(self, name: str, values: np.ndarray) -> onnx.TensorProto:
        """A `file_view` tensor of `values` (float, little-endian), appended to this file's data file: the caller
        holds the small header instead of the array. Offsets are page-aligned, so a session can map them."""
        path = self._made() / "kept.bin"
        data = np.require(values, requirements="C")  # a scalar stays a scalar
        with open(path, "ab") as handle:
            offset, self._kept = append_aligned(handle, self._kept, data.reshape(-1).view(np.uint8).data)
        like = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(data.dtype), dims=data.shape)
        return external_header(like, str(path), offset, data.nbytes)

    def hold(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` as a `file_view` of a copy written here, when large enough (else `model`): a caller that rebinds
        its name to the result frees the loaded weights (``pruned = scratch.hold(pruned)``).

        The copy is written tensor by tensor (`write_serialized`): the whole model is never serialized at once.
        """
        if payload_bytes(model) < FILE_VIEW_BYTES:
            return model
        folder = self._made()
        path = folder / f"model{sum(1 for p in folder.iterdir() if p.suffix == '.onnx')}.onnx"
        with open(path, "wb") as handle:
            write_serialized(model, handle)
        return file_view(model, path)


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the tensors of a `file_view` read back into it (the model itself when it is no view)."""
    if not is_file_view(model):
        return model
    out = without_initializers(model)
    for init in model.graph.initializer:
        values = file_view_values(init)
        if values is None:
            out.graph.initializer.add().CopyFrom(init)
        else:
            out.graph.initializer.add().CopyFrom(numpy_helper.from_array(values, init.name))
    return out


# ----------------------------------------------------------------------------- shapes


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
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


# ----------------------------------------------------------------------------- export


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, as `save_model` writes them without external data; None past protobuf's limit."""
    return None if exceeds_proto_limit(model) else model.SerializeToString()


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external: bool = False, serialized: bytes | None = None
) -> None:
    """Write atomically (`atomic.Outputs`): the model and its external data file, both or neither."""
    with Outputs() as outputs:
        stage_model(outputs, model, Path(path), external=external, serialized=serialized)
        outputs.commit()


def stage_model(
    outputs: Outputs, model: onnx.ModelProto, target: Path, *, external: bool = False, serialized: bytes | None = None
) -> None:
    """Write the model into temporaries of `outputs`, committed with the run's other files.

    External data is written when asked (the input had it) or when the model exceeds
    protobuf's limit; its data file is named after the output (NAME.data) and staged before
    the model, so it is renamed first. `serialized` is `serialize(model)` when the caller has
    it already (it is then written as it is, and the model is not serialized again).
    """
    folder = target.parent if str(target.parent) else Path(".")
    check_writable_folder(folder)
    model = materialized(model)  # a view's weights are written, never its references into a temporary file
    external = external or (serialized is None and exceeds_proto_limit(model))
    data_name = f"{target.name}.data"
    try:
        if external:
            tmp_data = outputs.stage(folder / data_name)
            tmp = outputs.stage(target)
            if not _write_external(model, tmp, tmp_data, data_name):  # every tensor under the threshold
                outputs.drop(folder / data_name)
        else:
            tmp = outputs.stage(target)
            if serialized is None and payload_bytes(model) >= FILE_VIEW_BYTES:
                with open(tmp, "wb") as handle:
                    write_serialized(model, handle)
            else:
                tmp.write_bytes(model.SerializeToString() if serialized is None else serialized)
    except OSError as exc:
        raise cannot_write(target, exc) from None


def write_serialized(model: onnx.ModelProto, handle: BinaryIO) -> int:
    """Write ``model.SerializeToString()``'s bytes to `handle` an initializer at a time (returns the length).

    A message serializes as its fields in field-number order: the model's fields before its graph (7), the graph's
    length-prefixed bytes, then the rest; the graph's fields before its initializers (5), each initializer, then the
    rest. So the bytes are those of one `SerializeToString` (a test compares them), and a large model is never held
    twice (SmolLM2-135M: 0.45 GB less at the end of a run).
    """
    light = without_initializers(model)
    front, back = onnx.ModelProto(), onnx.ModelProto()
    front.CopyFrom(light)
    back.CopyFrom(light)
    for descriptor in onnx.ModelProto.DESCRIPTOR.fields:
        (back if descriptor.number < _MODEL_GRAPH else front).ClearField(descriptor.name)
    back.ClearField("graph")
    head, tail = onnx.GraphProto(), onnx.GraphProto()
    head.CopyFrom(light.graph)
    tail.CopyFrom(light.graph)
    for descriptor in onnx.GraphProto.DESCRIPTOR.fields:
        (tail if descriptor.number < _GRAPH_INITIALIZER else head).ClearField(descriptor.name)
    graph_parts = [head.SerializeToString(), tail.SerializeToString()]
    sizes = [_tensor_size(t) for t in model.graph.initializer]
    graph_length = sum(map(len, graph_parts)) + sum(1 + _varint_size(size) + size for size in sizes)
    written = handle.write(front.SerializeToString())
    written += handle.write(bytes([_MODEL_GRAPH << 3 | 2]) + _varint_bytes(graph_length))
    written += handle.write(graph_parts[0])
    for tensor, size in zip(model.graph.initializer, sizes):
        written += handle.write(bytes([_GRAPH_INITIALIZER << 3 | 2]) + _varint_bytes(size))
        written += handle.write(tensor.SerializeToString())
    written += handle.write(graph_parts[1])
    return written + handle.write(back.SerializeToString())


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def check_writable_folder(folder: Path) -> None:
    """Raise `UsageError` unless a file can really be created in `folder` (root ignores os.access)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    temporary(folder, "write-check").unlink(missing_ok=True)


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> None:
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


def _write_external(model: onnx.ModelProto, path: Path, data_path: Path, location: str) -> int:
    """Write the model to `path` with its large initializers in `data_path`, referenced as `location`.

    The layout of `onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True)`, written
    here because onnx refuses a data file that exists (checked against the working folder, not the
    model's) and names the file it writes after `location`: the data goes to this run's own temporary
    under the final name's reference. Returns how many tensors went to the data file.
    """
    from onnx.external_data_helper import _get_initializer_tensors, set_external_data  # noqa: PLC2701

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    count = 0
    with open(data_path, "wb") as data:
        for tensor in _get_initializer_tensors(copy):
            if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                offset = data.tell()
                data.write(tensor.raw_data)
                set_external_data(tensor, location, offset, data.tell() - offset)
                tensor.ClearField("raw_data")
                count += 1
    path.write_bytes(copy.SerializeToString())
    return count


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Some initializer keeps its data in an external file (a `file_view`'s tensors are the model's own)."""
    return any(init.data_location == onnx.TensorProto.EXTERNAL and viewed_span(init) is None
               for init in model.graph.initializer)


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
        if not external and viewed_span(tensor) is None:  # a view's data is the model's own (`file_view`)
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
    """`tensor.ByteSize()`, with its raw data counted, not serialized (a `file_view` tensor: as the file has it)."""
    if viewed_span(tensor) is not None:
        header = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        length = _raw_bytes(tensor)
        return int(header.ByteSize()) + 1 + _varint_size(length) + length
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
    light = without_initializers(model)
    bare = int(light.graph.ByteSize())
    full = bare + sum(1 + _varint_size(size) + size for size in map(_tensor_size, model.graph.initializer))  # tag 5: 1 byte
    return int(light.ByteSize()) - _varint_size(bare) - bare + _varint_size(full) + full


# ----------------------------------------------------------------------------- counting


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
        return t.data_type in FLOAT_TYPES or t.data_type in _WEIGHT_INT_TYPES or name in quantized

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


# ----------------------------------------------------------------------------- copies and export


