"""Calibrated output-contribution importance of heads, neurons and hidden channels (after Kwon et al. 2022).

Kwon et al. ("A Fast Post-Training Pruning Framework for Transformers", NeurIPS 2022) score each head and
FFN neuron by the Fisher information of a mask on it and then fit each layer's output by least squares
("mask tuning"). ONNX gives no gradients; the label-free stand-in used here is the error a class's
removal causes in the outputs of the layers that read it, measured on calibration data. With ``x`` a
consumer's input rows (centred covariance ``S``, the bias absorbs the mean under the refit) and ``W`` its
weight ``[D, C_out]``, for class ``k`` with input columns ``J_k``:

* ``contrib`` (no compensation): ``s_k = sum_consumers sum_{j in J_k} S_jj ||W_j||^2``, the expected
  squared change of the consumers' outputs when only ``k`` is removed and nothing is refitted, with the
  cross terms between ``k``'s own columns dropped (the diagonal of the output-error Hessian, as a
  diagonal Fisher drops the off-diagonal terms);
* ``obs`` (with compensation): ``s_k = sum_consumers tr(W_J^T ([S^-1]_JJ)^-1 W_J)``, the output error
  left after the other columns are refitted by least squares (Optimal Brain Surgeon's block form for
  the columns ``J = J_k``, ridge as in the refit).

``kwon`` adds Kwon et al.'s global mask search in a cost-equal form: the heads and FFN neurons of all
layers compete in one list ordered by ``s_k / cost_k`` (``cost_k = macs(group) / size(group)``, the
class's share of its group's MACs); both kinds write into the same residual stream through their
output projections, so their ``contrib`` scores are in the same units and are *not* normalised per
group (as the global budget does). Classes are removed from the lowest until the MACs the per-part
ratios (``--heads`` / ``--ffn`` / ``--ratio``) would remove are spent, each group losing at most
``--max-ratio``; the hidden-size groups keep their ``--hidden`` ratio, and a part given 0 (``--heads 0``)
stays whole (the neurons of all layers then compete among themselves). The result is a per-group
allocation (``group_ratios``), selected by ``contrib`` and refitted.

Both are exact for one class removed from one consumer (``obs`` up to the ridge); removing several classes
at once, the errors do not add up exactly (they interact through ``S``), and a hidden channel's effect
through the LayerNorm statistics is not counted. Each registers as a method needing ``--calib``; the
plan is `choose_plan`'s (``--ratio`` / ``--heads`` / ``--ffn`` / ``--hidden`` / budgets) and the
least-squares refit of the consumers follows, as after every method given ``--calib``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from dataclasses import replace

from ..channels import Group, TransformerPart, transformer_part
from .base import Context, MethodOutcome
from . import reconstruct as rc
from .budget import group_ratios
from .datadriven import (Consumer, _class_map, _layer_key, _reconstruction_method, _selection_alpha, group_consumers,
                         input_covariances, need_calibration, settings)

log = logging.getLogger(__name__)

Covariances = Mapping[str, tuple[np.ndarray, np.ndarray]]


def contrib_scores(ctx: Context, group: Group, consumers: Sequence[Consumer], cov: Covariances, removed: set[int],
                   free: np.ndarray, n_remove: int) -> np.ndarray:
    """``sum S_jj ||W_j||^2`` per class over its columns in every consumer (module docstring)."""
    scores = np.zeros(group.size)
    for consumer in consumers:
        full, _ = cov[_layer_key(consumer.layer)]
        cols, cls = _class_map(group, consumer.column_roots)
        w = consumer.w[cols]
        energy = np.diag(full)[cols] * np.einsum("ij,ij->i", w, w)
        np.add.at(scores, cls, energy)
    return scores


def obs_scores(ctx: Context, group: Group, consumers: Sequence[Consumer], cov: Covariances, removed: set[int],
               free: np.ndarray, n_remove: int) -> np.ndarray:
    """``tr(W_J^T ([S^-1]_JJ)^-1 W_J)`` per class, the error left after refitting the other columns."""
    s = settings(ctx)
    scores = np.zeros(group.size)
    for consumer in consumers:
        full, _ = cov[_layer_key(consumer.layer)]
        lam = rc.ridge_lambda(full, _selection_alpha(ctx, consumer.layer, full.shape[0], s))
        inverse = np.linalg.inv(full + lam * np.eye(full.shape[0]))
        cols, cls = _class_map(group, consumer.column_roots)
        weights = consumer.w
        for k in np.unique(cls).tolist():
            j = cols[cls == k]
            w = weights[j]
            # tr(W^T A^-1 W) as an elementwise sum: the [out, out] product would be 19 GB for a 49,152-word LM head
            scores[k] += float(np.einsum("ij,ij->", w, np.linalg.solve(inverse[np.ix_(j, j)], w)))
    return scores


def contrib(ctx: Context) -> MethodOutcome:
    """Output-contribution importance (no compensation), then the least-squares refit."""
    return _reconstruction_method(ctx, "contrib", contrib_scores)


def obs(ctx: Context) -> MethodOutcome:
    """Output error after refitting the other columns (OBS block form), then the least-squares refit."""
    return _reconstruction_method(ctx, "obs", obs_scores)


def kwon_allocation(ctx: Context) -> dict[int, float]:
    """Per group, the fraction removed: heads and FFN neurons by one global ``contrib / cost`` order (module docstring)."""
    trace = ctx.trace
    ratios = group_ratios(ctx) or {g.index: ctx.options.ratio for g in trace.groups}
    consumers = group_consumers(ctx)
    cov = input_covariances(ctx, [c.layer for cs in consumers.values() for c in cs])
    pool = [g for g in trace.groups if not g.is_frozen and g.index in consumers and g.macs > 0
            and transformer_part(trace.node_kind, g) in (TransformerPart.HEADS, TransformerPart.FFN) and ratios.get(g.index, 0.0) > 0]
    budget = sum(ratios.get(g.index, 0.0) * g.macs for g in pool)
    candidates: list[tuple[float, int, float]] = []
    for g in pool:
        free = np.array([not f for f in g.frozen])
        scores = contrib_scores(ctx, g, consumers[g.index], cov, set(), free, 0)
        cost = g.macs / g.size
        candidates.extend((float(scores[k]) / cost, g.index, cost) for k in np.flatnonzero(free).tolist())
    removed = {g.index: 0 for g in pool}
    limit = {g.index: min(int(ctx.params.max_ratio * g.size), g.prunable) for g in pool}
    spent = 0.0
    for _, index, cost in sorted(candidates):
        if spent + cost > budget:
            break
        if removed[index] < limit[index]:
            removed[index] += 1
            spent += cost
    sizes = {g.index: g.size for g in pool}
    out = {g.index: ratios.get(g.index, 0.0) for g in trace.groups if g.index not in removed}
    out.update({index: count / sizes[index] for index, count in removed.items()})
    log.info("kwon: removed %.0f of %.0f MACs budgeted, per group %s", spent, budget, {k: round(v, 3) for k, v in out.items()})
    return out


def kwon(ctx: Context) -> MethodOutcome:
    """The global cost-equal allocation of heads and neurons (`kwon_allocation`), selected by ``contrib``, refitted."""
    need_calibration(ctx, "kwon")
    allocation = tuple(sorted((g, min(r, 0.99)) for g, r in kwon_allocation(ctx).items()))
    local = replace(ctx, options=replace(ctx.options, params={**ctx.options.params, "group_ratios": allocation}))
    return _reconstruction_method(local, "kwon", contrib_scores)  # `local` shares `ctx.notes`
