"""Every write to a graph's nodes and tensors goes through here.

Passes and op rules read a `gs.Graph` freely (through `ir`'s readers) but change it only with
these functions, so the invariants of an edit hold in one place: a constant shared with
another node is copied before it is changed (`set_input_const`), consumers that end up with
equal values share one copy again, and shapes made stale by pruning are dropped
(`forget_inner_shapes`) to be re-inferred on export. Loading and normalisation
(`ir.to_graph`) build the graph; everything after it edits here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import ModelError

#: attribute names: the constant a copy was sliced from, and the copies of a constant
_ORIGIN, _COPIES = "_onnxslim_origin", "_onnxslim_copies"


def set_attr(node: gs.Node, name: str, value: Any) -> None:
    node.attrs[name] = value


def remove_attrs(node: gs.Node, *names: str) -> None:
    for name in names:
        node.attrs.pop(name, None)


def set_input_const(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Replace the constant feeding `node.inputs[index]`, never touching other consumers.

    A constant shared with another node is copied under a fresh name first, so that
    slicing it for one consumer cannot corrupt the other. Consumers that end up with
    the same values (nodes sharing a weight are pruned alike) share one copy again.
    """
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        raise ModelError(f"{node.name}: input {index} is not a constant")
    old = np.asarray(tensor.values)
    values = np.require(values, old.dtype, "C")  # keeps a scalar's shape, unlike np.ascontiguousarray
    from . import qdq  # a folded QDQ weight: the new values are re-quantized (graph.qdq)

    scheme = qdq.scheme_of(tensor)
    if scheme is not None:
        values, scheme = qdq.rewrite(scheme, old, values)
    origin = getattr(tensor, _ORIGIN, tensor)
    copies: list[gs.Constant] = origin.__dict__.setdefault(_COPIES, [])
    twin = next((c for c in copies if c is not tensor and np.array_equal(c.values, values)
                 and _same_scheme(qdq.scheme_of(c), scheme)), None)
    if twin is not None and not _used_twice(node, tensor):
        node.inputs[index] = twin
        return
    if len(tensor.outputs) > 1 or _used_twice(node, tensor):
        fresh = gs.Constant(_fresh_name(tensor.name, node), values)
        setattr(fresh, _ORIGIN, origin)
        if scheme is not None:
            setattr(fresh, qdq.SCHEME_ATTR, scheme)
        copies.append(fresh)
        node.inputs[index] = fresh
        return
    tensor.values = values
    if scheme is not None:
        setattr(tensor, qdq.SCHEME_ATTR, scheme)


def _same_scheme(a: Any, b: Any) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.same(b))


def replace_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    node.inputs[index] = tensor  # graph-surgeon's input lists update both ends


def stand_in_for(constant: gs.Constant, dtype: Any) -> gs.Variable:
    """A Variable of `constant`'s name and shape that every node reading `constant` reads instead (an export
    without that weight: it is left out, or given apart)."""
    stand_in = gs.Variable(constant.name, dtype=dtype, shape=list(constant.shape))
    for node in list(constant.outputs):
        for i, t in enumerate(list(node.inputs)):
            if t is constant:
                replace_input(node, i, stand_in)
    return stand_in


def load_values(constant: gs.Constant, values: np.ndarray) -> None:
    """Give a lazily loaded constant its values, read elsewhere (the same values: nothing changes)."""
    constant.values = values


def append_input(node: gs.Node, tensor: gs.Tensor, position: int = 0) -> None:
    """Append `tensor` as the last input, after empty optional inputs up to `position` if there are fewer."""
    while len(node.inputs) < position:
        node.inputs.append(gs.Variable.empty())
    node.inputs.append(tensor)


def _used_twice(node: gs.Node, tensor: gs.Tensor) -> bool:
    return sum(1 for t in node.inputs if t is tensor) > 1


def _fresh_name(base: str, node: gs.Node) -> str:
    return f"{base}__{node.name}"


def make_constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.require(values, requirements="C"))


def rewire_node(node: gs.Node, op: str, inputs: list[gs.Tensor], attrs: Mapping[str, Any] | None = None) -> None:
    """Turn `node` into `op(inputs)` in place; its outputs (and their names) stay.

    Block pruning uses it to replace `Add(x, f(x))` by `Identity(x)` or `Add(x, mean)`;
    the dead branch is then removed by `cleanup` on export.
    """
    node.op = op
    node.inputs.clear()
    node.inputs.extend(inputs)
    node.attrs.clear()
    node.attrs.update(dict(attrs or {}))


def fresh_name(graph: gs.Graph, base: str) -> str:
    """`base`, or `base` with the least numeric suffix, naming no node or tensor of `graph` yet."""
    return fresh_names(graph, base)[0]


def fresh_names(graph: gs.Graph, *bases: str) -> list[str]:
    """`fresh_name` of each of `bases`, distinct from each other too, from one walk of the graph (a rule that adds
    several nodes at each of many norms walked it once per name)."""
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    names = []
    for base in bases:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names.append(name)
    return names


def make_variable(name: str, dtype: Any) -> gs.Variable:
    """A new intermediate tensor (its shape is inferred on export)."""
    return gs.Variable(name, dtype=np.dtype(dtype))


def insert_node_before(
    graph: gs.Graph, anchor: gs.Node, op: str, name: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor],
    attrs: Mapping[str, Any] | None = None,
) -> gs.Node:
    """Add the node ``op(inputs) -> outputs`` to `graph`, just before `anchor` (export sorts the graph anyway).

    Low-rank decomposition (`methods.lowrank`) splits a layer in two: the new first layer is
    inserted here and `anchor` becomes the second, reading the new layer's output.
    """
    node = gs.Node(op=op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=list(outputs))
    position = next(i for i, n in enumerate(graph.nodes) if n is anchor)
    graph.nodes.insert(position, node)
    return node


def forget_inner_shapes(graph: gs.Graph) -> None:
    """Drop the shapes of inner tensors (stale after pruning; re-inferred on export)."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.outputs and tensor not in graph.inputs:
            tensor.shape = None


def working_copy(graph: gs.Graph) -> gs.Graph:
    """A copy of `graph` to prune while `graph` stays as it is (a search prunes one traced graph many times).

    `read.copy_graph`, plus what loading attached to the tensors: nodes, tensors and attribute dicts
    are new; weight arrays are shared, which is safe because an edit replaces a constant's values
    (`set_input_const`), never writes into them. A QDQ scheme and why a weight is unfolded are carried over; the bookkeeping
    of earlier edits (`_ORIGIN`, `_COPIES`) is not: the copy starts unedited.
    """
    out = graph.copy()
    old, new = graph.tensors(), out.tensors()
    for name, tensor in old.items():
        twin = new.get(name)
        if twin is None:
            continue
        for key, value in tensor.__dict__.items():
            if key not in twin.__dict__ and key not in (_ORIGIN, _COPIES):
                twin.__dict__[key] = value
    return out
