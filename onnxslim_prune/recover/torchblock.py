"""A block of ONNX nodes run by PyTorch, so its weights can take gradient steps (needs the ``[recover]`` extra).

`TorchBlock` interprets the block's nodes one by one with the torch function of each op (`OPS`: one entry per op
type, written from the ONNX operator definitions); its trainable initializers are `torch.nn.Parameter`s, the
others constant tensors. Nothing is traced or compiled, so the graph is exactly the ONNX one and the trained
values go back into the same initializers. An op outside the table (or an attribute it does not handle) raises
`Unsupported` with the op's name: the block then keeps its closed-form weights and the report says why.

Integer operands that steer shapes (Reshape's shape, Slice's starts, axes) are read as Python ints, as onnxruntime
reads them; they are constants in a normalised graph or computed from shapes, never from trained values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

Tensor = torch.Tensor
Attrs = Mapping[str, Any]
OpFn = Callable[[list[Tensor | None], Attrs], list[Tensor]]


class Unsupported(Exception):
    """The block holds an op (or an attribute value) the table does not run."""


# ----------------------------------------------------------------------------- dtypes and helpers

_DTYPES: Mapping[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
}


def dtype_of(code: int) -> torch.dtype:
    if code not in _DTYPES:
        raise Unsupported(f"tensor type {onnx.TensorProto.DataType.Name(code)}")
    return _DTYPES[code]


def ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda x, a: [fn(_need(x[0]))]


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda x, a: [fn(_need(x[0]), _need(x[1]))]


def _need(t: Tensor | None) -> Tensor:
    if t is None:
        raise Unsupported("a missing required input")
    return t


# ----------------------------------------------------------------------------- the ops


def _conv(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data, weight, bias = _need(x[0]), _need(x[1]), x[2] if len(x) > 2 else None
    rank = weight.dim() - 2
    if rank not in (1, 2, 3):
        raise Unsupported(f"Conv of rank {rank}")
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    group = int(a.get("group", 1))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    kernel = list(weight.shape[2:])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for size, k, s, d in zip(data.shape[2:], kernel, strides, dilations):
            total = max((-(-int(size) // s) - 1) * s + (k - 1) * d + 1 - int(size), 0)
            small = total // 2
            pads_b.append(small if auto_pad == "SAME_UPPER" else total - small)
            pads_e.append(total - pads_b[-1])
        pads = pads_b + pads_e
    elif auto_pad == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = list(a.get("pads", [0] * (2 * rank)))
    begins, ends = pads[:rank], pads[rank:]
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    if begins == ends:
        return [conv(data, weight, bias, strides, begins, dilations, group)]
    pad: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        pad += [b, e]
    return [conv(F.pad(data, pad), weight, bias, strides, 0, dilations, group)]


def _gemm(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    A, B, C = _need(x[0]), _need(x[1]), x[2] if len(x) > 2 else None
    if int(a.get("transA", 0)):
        A = A.t()
    if int(a.get("transB", 0)):
        B = B.t()
    y = float(a.get("alpha", 1.0)) * (A @ B)
    if C is not None:
        y = y + float(a.get("beta", 1.0)) * C
    return [y]


def _clip(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    low = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return [torch.clamp(data, low, high)]


def _reshape(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data, shape = _need(x[0]), ints(x[1])
    if not int(a.get("allowzero", 0)):
        shape = [int(data.shape[i]) if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


def _flatten(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    axis = _axis(int(a.get("axis", 1)), data.dim())
    outer = int(np.prod(data.shape[:axis])) if axis else 1
    return [data.reshape(outer, -1)]


def _transpose(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    perm = list(a.get("perm", list(range(data.dim() - 1, -1, -1))))
    return [data.permute(perm)]


def _axes(x: list[Tensor | None], a: Attrs, position: int) -> list[int] | None:
    if len(x) > position and x[position] is not None:
        return ints(x[position])
    return list(a["axes"]) if "axes" in a else None


def _unsqueeze(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    axes = _axes(x, a, 1) or []
    rank = data.dim() + len(axes)
    out = data
    for axis in sorted(_axis(v, rank) for v in axes):
        out = out.unsqueeze(axis)
    return [out]


def _squeeze(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    axes = _axes(x, a, 1)
    if axes is None:
        return [data.squeeze()]
    out = data
    for axis in sorted((_axis(v, data.dim()) for v in axes), reverse=True):
        out = out.squeeze(axis)
    return [out]


def _concat(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    parts = [t for t in x if t is not None and t.numel() > 0] or [t for t in x if t is not None]
    return [torch.cat(parts, dim=int(a["axis"]))]


def _split(x: list[Tensor | None], a: Attrs, outputs: int) -> list[Tensor]:
    data = _need(x[0])
    axis = _axis(int(a.get("axis", 0)), data.dim())
    sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("split", []))
    if not sizes:
        total = int(data.shape[axis])
        step = -(-total // outputs)
        sizes = [min(step, total - i * step) for i in range(outputs)]
    return list(torch.split(data, sizes, dim=axis))


def _slice(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    starts, ends = ints(x[1]), ints(x[2])
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, data.dim())
        size = int(data.shape[axis])
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, max(end, start), step)
        else:
            # a negative step: the same elements taken forwards, then flipped
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            picked = list(range(start, end, step))
            if not picked:
                index[axis] = slice(0, 0)
                continue
            index[axis] = slice(picked[-1], picked[0] + 1, -step)
            flips.append(axis)
    out = data[tuple(index)]
    return [out.flip(flips) if flips else out]


def _gather(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data, idx = _need(x[0]), _need(x[1]).long()
    axis = _axis(int(a.get("axis", 0)), data.dim())
    size = int(data.shape[axis])
    idx = torch.where(idx < 0, idx + size, idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    shape = list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:])
    return [out.reshape(shape)]


def _expand(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data, shape = _need(x[0]), ints(x[1])
    rank = max(data.dim(), len(shape))
    dims = [1] * (rank - data.dim()) + list(data.shape)
    shape = [1] * (rank - len(shape)) + shape
    target = [max(d, s) if d == 1 or s == 1 else d for d, s in zip(dims, shape)]
    return [data.reshape(dims).expand(target)]


def _shape(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    dims = list(_need(x[0]).shape)
    start, end = int(a.get("start", 0)), a.get("end")
    return [torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64)]


def _constant_of_shape(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    value = a.get("value")
    fill = torch.zeros(1, dtype=torch.float32) if value is None else value
    return [torch.full(ints(x[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)]


def _range(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    start, limit, delta = (_need(t) for t in x[:3])
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _reduce(fn: Callable[..., Tensor]) -> OpFn:
    def run(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
        data = _need(x[0])
        axes = _axes(x, a, 1)
        keep = bool(int(a.get("keepdims", 1)))
        if not axes:
            if int(a.get("noop_with_empty_axes", 0)):
                return [data]
            axes = list(range(data.dim()))
        return [fn(data, dim=[_axis(v, data.dim()) for v in axes], keepdim=keep)]

    return run


def _reduce_max(data: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.amax(data, dim=dim, keepdim=keepdim)


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    return lambda x, a: [fn(_need(x[0]), dim=int(a.get("axis", -1)))]


def _pool(x: list[Tensor | None], a: Attrs, kind: str) -> list[Tensor]:
    data = _need(x[0])
    kernel = list(a["kernel_shape"])
    rank = len(kernel)
    strides = list(a.get("strides", [1] * rank))
    pads = list(a.get("pads", [0] * (2 * rank)))
    auto_pad = a.get("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)) not in ("NOTSET", "VALID") or rank != 2:
        raise Unsupported(f"{kind} pooling with auto_pad {auto_pad!r} or rank {rank}")
    if int(a.get("ceil_mode", 0)) or pads[:rank] != pads[rank:]:
        raise Unsupported(f"{kind} pooling with ceil_mode or asymmetric pads")
    if kind == "max":
        return [F.max_pool2d(data, kernel, strides, pads[:rank], list(a.get("dilations", [1, 1])))]
    return [F.avg_pool2d(data, kernel, strides, pads[:rank], count_include_pad=bool(int(a.get("count_include_pad", 0))))]


def _layer_norm(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data, scale, bias = _need(x[0]), _need(x[1]), x[2] if len(x) > 2 else None
    axis = _axis(int(a.get("axis", -1)), data.dim())
    shape = list(data.shape[axis:])
    return [F.layer_norm(data, shape, scale.expand(shape) if scale.dim() < len(shape) else scale,
                         None if bias is None else bias.expand(shape), float(a.get("epsilon", 1e-5)))]


def _batch_norm(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data, scale, bias, mean, var = (_need(t) for t in x[:5])
    return [F.batch_norm(data, mean, var, scale, bias, False, 0.0, float(a.get("epsilon", 1e-5)))]


def _pad(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    pads = ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("pads", []))
    value = float(x[2].item()) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
    rank = data.dim()
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        axis = _axis(axis, rank)
        full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
    torch_pad: list[int] = []
    for axis in reversed(range(rank)):
        torch_pad += [full[axis], full[rank + axis]]
    if mode != "constant":
        raise Unsupported(f"Pad mode {mode}")
    return [F.pad(data, torch_pad, value=value)]


def _cast(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    return [_need(x[0]).to(dtype_of(int(a["to"])))]


def _where(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    cond, left, right = (_need(t) for t in x[:3])
    return [torch.where(cond.bool(), left, right)]


def _trilu(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    data = _need(x[0])
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(data, k) if int(a.get("upper", 1)) else torch.tril(data, k)]


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
        items = [_need(t) for t in x]
        out = items[0]
        for item in items[1:]:
            out = fn(out, item)
        return [out]

    return run


def _hard_sigmoid(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    return [torch.clamp(alpha * _need(x[0]) + beta, 0.0, 1.0)]


def _gelu(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    return [F.gelu(_need(x[0]), approximate="tanh" if approx == "tanh" else "none")]


def _div(x: list[Tensor | None], a: Attrs) -> list[Tensor]:
    left, right = _need(x[0]), _need(x[1])
    if left.is_floating_point():
        return [left / right]
    return [torch.div(left, right, rounding_mode="trunc")]


OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Relu": _unary(F.relu),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "Gelu": _gelu,
    "LeakyRelu": lambda x, a: [F.leaky_relu(_need(x[0]), float(a.get("alpha", 0.01)))],
    "Elu": lambda x, a: [F.elu(_need(x[0]), float(a.get("alpha", 1.0)))],
    "Softplus": _unary(F.softplus),
    "Clip": _clip,
    "Identity": lambda x, a: [_need(x[0])],
    "Dropout": lambda x, a: [_need(x[0])],
    "Cast": _cast,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Gather": _gather,
    "Expand": _expand,
    "Shape": _shape,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Where": _where,
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge),
    "LessOrEqual": _binary(torch.le),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not),
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
    "Mean": lambda x, a: [_variadic(torch.add)(x, a)[0] / len(x)],
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(_reduce_max),
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "GlobalAveragePool": lambda x, a: [_need(x[0]).mean(dim=tuple(range(2, _need(x[0]).dim())), keepdim=True)],
    "GlobalMaxPool": lambda x, a: [_need(x[0]).amax(dim=tuple(range(2, _need(x[0]).dim())), keepdim=True)],
    "MaxPool": lambda x, a: _pool(x, a, "max"),
    "AveragePool": lambda x, a: _pool(x, a, "average"),
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "Pad": _pad,
    "Trilu": _trilu,
}

#: ops of several outputs: the function takes the count
MULTI_OUTPUT: dict[str, Callable[[list[Tensor | None], Attrs, int], list[Tensor]]] = {"Split": _split}


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = torch.from_numpy(numpy_helper.to_array(attr.t).copy())
        elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise Unsupported(f"{node.op_type} with a subgraph")
        else:
            out[attr.name] = onnx.helper.get_attribute_value(attr)
    return out


def check_supported(nodes: Sequence[onnx.NodeProto]) -> None:
    """Raise `Unsupported` naming the first op outside the table (custom domains included)."""
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or (node.op_type not in OPS and node.op_type not in MULTI_OUTPUT
                                                  and node.op_type != "Constant"):
            raise Unsupported(f"op {node.domain + '.' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type} "
                              f"({node.name})")
        _attributes(node)


class TorchBlock(torch.nn.Module):
    """The nodes of one block; `trainable` initializers are parameters (named by position), the rest buffers."""

    def __init__(self, nodes: Sequence[onnx.NodeProto], initializers: Mapping[str, np.ndarray],
                 trainable: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> None:
        super().__init__()
        check_supported(nodes)
        self.nodes = list(nodes)
        self.attrs = [_attributes(n) for n in nodes]
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.trainable = list(trainable)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(np.array(initializers[name], dtype=np.float32))) for name in trainable])
        self.constants = {name: torch.from_numpy(np.array(value)) for name, value in initializers.items()
                          if name not in set(trainable)}

    def forward(self, *values: Tensor) -> list[Tensor]:
        env: dict[str, Tensor] = dict(self.constants)
        env.update(zip(self.trainable, self.weights))
        env.update(zip(self.inputs, values))
        for node, attrs in zip(self.nodes, self.attrs):
            args = [env[t] if t else None for t in node.input]
            if node.op_type == "Constant":
                results = [_constant(node, attrs)]
            elif node.op_type in MULTI_OUTPUT:
                results = MULTI_OUTPUT[node.op_type](args, attrs, len(node.output))
            else:
                results = OPS[node.op_type](args, attrs)
            for name, value in zip(node.output, results):
                if name:
                    env[name] = value
        return [env[t] for t in self.outputs]

    def values(self) -> dict[str, np.ndarray]:
        """The trainable initializers' current values (float32)."""
        return {name: w.detach().numpy().copy() for name, w in zip(self.trainable, self.weights)}


def _constant(node: onnx.NodeProto, attrs: Mapping[str, Any]) -> Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(list(attrs[key]), dtype=dtype)
    raise Unsupported(f"Constant {node.name} without a value tensor")


def rms(t: Tensor) -> float:
    return math.sqrt(float(t.double().pow(2).mean()))
