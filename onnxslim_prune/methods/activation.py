"""Activation criteria. ``mean_act`` (mean ``|activation|``) and ``apoz`` (Hu et al., "Network Trimming: A
Data-Driven Neuron Pruning Approach towards Efficient Deep Architectures", 2016: score
``1 - APoZ``): ``ChannelMoments`` of each group's tensors after its activation. The
per-channel sums (``x``, ``|x|``, ``x^2``, ``x <= 0``) are reduced inside onnxruntime
(``calib.in_session.moments_model``), so only ``[C]`` vectors leave the session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import ir
from ..channels import Group, Role, Trace
from ..calib import ChannelMoments
from ..calib.statistic import ActivationMoments, collect
from .base import Context, MethodOutcome
from ..ops.elementwise import UNARY_OPS
from . import reconstruct as rc
from .budget import choose_plan
from .datadriven import need_calibration, per_class, settings, with_fallback

log = logging.getLogger(__name__)

#: ops after which an activation's statistics are read

ACTIVATIONS = frozenset(UNARY_OPS) - {"Identity", "Dropout", "Cast", "Neg", "Abs", "Not", "IsNaN", "IsInf", "Sign"}

def activation_tensors(ctx: Context, group: Group) -> list[str]:
    """The group's tensors after an activation (else after a norm, else the source outputs)."""
    nodes = ir.node_by_name(ctx.graph)
    by_role: dict[str, list[str]] = {"act": [], "norm": [], "out": []}
    for m in group.members:
        node = nodes.get(m.node)
        if node is None or not node.outputs:
            continue
        name = node.outputs[0].name
        if name not in ctx.trace.maps:
            continue
        if m.role == Role.PASS and m.op in ACTIVATIONS:
            by_role["act"].append(name)
        elif m.role == Role.NORM:
            by_role["norm"].append(name)
        elif m.role == Role.OUT:
            by_role["out"].append(name)
    for role in ("act", "norm", "out"):
        names = [n for n in dict.fromkeys(by_role[role]) if _in_group(ctx.trace, group, n)]
        if names:
            return names
    return []


def _in_group(trace: Trace, group: Group, tensor: str) -> bool:
    roots = trace.class_positions(tensor)
    return roots is not None and bool(np.isin(roots, np.asarray(group.classes)).any())


def activation_moments(ctx: Context, tensors: Sequence[str]) -> dict[str, ChannelMoments]:
    """``ChannelMoments`` of each tensor over the calibration set (cached), reduced inside onnxruntime."""
    s = settings(ctx)
    names = list(dict.fromkeys(tensors))
    stat = ActivationMoments({n: (ctx.trace.maps[n].axis, len(ctx.trace.shapes[n]), ctx.trace.maps[n].size) for n in names})
    collect(ctx.model, ctx.calibration, [stat], s.batch_size, progress=ctx.progress, subgraph=rc.weightless_cut)
    return stat.result()


def _activation_method(ctx: Context, name: str, value: Callable[[ChannelMoments], np.ndarray]) -> MethodOutcome:
    need_calibration(ctx, name)
    per_group = {g.index: activation_tensors(ctx, g) for g in ctx.trace.groups if not g.is_frozen}
    per_group = {k: v for k, v in per_group.items() if v}
    moments = activation_moments(ctx, [t for ts in per_group.values() for t in ts]) if per_group else {}
    scores: dict[int, np.ndarray] = {}
    for group in ctx.trace.groups:
        if group.index not in per_group:
            continue
        parts = [per_class(ctx.trace, group, t, value(moments[t])) for t in per_group[group.index]]
        scores[group.index] = np.mean(parts, axis=0)
    scores, notes = with_fallback(ctx, scores, name)
    return MethodOutcome(choose_plan(ctx, scores), notes=tuple(notes))


@dataclass(frozen=True)
class ActivationCriterion:
    """A per-channel importance read from the activations' streamed moments (higher = kept longer).

    `score` maps a tensor's `ChannelMoments` (mean, mean |v|, mean v^2, fraction <= 0 per
    channel) to one value per channel; the tensors are each group's activations
    (`activation_tensors`), the classes take the mean over their positions, and the plan is
    `choose_plan`'s. Registered as a data-driven method of its own name (`methods.builtin`).
    """

    name: str
    help: str
    score: Callable[[ChannelMoments], np.ndarray]

    def __call__(self, ctx: Context) -> MethodOutcome:
        return _activation_method(ctx, self.name, self.score)


#: mean |activation| of each channel after its activation (low = removed first)
MEAN_ACT = ActivationCriterion("mean_act", "smallest mean |activation| removed", lambda m: m.mean_abs)
#: APoZ (Hu et al. 2016): channels whose activations are most often zero are removed first
APOZ = ActivationCriterion("apoz", "APoZ (Hu et al. 2016): most often zero activations removed", lambda m: 1.0 - m.apoz)
ACTIVATION_CRITERIA = (MEAN_ACT, APOZ)
