"""``nisp`` (Yu et al., "NISP: Pruning Networks using Neuron Importance Score Propagation",
CVPR 2018): the final response layer (the input of the last weighted node) is ranked by
Inf-FS (Roffo, Melzi, Cristani, ICCV 2015): ``A = a sigma + (1 - a)(1 - |rho|)`` with
``sigma_ij = max(std_i, std_j) / max std`` and ``rho`` the (streamed, Pearson) correlation,
``S = (I - r A)^-1 - I`` with ``r = 0.9 / rho(A)``, score ``s_i = sum_j S_ij``; scores are
propagated backwards ``s_in = |W|^T s_out`` through Conv / Gemm / MatMul, scaled by
``|gamma| / sqrt(var + eps)`` through BatchNormalization, and carried unchanged through
pooling, activations, Add, Concat, Split, Slice, Flatten and Reshape (by channel class);
a class's score is the sum over the group's sources of their output importance.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import Trace
from ..calib.statistic import PooledCovariance, collect
from .base import Context, MethodOutcome
from ..ops import lookup
from ..ops.registry import MAX_OPSET
from . import reconstruct as rc
from .budget import choose_plan
from .datadriven import need_calibration, per_class, settings, with_fallback

log = logging.getLogger(__name__)

def _final_response(ctx: Context) -> tuple[str, str] | None:
    """(tensor, node) of the final response layer: the traced input of the last weighted node."""
    weighted = {s.node for s in ctx.trace.sources}
    for node in reversed(list(ctx.graph.nodes)):
        if node.name in weighted and node.inputs and ctx.trace.maps.get(node.inputs[0].name) is not None:
            return node.inputs[0].name, node.name
    return None


def inf_fs(std: np.ndarray, corr: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Inf-FS feature scores (Roffo et al., ICCV 2015) from per-feature std and correlation."""
    top = float(std.max(initial=0.0))
    s = std / top if top > 0 else np.zeros_like(std)
    sigma = np.maximum.outer(s, s)
    a = alpha * sigma + (1.0 - alpha) * (1.0 - np.abs(corr))
    radius = float(np.max(np.abs(np.linalg.eigvals(a)))) if a.size else 0.0
    if radius <= 0:
        return np.zeros(std.size)
    r = 0.9 / radius
    n = a.shape[0]
    s_mat = np.linalg.inv(np.eye(n) - r * a) - np.eye(n)
    return s_mat.sum(axis=1)


def _frl_scores(ctx: Context, tensor: str) -> np.ndarray:
    cmap = ctx.trace.maps[tensor]
    s = settings(ctx)

    stat = PooledCovariance(tensor, cmap.axis, cmap.size)
    collect(ctx.model, ctx.calibration, [stat], s.batch_size, progress=ctx.progress, subgraph=rc.weightless_cut)
    cov = stat.covariance()
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    denom = np.outer(std, std)
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    return inf_fs(std, corr)


def _atom_transfer(trace: Trace, into: str, source: str, values: np.ndarray) -> np.ndarray:
    """Importance of `source` positions moved onto `into` positions by channel class."""
    roots_in = trace.class_positions(into)
    roots_out = trace.class_positions(source)
    assert roots_in is not None and roots_out is not None
    if roots_in.size == roots_out.size and np.array_equal(roots_in, roots_out):
        return values
    total: dict[int, float] = defaultdict(float)
    for r, v in zip(roots_out.tolist(), values.tolist()):
        total[r] += v
    counts: dict[int, int] = defaultdict(int)
    for r in roots_in.tolist():
        counts[r] += 1
    return np.array([total.get(r, 0.0) / counts[r] for r in roots_in.tolist()])


def nisp_scores(ctx: Context) -> tuple[dict[int, np.ndarray], list[str]]:
    """Per group, the NISP importance of each class (module docstring)."""
    found = _final_response(ctx)
    if found is None:
        return {}, ["nisp: no final response layer was found"]
    frl, frl_node = found
    trace = ctx.trace
    importance: dict[str, np.ndarray] = {frl: _frl_scores(ctx, frl)}
    sources = {s.node for s in trace.sources}
    for node in reversed(list(ctx.graph.nodes)):
        if node.name == frl_node:
            continue
        outs = [(t.name, importance[t.name]) for t in node.outputs if t.name in importance and t.name in trace.maps]
        if not outs:
            continue
        if node.name in sources or node.op == "BatchNormalization":
            x = node.inputs[0]
            if x.name not in trace.maps:
                continue
            rule = lookup(None, node.op, MAX_OPSET)  # the op rule's backward step (`OpRule.backprop`)
            value = None if rule is None else rule.backprop(node, outs[0][1])
            if value is not None and value.size == trace.maps[x.name].size:
                importance[x.name] = importance.get(x.name, 0.0) + value
            continue
        for t in node.inputs:
            if isinstance(t, gs.Constant) or t.name not in trace.maps:
                continue
            for name, value in outs:
                moved = _atom_transfer(trace, t.name, name, value)
                importance[t.name] = importance.get(t.name, 0.0) + moved
    nodes = ir.node_by_name(ctx.graph)
    scores: dict[int, np.ndarray] = {}
    for group in trace.groups:
        if group.is_frozen:
            continue
        total = np.zeros(group.size)
        seen = False
        for source in trace.sources:
            if source.space not in group.spaces:
                continue
            y = nodes[source.node].outputs[0].name
            if y in importance:
                seen = True
                total += per_class(trace, group, y, importance[y], mean=False)
        if seen and np.any(total > 0):
            scores[group.index] = total
    return scores, []


def nisp(ctx: Context) -> MethodOutcome:
    """NISP (Yu et al., CVPR 2018): Inf-FS on the final response layer, propagated back by |W|."""
    need_calibration(ctx, "nisp")
    scores, notes = nisp_scores(ctx)
    scores, more = with_fallback(ctx, scores, "nisp")
    return MethodOutcome(choose_plan(ctx, scores), notes=tuple(notes + more))


