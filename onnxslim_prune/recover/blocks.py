"""The blocks `--recover` refits: runs of nodes between two cut points of the pruned network.

Pure graph analysis (no torch). A node's output is *affected* when it depends on an initializer
that pruning or the closed-form refit changed (missing from the original, another shape or other
bytes) or on an affected tensor; tensors no changed weight reaches (attention masks, rotary
tables, the graph inputs) are identical in both networks. Walking the nodes in their topological
order, position ``p`` is a *cut* when exactly one affected tensor crosses it (produced before ``p``,
read at or after it, or a graph output): the residual stream between two residual blocks, the
output of an MBConv block, a transformer sub-layer's sum. A block ends at a cut that closes a
residual join (an ``Add`` of two tensors a graph input reaches) or once it holds `MIN_LAYERS` weighted layers,
so plain chains (a non-residual MBConv) form one block of their three convolutions, not three
blocks of one. The last block ends at the graph outputs.

A block's *trainable* weights are its float32 initializers of more than one element read as a
weight or bias operand (see `TRAINABLE_OPERANDS`) and read by no node outside the block: tied
weights (an embedding shared with the language-model head) stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .. import ir

#: a block closes after this many weighted layers (Conv / Gemm / MatMul with a constant weight) when no residual
#: join closes it first
MIN_LAYERS = 3

#: op type -> input positions that may hold a trained weight or bias (other operands are data or shapes)
TRAINABLE_OPERANDS: Mapping[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "LayerNormalization": (1, 2),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
}
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Block:
    """Nodes ``[start, stop)`` of the pruned graph, their inputs from outside, their compared outputs."""

    index: int
    start: int
    stop: int
    nodes: tuple[str, ...]
    #: tensors read from outside the block (initializers excluded), in first-read order
    inputs: tuple[str, ...]
    #: affected tensors the block produces that later nodes or the graph outputs read: compared with the original's
    outputs: tuple[str, ...]
    #: initializers the recovery may change
    trainable: tuple[str, ...]
    #: why the block is not recovered (None: it is)
    skip: str | None = None

    @property
    def label(self) -> str:
        first, last = self.nodes[0], self.nodes[-1]
        return f"block {self.index} ({first} .. {last}, {len(self.nodes)} nodes)"


#: element types of weights (a changed int64 initializer is a shape or an index, not a weight)
WEIGHT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8})


def changed_initializers(original: onnx.ModelProto, pruned: onnx.ModelProto) -> set[str]:
    """Weight initializers of `pruned` that differ from `original`'s constant of that name (an initializer or a
    Constant node's value, which normalising turns into initializers) in shape, type or bytes, or that it lacks."""
    before = {t.name: t for t in original.graph.initializer}
    for node in original.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] not in before:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
            if value is not None:
                before[node.output[0]] = value
    changed = set()
    for tensor in pruned.graph.initializer:
        if tensor.data_type not in WEIGHT_TYPES:
            continue
        old = before.get(tensor.name)
        if old is None or list(old.dims) != list(tensor.dims) or old.data_type != tensor.data_type:
            changed.add(tensor.name)
        elif not np.array_equal(ir.to_array(old), numpy_helper.to_array(tensor)):
            changed.add(tensor.name)
    return changed


