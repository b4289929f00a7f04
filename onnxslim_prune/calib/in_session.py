"""Reductions computed inside onnxruntime: only small per-channel vectors leave the session.

``moments_model`` appends, right after each requested tensor's producer, the nodes that reduce
it to per-channel sums (so the activation dies early inside the session instead of being
copied out whole); `calib.statistic.ActivationMoments` reads those sums.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import onnx


def moments_model(model: onnx.ModelProto, tensors: Mapping[str, tuple[int, int]]) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """A copy of `model` whose outputs are per-channel reductions of `tensors` (name -> (axis, rank)).

    Per tensor: ``sum x``, ``sum |x|``, ``sum x^2``, ``#(x <= 0)`` over every axis but the channel
    axis, in float32, and ``Shape(x)`` (for the count); only these small vectors leave the
    session, instead of whole activations.
    """
    from onnx import TensorProto, helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in _typed(model)}
    after: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # tensor -> its reduction nodes
    inits: list[onnx.TensorProto] = []
    outputs: dict[str, list[str]] = {}
    zero = "__moments_zero"
    inits.append(helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0]))

    def reduce(nodes: list[onnx.NodeProto], x: str, out: str, axes: list[int]) -> None:
        if opset >= 13:
            name = f"{out}__axes"
            inits.append(helper.make_tensor(name, TensorProto.INT64, [len(axes)], axes))
            nodes.append(helper.make_node("ReduceSum", [x, name], [out], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [x], [out], axes=axes, keepdims=0))

    for k, (name, (axis, rank)) in enumerate(tensors.items()):
        p = f"__moments{k}"
        axes = [a for a in range(rank) if a != axis % rank]
        nodes = after[name]
        x = name
        if types.get(name) != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [name], [f"{p}_f"], to=TensorProto.FLOAT))
            x = f"{p}_f"
        nodes += [
            helper.make_node("Abs", [x], [f"{p}_abs"]),
            helper.make_node("Mul", [x, x], [f"{p}_sq"]),
            helper.make_node("Greater", [x, zero], [f"{p}_pos"]),
            helper.make_node("Not", [f"{p}_pos"], [f"{p}_le0"]),
            helper.make_node("Cast", [f"{p}_le0"], [f"{p}_le0f"], to=TensorProto.FLOAT),
            helper.make_node("Shape", [name], [f"{p}_shape"]),
        ]
        for src, key in ((x, "sum"), (f"{p}_abs", "sum_abs"), (f"{p}_sq", "sum_sq"), (f"{p}_le0f", "nonpos")):
            reduce(nodes, src, f"{p}_{key}", axes)
        outputs[name] = [f"{p}_{key}" for key in ("sum", "sum_abs", "sum_sq", "nonpos", "shape")]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ordered: list[onnx.NodeProto] = []
    for node in out.graph.node:  # each reduction right after its producer: activations die early
        ordered.append(node)
        for t in node.output:
            ordered.extend(after.pop(t, []))
    del out.graph.node[:]
    out.graph.node.extend([*[n for ns in after.values() for n in ns], *ordered])  # graph inputs first
    out.graph.initializer.extend(inits)
    del out.graph.output[:]
    for name, outs in outputs.items():
        for o in outs[:4]:
            out.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
        out.graph.output.append(helper.make_tensor_value_info(outs[4], TensorProto.INT64, None))
    return out, outputs


def _typed(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    try:
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # inference is best effort: unknown types get a Cast to float
        graph = model.graph
    return [*graph.value_info, *graph.input, *graph.output]
