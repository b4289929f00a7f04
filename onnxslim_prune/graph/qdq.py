"""QDQ weights: a constant reached through DequantizeLinear is a float weight while pruning.

On load (`fold_weights`) every ``DequantizeLinear(q, scale, zero_point)`` whose inputs are all
constants becomes one float constant of the dequantized values

    w = (q - zero_point) * scale        (per tensor, or per channel along `axis`, in float32)

carrying its `Scheme` (the quantized tensor, its scale and zero point, the axis, the range the
model uses). Every pass then reads and slices plain float weights. Each write of such a constant
(`graph.edit.set_input_const`) re-quantizes the new values (`requantize`), so the float view
always equals what the quantized model computes:

* channels whose new values are exactly some original channel's dequantized values (slicing,
  or a channel left unchanged) keep that channel's quantized values, scale and zero point
  (matched in order along the per-channel axis);
* a changed channel (Neuron Merging, least-squares refit) gets its scale recomputed from its
  new values with the model's own scheme: symmetric (zero point at the type's middle) when every
  original zero point was, else asymmetric over ``[min(0, w), max(0, w)]``, in the range the
  original used (``max |q - zero_point|``); a per-tensor scale is kept unless the new values
  would clip;
* an int32 bias (onnxruntime's ``scale = input_scale * weight_scale``) is re-quantized on export
  with that product of the current scales (`export`), so a recomputed weight scale stays
  consistent with the bias.

A float weight stored in another float type and cast on load (``Cast(w_bf16, to=FLOAT)``, fp16
storage with fp32 compute) folds the same way to a constant of the cast's type with a `Stored`
scheme: each write rounds the new values through the storage type (so the float view is what
the model computes), and export stores them in that type again with the Cast (`keeps_storage`
keeps graph-surgeon's folding from turning them into float32 weights).

A ``QuantizeLinear`` of a float constant (onnxruntime's ``quantize_static`` quantizes the bias of an
``Add`` like an activation) is folded first to the integer constant it computes, so the pair is a
weight like any other; export writes that integer tensor and its DequantizeLinear (the Q node is gone,
the values are the same). One scale stored as ``[1]`` with a scalar zero point is per tensor.

On export (`export`) each such initializer is replaced by its quantized tensor, scale and zero
point and a DequantizeLinear producing the same name. Not folded (the weight stays a variable
and the op that reads it freezes, with the reason from `unfolded_reason`): block quantization
(``block_size``), element types other than (u)int8, (u)int16 and int32, non-float scales.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from . import edit
from .read import to_array

#: attribute names: a folded constant's scheme; why a DequantizeLinear output was not folded
SCHEME_ATTR, UNFOLDED_ATTR = "_onnxslim_qdq", "_onnxslim_unfolded"
QUANT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)
FLOAT_SCALES = (np.float32, np.float16)


@dataclass(frozen=True, eq=False)
class Scheme:
    """How a folded constant is stored: ``values = (q - zero_point) * scale`` (along `axis` when per channel)."""

    q: np.ndarray
    scale: np.ndarray  # scalar, or 1-D along `axis`
    zero_point: np.ndarray | None  # same shape as scale; None: the input was omitted (zero, uint8)
    axis: int | None  # None: per tensor
    symmetric: bool  # every zero point sits at the type's middle
    limit: int  # max |q - zero_point| the model uses (the range a recomputed scale maps to)
    names: tuple[str, str, str]  # the original quantized tensor, scale and zero point ("" when omitted)

    def same(self, other: Scheme | Stored) -> bool:
        return (isinstance(other, Scheme) and self.axis == other.axis and np.array_equal(self.q, other.q) and np.array_equal(self.scale, other.scale)
                and _equal_or_none(self.zero_point, other.zero_point))


@dataclass(frozen=True, eq=False)
class Stored:
    """A float weight stored as `storage` (an ONNX element type) and cast to the constant's dtype on load."""

    storage: int
    name: str  # the original stored initializer

    def same(self, other: Scheme | Stored) -> bool:
        return isinstance(other, Stored) and self.storage == other.storage