def find_blocks(original: onnx.ModelProto, pruned: onnx.ModelProto, *, min_layers: int = MIN_LAYERS) -> list[Block]:
    """The blocks of `pruned` (module docstring); blocks before the first change are left out (nothing differs)."""
    graph = pruned.graph
    nodes = list(graph.node)
    inits = {t.name: t for t in graph.initializer}
    changed = changed_initializers(original, pruned)
    # the first block starts at the first changed node: what runs before it is identical in both networks
    original_tensors = {o for n in original.graph.node for o in n.output} | {i.name for i in original.graph.input}
    outputs = {o.name for o in graph.output}
    # tensors that carry data (a graph input reaches them): a residual join adds two of them
    dynamic = {i.name for i in graph.input if i.name not in inits}
    affected: set[str] = set()
    producer: dict[str, int] = {}
    last_read: dict[str, int] = {}
    for i, node in enumerate(nodes):
        reads = [t for t in node.input if t]
        if any(t in dynamic for t in reads):
            dynamic.update(t for t in node.output if t)
        if any(t in changed or t in affected for t in reads):
            affected.update(t for t in node.output if t)
        for t in node.output:
            if t:
                producer[t] = i
        for t in reads:
            last_read[t] = i
    end = len(nodes)
    for t in outputs:
        last_read[t] = end  # a graph output is read after the last node

    # live affected tensors at each position p (between node p-1 and node p), by a sweep
    crossing = [0] * (end + 1)
    for t in affected:
        born, dies = producer[t] + 1, last_read.get(t, producer[t])
        if dies >= born:
            crossing[born] += 1
            if dies + 1 <= end:
                crossing[dies + 1] -= 1
    live = np.cumsum(crossing)

    first = next((i for i, n in enumerate(nodes) if any(t in changed for t in n.input)), None)
    if first is None:
        return []
    bounds = [first]
    layers = 0
    for p in range(first + 1, end):
        node = nodes[p - 1]
        layers += node.op_type in WEIGHTED_OPS and any(t in inits for t in node.input[:2])
        if live[p] != 1:
            continue
        (tensor,) = [t for t in node.output if t in affected] or [None]
        if tensor is None or tensor not in original_tensors:  # the cut must be a tensor the original also computes
            continue
        join = node.op_type in ("Add", "Sum") and sum(t in dynamic for t in node.input) >= 2
        if join or layers >= min_layers:
            bounds.append(p)
            layers = 0
    bounds.append(end)

    blocks: list[Block] = []
    for start, stop in zip(bounds, bounds[1:]):
        if stop <= start:
            continue
        blocks.append(_block(len(blocks), nodes, start, stop, inits, affected, outputs, last_read, changed))
    return blocks


def _block(index: int, nodes: Sequence[onnx.NodeProto], start: int, stop: int, inits: Mapping[str, onnx.TensorProto],
           affected: set[str], outputs: set[str], last_read: Mapping[str, int], changed: set[str]) -> Block:
    inside = nodes[start:stop]
    produced = {t for n in inside for t in n.output if t}
    inputs: list[str] = []
    for node in inside:
        for t in node.input:
            if t and t not in produced and t not in inits and t not in inputs:
                inputs.append(t)
    compared = [t for n in inside for t in n.output
                if t in affected and (last_read.get(t, -1) >= stop or t in outputs)]
    readers_outside = {t for i, n in enumerate(nodes) if not start <= i < stop for t in n.input}
    trainable: list[str] = []
    for node in inside:
        for pos in TRAINABLE_OPERANDS.get(node.op_type, ()):
            if pos >= len(node.input):
                continue
            name = node.input[pos]
            tensor = inits.get(name)
            if tensor is None or name in trainable or name in readers_outside:
                continue
            if tensor.data_type == onnx.TensorProto.FLOAT and int(np.prod(tensor.dims)) > 1:
                trainable.append(name)
    skip = None
    if not compared:
        skip = "its output does not reach the graph outputs"
    elif not trainable:
        skip = "it holds no float32 weight of its own (fp16 / quantized weights, or tied ones)"
    return Block(index, start, stop, tuple(n.name for n in inside), tuple(inputs), tuple(compared), tuple(trainable),
                 skip)


def block_costs(model: onnx.ModelProto, blocks: Sequence[Block], sample_shapes: Mapping[str, Sequence[int]]) -> list[float]:
    """Relative cost of one gradient step per block: output elements of its nodes plus MACs / 100 per sample.

    Measured on EfficientNet-Lite1 with one torch thread, a step is about 250 ns per element (depthwise, clip and
    pad are memory-bound) plus about 2.5 ns per MAC of the dense layers. Shapes come from shape inference with the
    calibration samples' shapes at batch 1; when inference fails every block costs the same.
    """
    from ..calib.memory import _inferred_shapes  # noqa: PLC2701 - the same static shapes the memory budget uses

    try:
        shapes = _inferred_shapes(model, {k: (1, *v) for k, v in sample_shapes.items()})
    except Exception:  # an estimate only
        return [1.0] * len(blocks)
    inits = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    costs = []
    for block in blocks:
        total = 0.0
        for name in block.nodes:
            node = nodes[name]
            out = shapes.get(node.output[0]) if node.output else None
            elements = float(np.prod(out)) if out else 1.0
            weight = inits.get(node.input[1]) if len(node.input) > 1 else None
            if weight and node.op_type == "Conv":
                elements += elements * float(np.prod(weight[1:])) / 100.0
            elif weight and node.op_type in ("MatMul", "Gemm") and out:
                elements += elements * float(np.prod(weight)) / max(out[-1], 1) / 100.0
            total += elements
        costs.append(max(total, 1.0))
    return costs
