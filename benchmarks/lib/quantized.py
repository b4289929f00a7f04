"""Quantized and half-precision forms of a model: onnxruntime's QDQ static quantization and fp16 storage.

    from lib.quantized import FORMS, zoo_forms
    forms, errors = zoo_forms(model_path, work)    # {"qdq": path, "fp16": path}, {form: one-line reason}

Shared by bench_quantized.py (which order loses less) and zoo_coverage.py (the zoo in both forms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def quantize(src: Path, dst: Path, inputs: list[dict[str, np.ndarray]]) -> None:
    """onnxruntime's QDQ static quantization: per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def to_fp16_storage(model: onnx.ModelProto, min_elements: int = 16) -> onnx.ModelProto:
    """Every float32 initializer of `min_elements`+ elements stored as float16 and cast back to float32 on load."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    casts = []
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            value = numpy_helper.to_array(init)
            stored = f"{init.name}_fp16"
            casts.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT, name=f"{init.name}_cast"))
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float16), stored))
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(casts + nodes)
    return out


def seeded_feeds(model: onnx.ModelProto, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` seeded inputs of every graph input: standard normal floats, token ids in [0, 100), masks of ones."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        specs.append((vi.name, dtype, [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]))
    feeds = []
    for _ in range(count):
        feed: dict[str, np.ndarray] = {}
        for name, dtype, dims in specs:
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(dims).astype(dtype)
            elif "mask" in name:
                feed[name] = np.ones(dims, dtype=dtype)
            else:
                feed[name] = rng.integers(0, 100, dims).astype(dtype)
        feeds.append(feed)
    return feeds


FORMS = ("qdq", "fp16")


def zoo_forms(path: Path, work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The QDQ (``quantize_static`` on 8 seeded inputs) and fp16-storage forms of `path`, cached in `work`.

    A form is made once (kept while newer than its source); a model onnxruntime cannot quantize is
    remembered as ``<stem>_qdq.error`` with its one-line reason. Returns the forms made and the errors.
    """
    work.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    errors: dict[str, str] = {}
    model: onnx.ModelProto | None = None
    for form in FORMS:
        dst, err = work / f"{path.stem}_{form}.onnx", work / f"{path.stem}_{form}.error"
        fresh = path.stat().st_mtime
        if dst.exists() and dst.stat().st_mtime >= fresh:
            made[form] = dst
            continue
        if err.exists() and err.stat().st_mtime >= fresh:
            errors[form] = err.read_text().strip()
            continue
        model = model or onnx.load(path)
        try:
            if form == "qdq":
                quantize(path, dst, seeded_feeds(model, 8))
            else:
                onnx.save(to_fp16_storage(model), dst)
            made[form] = dst
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot quantize is a row, not a stop
            errors[form] = f"{'quantize_static' if form == 'qdq' else 'fp16'}: {str(exc).splitlines()[0][:120]}"
            err.write_text(errors[form] + "\n")
            dst.unlink(missing_ok=True)
    return made, errors

