"""One `OpRule` per op: what the op does to channels, in one place.

A rule is registered by ``(domain, op_type, opset range)`` and answers, for its ops:

* ``trace``: how channel maps move through the node (copy, unite, cut, repeat, or
  create a source); raise `Freeze` with a reason when the channels must stay;
* ``apply``: how the node is rewritten once the plan is known (slice weights, recount
  attributes and shape constants), through `graph.edit`;
* ``cost``: which parameters scale with kept channels (the budgets' cost model);
* ``macs``: multiply-accumulates of the node (weighted ops only);
* ``backprop``: NISP's step from output importance to input importance (weighted ops, BN);
* ``read_affine`` / ``write_affine``: the node as ``Y = X W + b`` on rows, and back (the ops the
  least-squares refit and Neuron Merging can adjust: Conv with group 1, Gemm, MatMul);
  ``weight_in_axis``: the weight axis that indexes the input channels.

Rules see the tracer, the applier and the cost model through the small protocols below,
so this package imports none of the passes that drive it. The tracer, `analysis.apply` and
`methods.budget` dispatch by `lookup`; an op without a rule freezes the channels it touches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelMap, Kind, Role, Shape, Trace

#: the highest opset a rule covers by default
MAX_OPSET = 10_000
DEFAULT_DOMAIN = ""


class Freeze(Exception):
    """Raised by a rule's `trace`: freeze the node's traced inputs with this reason."""


class TraceContext(Protocol):
    """What a rule's `trace` may read and record (implemented by `analysis.trace.Tracer`)."""

    opset: int

    def shape(self, tensor: gs.Tensor) -> Shape | None: ...
    def cmap(self, tensor: gs.Tensor) -> ChannelMap | None: ...
    def traced_inputs(self, node: gs.Node) -> list[tuple[int, ChannelMap]]: ...
    def traced_with_shape(self, node: gs.Node) -> tuple[ChannelMap, Shape] | None: ...
    def set_map(self, tensor: gs.Tensor, cmap: ChannelMap) -> None: ...
    def pass_through(self, node: gs.Node, cmap: ChannelMap, role: Role = Role.PASS) -> None: ...
    def touch(self, atoms: np.ndarray, node: gs.Node, role: Role) -> None: ...
    def unite(self, a: np.ndarray, b: np.ndarray) -> None: ...
    def new_space(self, n: int, frozen_reason: str | None = None) -> tuple[int, np.ndarray]: ...
    def new_source(self, node: gs.Node, out: gs.Tensor, axis: int, n: int, weight_axis: int) -> tuple[int, np.ndarray]: ...
    def add_block(self, atoms: np.ndarray, group: int) -> None: ...
    def set_kind(self, node: gs.Node, kind: Kind) -> None: ...
    def is_graph_output(self, tensor: gs.Tensor) -> bool: ...


class ApplyContext(Protocol):
    """What a rule's `apply` may read (implemented by `analysis.apply`); `graph`: where a rule adds a node."""

    graph: gs.Graph
    trace: Trace
    keep_atoms: np.ndarray
    opset: int

    def keep(self, tensor: gs.Tensor) -> np.ndarray | None: ...
    def axis(self, tensor: gs.Tensor) -> int: ...
    def original_size(self, tensor: gs.Tensor) -> int: ...


@dataclass(frozen=True, eq=False)
class NodeCost:
    """Kept cost of one node: ``macs * f_in * f_out`` and ``params_both * f_in * f_out + params_out * f_out``."""

    in_atoms: np.ndarray | None  # channel atoms of the input whose kept fraction scales the cost
    out_atoms: np.ndarray | None
    macs: int  # scaled by f_in * f_out
    params_both: int  # scaled by f_in * f_out (weights)
    params_out: int  # scaled by f_out only (bias, BN, constant operands)


def float_size(value: np.ndarray | None) -> int:
    """Entries of a float constant (parameters); 0 for None and integer tensors (shapes, indices)."""
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return 0
    return int(value.size)


