"""Channel importance: one score per class of a group (higher = more important).

Criteria (each a function of the weights only, so data-free):

* ``l1`` / ``l2`` (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017):
  the norm of each output filter, ``s_c = sum_sources ||W_source[c]||_p``. A class that
  several sources feed (a residual group) sums its filters' norms. An attention head is
  scored by every weight it owns: its Q, K and V columns and its rows of the output
  projection, ``s_h = sum_sources ||W_source[h]||_p + sum_consumers ||W_out[h, :]||_p``
  (a head's output-projection rows decide how much it contributes).
* ``bn`` (Liu et al., "Network Slimming", ICCV 2017): ``s_c = sum |gamma_c|`` over the
  BatchNormalization nodes of the group; groups without BN fall back to ``l1``.
* ``fpgm`` (He et al., "Filter Pruning via Geometric Median", CVPR 2019): the summed
  Euclidean distance of a filter to the other filters of its layer,
  ``s_c = sum_j ||F_c - F_j||_2``; filters near the geometric median are redundant.
* ``random``: seeded uniform scores, the control every criterion must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import Group, Kind, TransformerPart, Role, Source, Trace, transformer_part
from ..errors import UsageError
from ..ops.registry import rule_of

Criterion = Callable[[Trace, gs.Graph, Group, int], np.ndarray]


def filters(graph_nodes: Mapping[str, gs.Node], source: Source) -> np.ndarray:
    """The source's output filters as rows: [channels, fan_in], in the weight's own dtype.

    A view of the weight wherever the layout allows (Conv, Gemm, MatMul): scoring copies
    no weight; the criteria accumulate in float64 block by block (`_blocks`).
    """
    weight = ir.input_const(graph_nodes[source.node], 1)
    assert weight is not None
    w = np.moveaxis(np.asarray(weight), source.axis, 0)
    return w.reshape(w.shape[0], -1)


#: the most bytes of temporaries a criterion makes at once from a block of filters
BLOCK_BYTES = 2**24
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _blocks(f: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Row blocks of `f` of about `BLOCK_BYTES` (float64 blocks for element types numpy reduces poorly)."""
    step = max(1, BLOCK_BYTES // max(1, f.shape[1] * 8))
    for start in range(0, f.shape[0], step):
        rows = slice(start, start + step)
        block = f[rows]
        yield rows, block if block.dtype in _NATIVE else block.astype(np.float64)


def _l1_rows(f: np.ndarray) -> np.ndarray:
    """Per row, the sum of |w| accumulated in float64 (abs is exact in any precision)."""
    out = np.empty(f.shape[0], dtype=np.float64)
    for rows, block in _blocks(f):
        out[rows] = np.abs(block).sum(axis=1, dtype=np.float64)
    return out


def _l2_rows(f: np.ndarray) -> np.ndarray:
    """Per row, the Euclidean norm; products and sums in float64 (einsum casts on the fly, no copy)."""
    out = np.empty(f.shape[0], dtype=np.float64)
    for rows, block in _blocks(f):
        out[rows] = np.einsum("ij,ij->i", block, block, dtype=np.float64, casting="safe")
    return np.sqrt(out)


def _fpgm_rows(f: np.ndarray) -> np.ndarray:
    """Per row, the summed distance to every row (cdist works in float64: one contiguous copy, shared by both sides)."""
    from scipy.spatial.distance import cdist  # only fpgm needs scipy: not imported for every run

    rows = np.ascontiguousarray(f, dtype=np.float64)
    return cdist(rows, rows).sum(axis=1)


def _per_class(trace: Trace, group: Group, values: Mapping[int, np.ndarray]) -> np.ndarray:
    """Sum per-space channel values into per-class scores."""
    index = {c: i for i, c in enumerate(group.classes)}
    out = np.zeros(len(group.classes), dtype=np.float64)
    for space, vals in values.items():
        roots = trace.roots[trace.space_atoms[space]]
        for root, v in zip(roots.tolist(), vals.tolist()):
            out[index[root]] += v
    return out


def _source_values(trace: Trace, graph: gs.Graph, group: Group, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    nodes = ir.node_by_name(graph)
    spaces = set(group.spaces)
    values = {s.space: fn(filters(nodes, s)) for s in trace.sources if s.space in spaces}
    scores = _per_class(trace, group, values)
    if transformer_part(trace.node_kind, group) is TransformerPart.HEADS:
        scores += _consumer_values(trace, nodes, group, fn)
    return scores


def _consumer_values(trace: Trace, nodes: Mapping[str, gs.Node], group: Group,
                     fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per class, `fn` of the rows a dense consumer's weight holds for it (a head's rows of the output projection)."""
    index = {c: i for i, c in enumerate(group.classes)}
    out = np.zeros(len(group.classes), dtype=np.float64)
    for member in group.members:
        node = nodes[member.node]
        kind = trace.node_kind.get(member.node)
        rule = rule_of(node)
        weight = ir.input_const(node, 1) if member.role == Role.IN and kind in (Kind.MATMUL, Kind.GEMM) else None
        positions = trace.class_positions(node.inputs[0].name)
        if rule is None or weight is None or positions is None:
            continue
        rows = np.moveaxis(np.asarray(weight), rule.weight_in_axis(node, kind), 0)
        for root, v in zip(positions.tolist(), fn(rows.reshape(rows.shape[0], -1)).tolist()):
            if root in index:
                out[index[root]] += v
    return out


def l1(trace: Trace, graph: gs.Graph, group: Group, seed: int = 0) -> np.ndarray:
    return _source_values(trace, graph, group, _l1_rows)


def _bias(node: gs.Node, kind: Kind | None, rows: int) -> np.ndarray | None:
    """Per output channel, the layer's bias (its op rule's affine form, else input 2), or None."""
    rule = rule_of(node)
    affine = None if rule is None else rule.read_affine(node, kind)
    if affine is not None and affine.b is not None and affine.b.size == rows:
        return affine.b
    bias = ir.input_const(node, 2) if node.op in ("Conv", "ConvTranspose") and ir.has_input(node, 2) else None
    return None if bias is None or bias.size != rows else np.asarray(bias, dtype=np.float64).reshape(-1)


def l1_bias(trace: Trace, graph: gs.Graph, group: Group, seed: int = 0) -> np.ndarray:
    """``sum |w| + |b|``: the l1 norm of a neuron's incoming weights *and* bias, the ranking of the Neuron
    Merging authors' code (Kim et al. 2020); `l1` ranks by the weights alone."""
    nodes = ir.node_by_name(graph)
    spaces = set(group.spaces)
    values = {}
    for source in trace.sources:
        if source.space not in spaces:
            continue
        node = nodes[source.node]
        norms = _l1_rows(filters(nodes, source))
        bias = _bias(node, trace.node_kind.get(source.node), norms.size)
        values[source.space] = norms if bias is None else norms + np.abs(bias)
    return _per_class(trace, group, values)


def l2(trace: Trace, graph: gs.Graph, group: Group, seed: int = 0) -> np.ndarray:
    return _source_values(trace, graph, group, _l2_rows)


def fpgm(trace: Trace, graph: gs.Graph, group: Group, seed: int = 0) -> np.ndarray:
    return _source_values(trace, graph, group, _fpgm_rows)


def bn(trace: Trace, graph: gs.Graph, group: Group, seed: int = 0) -> np.ndarray:
    nodes = ir.node_by_name(graph)
    index = {c: i for i, c in enumerate(group.classes)}
    out = np.zeros(len(group.classes), dtype=np.float64)
    found = False
    for member in group.members:
        if member.op != "BatchNormalization" or member.role != Role.NORM:
            continue
        node = nodes[member.node]
        gamma = ir.input_const(node, 1)
        classes = trace.class_positions(node.inputs[0].name)
        if gamma is None or classes is None:
            continue
        for root, g in zip(classes.tolist(), np.abs(gamma.astype(np.float64)).tolist()):
            if root in index:  # a BN after a Concat also holds other groups' channels
                out[index[root]] += g
                found = True
    return out if found else l1(trace, graph, group, seed)


def random(trace: Trace, graph: gs.Graph, group: Group, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, group.index]).random(len(group.classes))


CRITERIA: dict[str, Criterion] = {"l1": l1, "l1_bias": l1_bias, "l2": l2, "bn": bn, "fpgm": fpgm, "random": random}


def criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise UsageError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}") from None


def score_groups(trace: Trace, graph: gs.Graph, name: str, seed: int = 0) -> dict[int, np.ndarray]:
    """Per prunable group, its class scores under criterion `name`."""
    fn = criterion(name)
    return {g.index: fn(trace, graph, g, seed) for g in trace.groups if not g.is_frozen}
