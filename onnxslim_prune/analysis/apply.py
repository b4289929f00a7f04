"""Apply a `Plan`: every node is rewritten by its op rule (`ops`), through `graph.edit`.

For every tensor the tracer mapped, the kept positions along its channel axis are
``flatnonzero(keep[atoms])``; each node's rule rewrites it from the positions of its inputs
and outputs and the kind the tracer gave it (`ops.weighted`: weights and biases, `group`;
`ops.norm`: per-channel parameters; `ops.elementwise`: constant operands; `ops.layout`:
Split sizes, Slice bounds, Reshape targets, Resize sizes).

`overrides` replaces full-size constants *before* slicing (Neuron Merging adds the
pruned neurons' outgoing weights into the kept ones that way). `graph.edit` copies a
constant shared with another node instead of corrupting it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import Trace
from ..graph import edit
from ..ops import lookup
from .. import ir
from .plan import Plan

log = logging.getLogger(__name__)

Overrides = Mapping[tuple[str, int], np.ndarray]


class _Applier:
    """The `ops.registry.ApplyContext` of one plan: kept positions per traced tensor."""

    def __init__(self, graph: gs.Graph, trace: Trace, plan: Plan, opset: int) -> None:
        self.graph = graph
        self.trace = trace
        self.keep_atoms = plan.atom_keep(trace)
        self.opset = opset

    def keep(self, tensor: gs.Tensor) -> np.ndarray | None:
        """Kept positions of `tensor`'s channel axis, or None when it is untraced or intact."""
        cmap = self.trace.maps.get(tensor.name)
        if cmap is None:
            return None
        mask = self.keep_atoms[cmap.atoms]
        return None if mask.all() else np.flatnonzero(mask)

    def axis(self, tensor: gs.Tensor) -> int:
        return self.trace.maps[tensor.name].axis

    def original_size(self, tensor: gs.Tensor) -> int:
        return self.trace.maps[tensor.name].size

    def node(self, node: gs.Node) -> None:
        rule = lookup(node.domain, node.op, self.opset)
        if rule is not None:
            rule.apply(self, node, self.trace.node_kind.get(node.name))


def apply_plan(graph: gs.Graph, trace: Trace, plan: Plan, opset: int, overrides: Overrides | None = None) -> gs.Graph:
    """Rewrite `graph` in place so that the plan's classes are gone; returns it."""
    nodes = ir.node_by_name(graph)
    for (name, index), value in (overrides or {}).items():
        edit.set_input_const(nodes[name], index, value)
    applier = _Applier(graph, trace, plan, opset)
    for node in list(graph.nodes):
        applier.node(node)
    edit.forget_inner_shapes(graph)
    return graph
