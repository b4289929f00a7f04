"""Static description of a model's runtime inputs.

``input_specs`` reads the graph inputs that are not initializers and turns each into an
``InputSpec`` with a fully static shape: a user override (``--input-shape NAME:1x3x224x224``)
wins and fixes every dim; otherwise every symbolic or unknown dimension holds the placeholder 1
and its axis is recorded in ``InputSpec.dynamic_axes``. A data source accepts any size on those
axes and reports the real one (``CalibrationSet.sample_shapes``, made into trace shapes by
``sources.resolved_input_shapes``), so the placeholder need never be traced. Overrides are binding: passing already-filled shapes (such as
``ir.fixed_input_shapes``) as overrides erases the dynamic axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import onnx
from onnx import helper

from ..errors import ModelError, UsageError
from ..ir import is_static_dim
from ..ir import parse_input_shape  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, static shape (batch first) and numpy dtype.

    ``dynamic_axes`` are the axes the model leaves free; ``shape`` holds 1 there as a placeholder.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    dynamic_axes: tuple[int, ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (the batch axis removed)."""
        return self.shape[1:]


def _model_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Dims of a graph input (None for symbolic/unknown), or None if the rank is unknown."""
    ttype = vi.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    return [d.dim_value if is_static_dim(d) else None for d in ttype.shape.dim]


def _spec_for(vi: onnx.ValueInfoProto, override: tuple[int, ...] | None) -> InputSpec:
    elem_type = vi.type.tensor_type.elem_type
    if not vi.type.HasField("tensor_type") or elem_type == onnx.TensorProto.UNDEFINED:
        raise ModelError(f"model input '{vi.name}' is not a tensor with a known element type")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    dims = _model_dims(vi)
    if override is not None:
        if dims is not None and len(dims) != len(override):
            raise UsageError(
                f"--input-shape for '{vi.name}' has rank {len(override)}, the model input has rank {len(dims)}"
            )
        return InputSpec(vi.name, tuple(override), dtype)
    if dims is None:
        raise UsageError(f"model input '{vi.name}' has unknown rank; pass --input-shape {vi.name}:1x...")
    dynamic = tuple(i for i, d in enumerate(dims) if d is None)
    # no warning here: the placeholder 1 is replaced by the data's size, and the API names what it resolved
    return InputSpec(vi.name, tuple(1 if d is None else d for d in dims), dtype, dynamic)


def input_specs(
    model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]] | None = None
) -> list[InputSpec]:
    """Specs of the graph inputs that are not initializers, in graph order."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {vi.name for vi in inputs})
    if unknown:
        names = ", ".join(vi.name for vi in inputs)
        raise UsageError(f"--input-shape names unknown input(s) {', '.join(unknown)}; model inputs: {names}")
    return [_spec_for(vi, overrides.get(vi.name)) for vi in inputs]