def _equal_or_none(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def scheme_of(tensor: gs.Tensor) -> Scheme | Stored | None:
    value = getattr(tensor, SCHEME_ATTR, None)
    return value if isinstance(value, (Scheme, Stored)) else None


#: float element types a weight may be stored in and computed in
_FLOAT_ONNX = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
_COMPUTE_ONNX = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _stored_type(tensor: gs.Tensor) -> int | None:
    """The ONNX float type a constant is stored in, else None."""
    if not isinstance(tensor, gs.Constant):
        return None
    try:
        dtype = int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.export_dtype)))
    except (TypeError, KeyError, ValueError):
        dtype = int(tensor.export_dtype) if isinstance(tensor.export_dtype, int) else -1
    return dtype if dtype in _FLOAT_ONNX else None


def keeps_storage(node: gs.Node) -> bool:
    """A Cast of a float constant to another float type: a stored weight, folded by `fold_weights`, not by graph-surgeon."""
    if node.op != "Cast" or not node.inputs:
        return False
    storage = _stored_type(node.inputs[0])
    return storage is not None and int(node.attrs.get("to", 0)) in _COMPUTE_ONNX and int(node.attrs["to"]) != storage


def unfolded_reason(tensor: gs.Tensor) -> str | None:
    """Why the DequantizeLinear producing `tensor` was not folded into a weight (None: not such a tensor)."""
    reason = getattr(tensor, UNFOLDED_ATTR, None)
    return reason if isinstance(reason, str) else None


def _zero_middle(dtype: np.dtype) -> int:
    info = np.iinfo(dtype)
    return 0 if info.min < 0 else (int(info.max) + 1) // 2


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32 (as onnxruntime computes it), in the scale's dtype."""
    shift = q.astype(np.int64)
    if zero_point is not None:
        shift = shift - _broadcast(zero_point.astype(np.int64), axis, q.ndim)
    out = shift.astype(np.float32) * _broadcast(scale.astype(np.float32), axis, q.ndim)
    return np.asarray(out).astype(scale.dtype)  # an array also for a 0-d q (a scalar bias)


def _quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, dtype: np.dtype,
              axis: int | None) -> np.ndarray:
    info = np.iinfo(dtype)
    s = _broadcast(scale.astype(np.float64), axis, values.ndim)
    q = np.rint(values.astype(np.float64) / s)
    if zero_point is not None:
        q = q + _broadcast(zero_point.astype(np.float64), axis, values.ndim)
    return np.clip(q, info.min, info.max).astype(dtype)