class CostContext(Protocol):
    """What a rule's `cost` may read (implemented by `methods.budget`)."""

    trace: Trace

    def atoms(self, tensor: gs.Tensor) -> np.ndarray | None: ...
    def first_use(self, node: gs.Node, index: int) -> bool: ...


ShapeOf = Callable[[gs.Tensor], Shape | None]


@dataclass(frozen=True, eq=False)
class Affine:
    """A weighted node as ``Y = X W + b``: ``W [dim_x, dim_y]``, bias ``b [dim_y]`` (float64).

    ``b`` is None when the layer has no adjustable bias; ``bias_at`` is the (node, input index)
    holding the bias, when it exists.
    """

    w: np.ndarray
    b: np.ndarray | None
    bias_at: tuple[str, int] | None


class OpRule:
    """The channel semantics of a family of ops; subclasses override what their ops need."""

    #: op types this rule is registered for
    ops: tuple[str, ...] = ()
    domain: str = DEFAULT_DOMAIN
    #: inclusive opset range of the domain this rule covers
    opsets: tuple[int, int] = (0, MAX_OPSET)

    def trace(self, t: TraceContext, node: gs.Node) -> None:
        """Move the channel maps of `node` (default: nothing is traced through it)."""

    def apply(self, a: ApplyContext, node: gs.Node, kind: Kind | None) -> None:
        """Rewrite `node` for the plan (default: nothing to rewrite)."""

    def cost(self, c: CostContext, node: gs.Node, kind: Kind | None) -> NodeCost | None:
        """The node's cost that scales with kept channels (default: none)."""
        return None

    def macs(self, node: gs.Node, shape_of: ShapeOf) -> int:
        """Multiply-accumulates of `node` (default: 0, only weighted ops count)."""
        return 0

    def backprop(self, node: gs.Node, out: np.ndarray) -> np.ndarray | None:
        """NISP's backward step: per-channel importance of input 0 from that of the output (default: none)."""
        return None

    def read_affine(self, node: gs.Node, kind: Kind | None) -> Affine | None:
        """The node as ``Y = X W + b`` (default: None, not an affine layer the refit can adjust)."""
        return None

    def write_affine(self, node: gs.Node, kind: Kind | None, w: np.ndarray, b: np.ndarray | None) -> None:
        """Store ``W`` and ``b`` back (the inverse of `read_affine`; ``b`` None leaves the bias)."""
        raise NotImplementedError(f"{node.name}: {node.op} has no affine form")

    def weight_in_axis(self, node: gs.Node, kind: Kind | None) -> int:
        """The axis of input 1 (the weight) that indexes the input channels (default: 0)."""
        return 0


_RULES: dict[tuple[str, str], list[OpRule]] = {}


def register(rule: OpRule) -> OpRule:
    """Register `rule` for each of its ops; opset ranges of one op must not overlap."""
    low, high = rule.opsets
    for op in rule.ops:
        rules = _RULES.setdefault((rule.domain, op), [])
        for other in rules:
            if low <= other.opsets[1] and other.opsets[0] <= high:
                raise ValueError(f"{op}: opsets {rule.opsets} overlap {type(other).__name__}'s {other.opsets}")
        rules.append(rule)
    return rule


def lookup(domain: str | None, op: str, opset: int) -> OpRule | None:
    """The rule of `op` in `domain` at `opset` ("ai.onnx" and None are the default domain)."""
    key = DEFAULT_DOMAIN if domain in (None, "", "ai.onnx") else str(domain)
    for rule in _RULES.get((key, op), ()):
        if rule.opsets[0] <= opset <= rule.opsets[1]:
            return rule
    return None


def rule_of(node: gs.Node) -> OpRule | None:
    """The rule of `node` for hooks whose meaning does not depend on the opset (affine form, weight axes)."""
    return lookup(node.domain, node.op, MAX_OPSET)


def registered_ops(domain: str = DEFAULT_DOMAIN) -> Mapping[str, Iterable[OpRule]]:
    """op type -> its rules (for documentation and tests)."""
    return {op: rules for (d, op), rules in _RULES.items() if d == domain}
