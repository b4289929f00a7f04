"""Analysis: a loaded model normalised, its shapes read and its channels traced; knows no method.

`analyze_loaded` is what `api.analyze`, `api.prepare` and the pipeline's trace pass run; the rest says what a
trace could not prune and why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import onnx

from .. import ir
from ..calib import memory
from ..channels import Trace
from .trace import trace

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Analysis:
    model: onnx.ModelProto
    graph: Any  # gs.Graph, normalised; tracing never modifies it
    trace: Trace
    input_shapes: Mapping[str, tuple[int, ...]]
    opset: int
    #: what normalising did that a user should know (run-time shape reads folded)
    notes: tuple[str, ...] = ()


def analyze_loaded(
    proto: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None, exclude: Sequence[str], *,
    check: bool = True, path: str | None = None,
) -> Analysis:
    """`analyze` of a loaded model; `check=False` when the caller has run the checker on it already."""
    if check:
        ir.check_model(proto, full=False, what="input model", path=path)
    shapes_in = ir.fixed_input_shapes(proto, input_shapes)
    opset = ir.opset_version(proto)
    notes: list[str] = []
    graph = ir.to_graph(proto, source=path, input_shapes=shapes_in, notes=notes)
    # shape inference needs no weights: the folded graph's skeleton (the full export only if onnxruntime must run)
    skeleton = ir.export_skeleton(graph, proto)
    shapes = ir.static_shapes(skeleton, shapes_in, runnable=lambda: _export_plain(graph, proto))
    # graph-surgeon's graph copies (constant folding, the skeleton) are reference cycles that share the weight
    # arrays; collected now, not whenever the collector next runs, pruning cannot hold the unpruned weights twice
    memory.give_back()
    return Analysis(proto, graph, trace(graph, shapes, exclude, opset), shapes_in, opset, tuple(notes))


def _export_plain(graph: Any, like: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    out = gs.export_onnx(graph.copy(), do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    return out


def warned(messages: list[str]) -> list[str]:
    """Log each warning; the same lines go into the report's notes."""
    for message in messages:
        log.warning("%s", message)
    return messages


def unmatched_excludes(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """A warning for each --exclude pattern that names no node (a typo protects nothing)."""
    return warned([f"--exclude {p!r} matches no node name" for p in patterns if not any(fnmatchcase(n, p) for n in names)])


#: QOperator ops of quantized models: not pruned (`ops.quant`; QDQ weights are, see `graph.qdq`)
QUANTIZED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
                           "QGemm", "QLinearAdd", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The QOperator op types of `model`'s graph, if any."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})


def nothing_prunable_reason(tr: Trace, model: onnx.ModelProto | None = None) -> str:
    quantized = quantized_ops(model) if model is not None else []
    if quantized and not any(not g.is_frozen for g in tr.groups):
        return (f"the model is quantized in QOperator form ({', '.join(quantized)}), which is not pruned: quantize "
                "with QuantFormat.QDQ (its weights are pruned), or prune the float model and quantize it afterwards")
    if not tr.groups:
        return "no Conv, Gemm or MatMul with constant weights was found"
    reasons = sorted({r for g in tr.groups for r in g.reasons})
    if all(g.is_frozen for g in tr.groups):
        return "every channel group is frozen (" + "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "") + ")"
    return "the ratio removes no channel from any group"