def _unsupported(node: gs.Node, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> str | None:
    if int(node.attrs.get("block_size", 0) or 0):
        return f"blocked quantization (block_size={node.attrs['block_size']}) is not supported"
    if q.dtype.type not in QUANT_TYPES:
        return f"{q.dtype} quantized weights are not supported"
    if scale.dtype.type not in FLOAT_SCALES:
        return f"a {scale.dtype} scale is not supported"
    if scale.ndim > 1 or (zero_point is not None and zero_point.shape != scale.shape):
        return "the scale and zero point do not describe per-tensor or per-axis quantization"
    if scale.ndim == 1 and scale.size > 1:
        axis = int(node.attrs.get("axis", 1))
        if not -q.ndim <= axis < q.ndim or q.shape[axis] != scale.size:
            return "the per-channel scale does not match the weight's axis"
    if not np.all(scale > 0):
        return "a scale is not positive"
    return None


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def fold_weights(graph: gs.Graph) -> int:
    """Replace every all-constant DequantizeLinear by a float constant with its `Scheme`; returns how many.

    Passes repeat, with Identity aliases of folded constants resolved between them, until nothing more
    folds: an exporter's Identity alias of a shared weight may sit between a folded DequantizeLinear and a
    QuantizeLinear (DenseNet's shared BatchNormalization parameters in onnxruntime's QDQ form).
    """
    total = 0
    outputs = set(id(t) for t in graph.outputs)
    while folded := _fold_pass(graph, outputs):
        total += folded
        _alias_identities(graph, outputs)
    if total:
        graph.cleanup()
    return total


def _fold_pass(graph: gs.Graph, outputs: set[int]) -> int:
    """One pass of `fold_weights` over the nodes still read by something; returns how many folded."""
    folded = 0
    for node in list(graph.nodes):
        if not node.outputs or id(node.outputs[0]) in outputs or not node.outputs[0].outputs:
            continue
        if keeps_storage(node):
            stored = node.inputs[0]
            target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
            _replace(node.outputs[0], np.asarray(stored.values).astype(target), Stored(_stored_type(stored) or 0, stored.name))
            folded += 1
            continue
        if node.op == "QuantizeLinear":
            folded += _fold_constant_quantize(node)
            continue
        if node.op != "DequantizeLinear":
            continue
        present = [t for t in node.inputs if t.name]
        values = [_const(t) for t in present]
        if len(present) < 2 or any(v is None for v in values):
            continue  # an activation's DequantizeLinear
        q, scale = values[0], values[1]
        zero_point = values[2] if len(values) > 2 else None
        assert q is not None and scale is not None
        if scale.size == 1 and (zero_point is None or zero_point.size == 1):
            # one scale stored as [1] with a scalar zero point (onnxruntime's int32 bias of BatchNormalization): per tensor
            scale, zero_point = scale.reshape(()), None if zero_point is None else zero_point.reshape(())
        out = node.outputs[0]
        reason = _unsupported(node, q, scale, zero_point)
        if reason is not None:
            setattr(out, UNFOLDED_ATTR, f"weight {node.inputs[0].name} is quantized and cannot be folded: {reason}")
            continue
        axis = int(node.attrs.get("axis", 1)) % max(q.ndim, 1) if scale.size > 1 or scale.ndim == 1 else None
        if axis is not None and scale.size == 1 and q.ndim and q.shape[axis] != 1:
            scale, zero_point, axis = scale.reshape(()), None if zero_point is None else zero_point.reshape(()), None
        middle = _zero_middle(q.dtype)
        shift = q.astype(np.int64) - (0 if zero_point is None else _broadcast(zero_point.astype(np.int64), axis, q.ndim))
        names = [t.name for t in node.inputs[:3]] + [""] * (3 - len(node.inputs[:3]))
        # an omitted zero point is 0: symmetric for a signed type, not for uint8
        symmetric = middle == 0 if zero_point is None else bool(np.all(zero_point == middle))
        scheme = Scheme(q=q, scale=scale, zero_point=zero_point, axis=axis, symmetric=symmetric,
                        limit=max(int(np.abs(shift).max()) if shift.size else 1, 1),
                        names=(names[0], names[1], names[2]))
        _replace(out, dequantize(q, scale, zero_point, axis), scheme)
        folded += 1
    return folded


def _fold_constant_quantize(node: gs.Node) -> int:
    """``QuantizeLinear`` of a float constant (``quantize_static`` quantizes a bias added by an ``Add`` like an
    activation): replaced by the integer constant it computes, so the DequantizeLinear after it folds to a weight.

    ``q = saturate(round_half_even(x / scale) + zero_point)``, in float32 as onnxruntime computes it, per tensor
    or per channel along `axis`. Not folded (left as an activation pair): block quantization, an `output_dtype`
    without a zero point, a non-float constant, or a scale that is not per tensor / per axis. Returns 1 if folded.
    """
    present = [t for t in node.inputs if t.name]
    values = [_const(t) for t in present]
    if len(present) < 2 or any(v is None for v in values) or not node.outputs:
        return 0
    x, scale = values[0], values[1]
    zero_point = values[2] if len(values) > 2 else None
    assert x is not None and scale is not None
    if (x.dtype.kind != "f" or scale.dtype.type not in FLOAT_SCALES or int(node.attrs.get("block_size", 0) or 0)
            or (zero_point is None and int(node.attrs.get("output_dtype", 0) or 0))):
        return 0
    dtype = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
    if dtype.type not in QUANT_TYPES or (zero_point is not None and zero_point.size != scale.size):
        return 0
    axis: int | None = None
    if scale.size > 1:
        axis = int(node.attrs.get("axis", 1))
        if scale.ndim != 1 or not -x.ndim <= axis < x.ndim or x.shape[axis] != scale.size:
            return 0
        axis %= x.ndim
    s = _broadcast(scale.astype(np.float32), axis, x.ndim)
    q = np.rint(x.astype(np.float32) / s).astype(np.float64)
    if zero_point is not None:
        q = q + _broadcast(zero_point.astype(np.float64), axis, x.ndim)
    info = np.iinfo(dtype)
    out = node.outputs[0]
    const = gs.Constant(out.name, np.asarray(np.clip(q, info.min, info.max)).astype(dtype))
    for consumer in list(out.outputs):
        for i, t in enumerate(list(consumer.inputs)):
            if t is out:
                edit.replace_input(consumer, i, const)
    return 1


def _alias_identities(graph: gs.Graph, outputs: set[int]) -> None:
    """Identity of a folded constant (an exporter's alias of a shared weight) reads the constant itself.

    Graph-surgeon folds such aliases of plain constants; these it saw as an Identity of a
    DequantizeLinear or Cast, which it does not fold. Consumers then share one constant object,
    so the tracer prunes them alike.
    """
    for node in list(graph.nodes):
        if node.op != "Identity" or not node.inputs or not node.outputs or id(node.outputs[0]) in outputs:
            continue
        source = node.inputs[0]
        if isinstance(source, gs.Constant) and scheme_of(source) is not None:
            out = node.outputs[0]
            for consumer in list(out.outputs):
                for i, t in enumerate(list(consumer.inputs)):
                    if t is out:
                        edit.replace_input(consumer, i, source)


def _replace(out: gs.Tensor, values: np.ndarray, scheme: Scheme | Stored) -> None:
    """Every consumer of `out` reads a constant of `values` (same name) carrying `scheme` instead."""
    const = gs.Constant(out.name, values)
    setattr(const, SCHEME_ATTR, scheme)
    for consumer in list(out.outputs):
        for i, t in enumerate(list(consumer.inputs)):
            if t is out:
                edit.replace_input(consumer, i, const)


def _storage_np(storage: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(storage))


def rewrite(scheme: Scheme | Stored, old: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, Scheme | Stored]:
    """The exact values and scheme of `values` written over a folded constant (see `requantize`)."""
    if isinstance(scheme, Stored):
        return np.asarray(values).astype(_storage_np(scheme.storage)).astype(old.dtype), scheme
    return requantize(scheme, old, values)


def requantize(scheme: Scheme, old: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, Scheme]:
    """The scheme of `values` written over a folded constant of `old` values; returns (exact float values, scheme).

    `values` is a slicing of `old` (along any axes, channels in order) or `old` with some
    channels changed; see the module docstring for what each channel keeps.
    """
    dtype = scheme.q.dtype
    values = np.asarray(values)
    if scheme.axis is None:
        q = _quantize(values, scheme.scale, scheme.zero_point, dtype, None)
        new = replace(scheme, q=q)
        if not np.array_equal(dequantize(q, scheme.scale, scheme.zero_point, None), values.astype(scheme.scale.dtype)):
            bound = float(np.abs(values).max()) if values.size else 0.0
            if bound > float(scheme.scale) * scheme.limit * (1 + 1e-6):  # would clip: recompute the one scale
                new = _refit(scheme, values.reshape(1, -1), None)
                new = replace(new, q=new.q.reshape(values.shape))
        return dequantize(new.q, new.scale, new.zero_point, new.axis), new
    axis = scheme.axis
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    n_old, n_new = scheme.scale.size, rows.shape[0]
    scales, zeros, qrows = [], [], []
    start = 0
    for j in range(n_new):
        candidates = [j] if n_new == n_old else range(start, n_old - (n_new - j) + 1)
        found = None
        for i in candidates:
            z = None if scheme.zero_point is None else scheme.zero_point[i : i + 1]
            q = _quantize(rows[j], scheme.scale[i : i + 1].reshape(()), None if z is None else z.reshape(()), dtype, None)
            if np.array_equal(dequantize(q, scheme.scale[i : i + 1].reshape(()), None if z is None else z.reshape(()), None),
                              rows[j].astype(scheme.scale.dtype)):
                found = (i, q)
                break
        if found is not None:
            i, q = found
            start = i + 1
            scales.append(scheme.scale[i])
            zeros.append(None if scheme.zero_point is None else scheme.zero_point[i])
            qrows.append(q)
        else:
            fit = _refit(scheme, rows[j : j + 1], 0)
            scales.append(fit.scale[0])
            zeros.append(None if fit.zero_point is None else fit.zero_point[0])
            qrows.append(fit.q[0])
    moved = list(np.moveaxis(values, axis, 0).shape)
    q_all = np.moveaxis(np.stack(qrows).reshape(moved), 0, axis).astype(dtype)
    scale = np.asarray(scales, dtype=scheme.scale.dtype)
    zero = None if scheme.zero_point is None else np.asarray(zeros, dtype=scheme.zero_point.dtype)
    new = replace(scheme, q=q_all, scale=scale, zero_point=zero)
    return dequantize(q_all, scale, zero, axis), new


def _refit(scheme: Scheme, rows: np.ndarray, axis: int | None) -> Scheme:
    """A scale (and zero point) per row of `rows` from its values, in the scheme's range and symmetry."""
    dtype = scheme.q.dtype
    info = np.iinfo(dtype)
    r = rows.astype(np.float64)
    fallback = float(np.max(scheme.scale))
    if scheme.symmetric:
        middle = _zero_middle(dtype)
        bound = np.abs(r).max(axis=1)
        scale = np.where(bound > 0, bound / scheme.limit, fallback)
        zero = np.full(len(r), middle)
    else:
        low, high = np.minimum(r.min(axis=1), 0.0), np.maximum(r.max(axis=1), 0.0)
        span = min(2 * scheme.limit, int(info.max) - int(info.min))
        scale = np.where(high > low, (high - low) / span, fallback)
        zero = np.clip(np.rint(info.min - low / scale), info.min, info.max)
    scale = scale.astype(scheme.scale.dtype)
    zero_point = None if scheme.zero_point is None else zero.astype(scheme.zero_point.dtype)
    q = _quantize(r, scale, zero_point, dtype, 0)
    if axis is None:
        return replace(scheme, q=q, scale=scale.reshape(()), zero_point=None if zero_point is None else zero_point.reshape(()))
    return replace(scheme, q=q, scale=scale, zero_point=zero_point)


# ----------------------------------------------------------------------------- export


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def _bias_schemes(model: onnx.ModelProto, schemes: dict[str, Scheme]) -> None:
    """int32 biases of Conv / Gemm get ``scale = input_scale * weight_scale`` of the current weight scale."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(node.input) < 3:
            continue
        w, b = schemes.get(node.input[1]), schemes.get(node.input[2])
        dq = producers.get(node.input[0])
        if w is None or b is None or b.q.dtype != np.int32 or dq is None or dq.op_type != "DequantizeLinear":
            continue
        x_scale = inits.get(dq.input[1]) if len(dq.input) > 1 else None
        if x_scale is None or int(np.prod(x_scale.dims)) != 1:
            continue
        xs = numpy_helper.to_array(x_scale).astype(np.float32).reshape(())
        scale = (xs * w.scale.astype(np.float32)).astype(b.scale.dtype)
        if scale.size != b.scale.size and scale.size != 1:
            continue
        values = dequantize(b.q, b.scale, b.zero_point, b.axis)
        axis = None if b.axis is None and scale.size == 1 else 0
        zero = None if b.zero_point is None else np.zeros(scale.shape, dtype=b.zero_point.dtype)
        if axis == 0 and scale.size != values.shape[0]:
            continue
        q = _quantize(values, scale, zero, np.dtype(np.int32), axis)
        schemes[node.input[2]] = replace(b, q=q, scale=scale, zero_point=zero, axis=axis)


def export(model: onnx.ModelProto, constants: Iterable[gs.Constant]) -> None:
    """Store every folded constant of `constants` quantized again, with its DequantizeLinear (in place)."""
    found = {c.name: s for c in constants if (s := scheme_of(c)) is not None}
    if not found:
        return
    graph = model.graph
    present = {t.name: t for t in graph.initializer}
    schemes = {n: s for n, s in found.items() if n in present and isinstance(s, Scheme)}
    stored = {n: s for n, s in found.items() if n in present and isinstance(s, Stored)}
    _bias_schemes(model, schemes)
    taken = set(present) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name not in schemes and t.name not in stored]
    added: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for name in sorted(stored):
        cast, value = stored[name], numpy_helper.to_array(present[name])
        stored_name = _unique(cast.name or f"{name}_stored", taken)
        added.append(numpy_helper.from_array(value.astype(_storage_np(cast.storage)), stored_name))
        nodes.append(onnx.helper.make_node("Cast", [stored_name], [name], name=_unique(f"{name}_Cast", taken),
                                           to=int(present[name].data_type)))
    for name in sorted(schemes):
        s = schemes[name]
        base = [n or f"{name}_{part}" for n, part in zip(s.names, ("quantized", "scale", "zero_point"))]
        q_name, s_name = _unique(base[0], taken), _unique(base[1], taken)
        added += [numpy_helper.from_array(np.array(s.q, order="C"), q_name),
                  numpy_helper.from_array(np.array(s.scale, order="C"), s_name)]
        inputs = [q_name, s_name]
        if s.zero_point is not None:
            z_name = _unique(base[2], taken)
            added.append(numpy_helper.from_array(np.array(s.zero_point, order="C"), z_name))
            inputs.append(z_name)
        node = onnx.helper.make_node("DequantizeLinear", inputs, [name], name=_unique(f"{name}_DequantizeLinear", taken))
        if s.axis is not None:
            node.attribute.append(onnx.helper.make_attribute("axis", s.axis))
        nodes.append(node)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)


def report_notes(original: onnx.ModelProto, pruned: onnx.ModelProto) -> list[str]:
    """What the report says of a quantized model's weights: how many channels got a recomputed scale."""
    def weight_dqs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
        inits = {t.name for t in model.graph.initializer}
        return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits
                and len(n.input) > 1 and n.input[1] in inits]

    before = weight_dqs(original)
    if not before:
        return []
    old = {t.name: to_array(t) for t in original.graph.initializer}
    new = {t.name: t for t in pruned.graph.initializer}
    known = {v.item() for n in before for v in np.asarray(old[n.input[1]]).reshape(-1)}
    changed = total = 0
    for node in weight_dqs(pruned):
        scales = numpy_helper.to_array(new[node.input[1]]).reshape(-1)
        total += scales.size
        changed += sum(1 for v in scales.tolist() if v not in known)
    note = (f"quantized weights (QDQ, {len(before)} DequantizeLinear of constants): pruned on their dequantized "
            "values and stored quantized again with the model's scheme")
    if changed:
        note += (f"; {changed} of {total} channel scales were recomputed (channels changed by compensation, "
                 "re-quantized from their new values)")
    return [note]
