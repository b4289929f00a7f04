"""Choose which classes of each group to remove: a frozen, printable `Plan`.

Uniform ratio: a group of ``n`` classes loses ``floor(r * n)`` of them, the lowest
scored among its unfrozen classes; at least one class stays, ``round_to`` rounds the
kept count up to the group's multiple (`roundto.Rounding.classes`: fixed with ``--round-to N``,
per group with ``auto``), and a grouped-conv group removes the same count from
each of its blocks. Finally every traced tensor keeps at least one channel (a Split
or Slice output could otherwise lose all of its channels): the best class of such a
tensor is restored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..channels import Group, Trace
from ..roundto import Rounding


@dataclass(frozen=True)
class GroupPlan:
    group: int
    size: int
    pruned: tuple[int, ...]  # class roots to remove

    @property
    def kept(self) -> int:
        return self.size - len(self.pruned)


@dataclass(frozen=True)
class Plan:
    groups: tuple[GroupPlan, ...]

    @property
    def pruned_classes(self) -> frozenset[int]:
        return frozenset(c for g in self.groups for c in g.pruned)

    def for_group(self, index: int) -> GroupPlan | None:
        return next((g for g in self.groups if g.group == index), None)

    def atom_keep(self, trace: Trace) -> np.ndarray:
        """Per atom: True when its class is kept."""
        pruned = np.fromiter(self.pruned_classes, dtype=np.int64)
        return ~np.isin(trace.roots, pruned)


def check_ratio(ratio: float) -> None:
    if not (0.0 <= ratio < 1.0) or math.isnan(ratio):
        raise UsageError(f"--ratio must be in [0, 1), got {ratio}")


def kept_count(size: int, ratio: float, round_to: int = 1, block: int = 1) -> int:
    """Channels kept: the least count >= the ratio's that is a multiple of `round_to` and
    leaves a removed count that is a multiple of `block` (grouped convs); else all."""
    keep = max(1, size - int(math.floor(ratio * size + 1e-9)))
    while keep < size and (keep % round_to or (size - keep) % block):
        keep += 1
    return keep


def select_lowest(group: Group, scores: np.ndarray, n_remove: int) -> tuple[int, ...]:
    """The `n_remove` lowest-scored unfrozen classes (equal count per block when grouped)."""
    if n_remove <= 0:
        return ()
    free = np.array([not f for f in group.frozen])
    order_key = np.where(free, scores, np.inf)
    if group.block > 1:
        per_block = n_remove // group.block
        size = group.size // group.block
        chosen: list[int] = []
        for b in range(group.block):
            idx = np.arange(b * size, (b + 1) * size)
            idx = idx[free[idx]]
            take = idx[np.argsort(order_key[idx], kind="stable")][: min(per_block, max(0, idx.size - 1))]
            chosen.extend(int(i) for i in take)
        # every block must lose the same count: trim to the smallest
        counts = [sum(1 for i in chosen if i // size == b) for b in range(group.block)]
        least = min(counts) if counts else 0
        final: list[int] = []
        for b in range(group.block):
            in_block = [i for i in chosen if i // size == b]
            final.extend(in_block[:least])
        return tuple(group.classes[i] for i in final)
    candidates = np.flatnonzero(free)
    ranked = candidates[np.argsort(order_key[candidates], kind="stable")]
    return tuple(group.classes[int(i)] for i in ranked[:n_remove])


def removed_count(group: Group, ratio: float, multiple: int) -> int:
    """Classes `ratio` removes from `group` whose kept count must be a multiple of `multiple` (before the tensor check)."""
    keep = kept_count(group.size, ratio, multiple, group.block)
    n_remove = min(group.size - keep, group.prunable)
    while n_remove > 0 and ((group.size - n_remove) % multiple or n_remove % max(group.block, 1)):
        n_remove -= 1  # frozen classes capped the removal: keep the roundings valid
    return n_remove


def uniform_plan(
    trace: Trace, scores: Mapping[int, np.ndarray], ratio: float, round_to: int | Rounding = 1,
    group_ratios: Mapping[int, float] | None = None,
) -> Plan:
    """`ratio` of every group, or with `group_ratios` (group index -> ratio: ``--heads`` / ``--ffn`` / ``--hidden``, or a
    searched allocation) that group's own fraction (unlisted groups: none removed)."""
    check_ratio(ratio)
    rounding = Rounding.of(round_to)
    plans = []
    for group in trace.groups:
        if group.is_frozen or group.index not in scores:
            continue
        own = ratio if group_ratios is None else group_ratios.get(group.index, 0.0)
        if own <= 0:
            continue
        n_remove = removed_count(group, own, rounding.classes(group, trace))
        pruned = select_lowest(group, scores[group.index], n_remove)
        if pruned:
            plans.append(GroupPlan(group.index, group.size, pruned))
    return keep_every_tensor_alive(trace, Plan(tuple(plans)), scores, rounding)


def keep_every_tensor_alive(
    trace: Trace, plan: Plan, scores: Mapping[int, np.ndarray], round_to: int | Rounding = 1
) -> Plan:
    """Restore the best class of any traced tensor that would lose all of its channels.

    A group that had a class restored then gets more of its best pruned classes back
    until its kept count is a multiple of its `round_to` multiple; a grouped-conv group (whose blocks
    must stay even) gets all of them back.
    """
    rounding = Rounding.of(round_to)
    pruned = set(plan.pruned_classes)
    if not pruned:
        return plan
    rank: dict[int, float] = {}
    for group in trace.groups:
        if group.index in scores:
            rank.update(zip(group.classes, scores[group.index].tolist()))
    seen: set[int] = set()
    for cmap in trace.maps.values():
        if id(cmap.atoms) in seen:
            continue
        seen.add(id(cmap.atoms))
        classes = set(trace.roots[cmap.atoms].tolist())
        if classes and classes <= pruned:
            pruned.discard(max(classes, key=lambda c: rank.get(c, 0.0)))
    if len(pruned) == len(plan.pruned_classes):
        return plan
    groups = []
    for gp in plan.groups:
        still = [c for c in gp.pruned if c in pruned]
        if len(still) != len(gp.pruned):
            if trace.groups[gp.group].block > 1:
                still = []
            still.sort(key=lambda c: rank.get(c, 0.0))
            multiple = rounding.classes(trace.groups[gp.group], trace)
            while still and (gp.size - len(still)) % multiple:
                still.pop()  # restore the best-scored
        if still:
            groups.append(GroupPlan(gp.group, gp.size, tuple(still)))
    return Plan(tuple(groups))
