"""Global budgets (--target-macs / --target-params): one ranking of every group's channels, a cost model, a search.

Global budget. Every prunable class ``c`` of group ``g`` gets a normalised score

    s'_c = s_c / mean_{c' in g, unfrozen} s_c'          (divided by the group's *mean* score)

so that layers of different scale compare. Classes are removed in ONE global order of
increasing ``s'`` (the lowest first) until the model's MACs (or parameters) fall to the
target fraction ``F`` of the model the channel stage receives (the input model, or the
block-pruned one when --blocks is given too):

    removed = the shortest prefix of the order with  cost(kept) / cost(original) <= F

subject to: no group loses more than ``max_ratio`` of its classes (at least one stays),
frozen classes stay, a grouped conv's group loses the same count from every block (a
removal "unit" is one class from each block, scored by the blocks' mean), the kept count
is rounded up to the group's multiple (``round_to``: `roundto.Rounding.classes`; the removal is
rounded down, so a prefix of the order never removes a partial multiple, and the bisection, the
fill and the polish below see the rounded costs), and every traced tensor keeps a channel
(`plan.keep_every_tensor_alive`).

Cost model. For a weighted node with ``M`` MACs, weight size ``W`` and bias size ``B``
whose input and output channel axes keep the fractions ``f_in`` and ``f_out`` of their
positions, the kept cost is ``M f_in f_out`` MACs and ``W f_in f_out + B f_out`` params (a
depthwise conv: ``M f_out``). Positions are counted on the traced channel maps, so a
channel flattened into a Gemm counts its ``H*W`` positions. So removing one out-channel of
a conv saves ``Cin/g*k*k*H*W`` MACs and one in-channel of its consumer ``Cout*k*k*H*W``;
BN parameters and constant operands with a channel axis scale with their kept fraction.
The prefix length is found by bisection on this model; the plan is then materialised and
measured with `validate.model_stats`, and the bisection is repeated with the measured
offset until the achieved fraction is within ``TOLERANCE`` of ``F``.

Layer-compensated pruning, which searches per-group offsets of this ranking, is `methods.lcp`.

Allocation by damage (``--budget-allocation damage``, the default of the reconstruction methods). The
normalised ranking compares a class with its own group's mean, so a group whose scores are spread
out loses up to ``max_ratio`` of its classes whatever that costs. Instead, each group ``g`` comes with
the damage ``D_g(k)`` its consumers are predicted to suffer when the first ``k`` classes of its removal
order go (`datadriven.damage_table`: the least-squares refit's residual, relative to the consumers'
output energy), and the allocation minimises ``sum_g D_g(k_g)`` subject to the budget: on each group's
curve of (cost saved, damage) at the kept counts the rounding allows, the slopes of the lower convex
hull are the marginal damage per MAC saved; steps of all groups are taken in increasing slope (the
greedy knapsack, optimal at the hull's vertices) through the same bisection and measured correction as
the ranking. A group keeps at least ``min_width`` of its classes (``--min-width``) unless going further
costs no predicted damage (all-zero channels: `NEGLIGIBLE_DAMAGE`), and never loses more than
``max_ratio``. The costs of two groups meeting in one node interact (``f_in f_out``); the curves count
each group alone, the measured search corrects the total.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..judge import validate
from ..channels import Group, Trace, transformer_part
from ..ops import lookup
from ..ops.registry import MAX_OPSET, NodeCost, rule_of
from ..analysis.materialize import materialize
from .base import BudgetAllocation, CommonParams, Context
from ..roundto import Rounding
from ..analysis.plan import GroupPlan, Plan, keep_every_tensor_alive, uniform_plan

log = logging.getLogger(__name__)

#: the achieved fraction must land this close (absolute, of the original) to the target
TOLERANCE = 0.005
#: measured corrections of the cost model before giving up on getting closer
MAX_MEASUREMENTS = 5
#: steps tried one by one past the bisection's prefix when its last step is too coarse
MAX_FILL_STEPS = 2000
#: rounds of single-unit moves when the steps are too coarse to land on the budget
POLISH_ROUNDS = 20
#: with at most this many groups, moves of two groups at once are tried too
POLISH_PAIR_GROUPS = 24
DEFAULT_MAX_RATIO = CommonParams.max_ratio
#: predicted damage (relative to the consumers' output energy) at or below which a group may go under --min-width
NEGLIGIBLE_DAMAGE = 1e-6

Keys = Mapping[int, np.ndarray]


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Budget:
    """Target fractions of the original MACs and / or parameters (None: no constraint)."""

    macs: float | None
    params: float | None
    max_ratio: float = DEFAULT_MAX_RATIO

    @staticmethod
    def from_params(params: CommonParams, default_macs: float | None = None) -> Budget:
        """The budget of checked settings (`methods.base.check_options`); `default_macs` when none is set."""
        macs, n_params = params.target_macs, params.target_params
        if macs is None and n_params is None:
            macs = default_macs
        return Budget(macs, n_params, params.max_ratio)

    def deviation(self, macs: float, params: float) -> float:
        """How far above its target the most constrained quantity is (<= 0: budget met)."""
        devs = [f - t for f, t in ((macs, self.macs), (params, self.params)) if t is not None]
        return max(devs) if devs else 0.0

    def describe(self) -> str:
        parts = [f"{name} {t:g}" for name, t in (("MACs", self.macs), ("params", self.params)) if t is not None]
        return " and ".join(parts)


# ----------------------------------------------------------------------------- cost model


@dataclass(frozen=True, eq=False)
class CostModel:
    """Kept MACs and parameters of a plan, computed from the trace (see the module docstring)."""

    trace: Trace
    nodes: tuple[NodeCost, ...]
    macs: int  # of the modelled nodes, unpruned
    params: int

    @staticmethod
    def build(trace: Trace, graph: gs.Graph) -> CostModel:
        """Each node's cost, as its op rule counts it (`OpRule.cost`)."""
        costs: list[NodeCost] = []
        reader = _CostReader(trace)
        for node in graph.nodes:
            rule = rule_of(node) or lookup(None, node.op, MAX_OPSET)  # the cost of an op does not depend on its opset
            cost = None if rule is None else rule.cost(reader, node, trace.node_kind.get(node.name))
            if cost is not None:
                costs.append(cost)
        return CostModel(
            trace, tuple(costs), sum(c.macs for c in costs), sum(c.params_both + c.params_out for c in costs)
        )

    def kept(self, keep_atoms: np.ndarray) -> tuple[float, float]:
        """(MACs, params) of the modelled nodes that survive when atoms `keep_atoms` stay."""
        macs = 0.0
        params = 0.0
        for c in self.nodes:
            f_in = float(keep_atoms[c.in_atoms].mean()) if c.in_atoms is not None and c.in_atoms.size else 1.0
            f_out = float(keep_atoms[c.out_atoms].mean()) if c.out_atoms is not None and c.out_atoms.size else 1.0
            macs += c.macs * f_in * f_out
            params += c.params_both * f_in * f_out + c.params_out * f_out
        return macs, params

    def savings(self, plan: Plan) -> tuple[float, float]:
        """(MACs, params) that `plan` removes, by the model."""
        macs, params = self.kept(plan.atom_keep(self.trace))
        return self.macs - macs, self.params - params

    def class_savings(self, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """First-order saving of removing each class of `group` alone: (MACs, params) per class."""
        macs = np.zeros(group.size)
        params = np.zeros(group.size)
        for i, c in enumerate(group.classes):
            m, p = self.savings(Plan((GroupPlan(group.index, group.size, (c,)),)))
            macs[i], params[i] = m, p
        return macs, params


class _CostReader:
    """The `ops.registry.CostContext` of one build: a tensor shared by several nodes holds its parameters once."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.counted: set[str] = set()

    def atoms(self, tensor: gs.Tensor) -> np.ndarray | None:
        cmap = self.trace.maps.get(tensor.name) if tensor.name else None
        return None if cmap is None else cmap.atoms

    def first_use(self, node: gs.Node, index: int) -> bool:
        """True the first time the constant input `index` is seen (its parameters count there)."""
        name = node.inputs[index].name if index < len(node.inputs) else ""
        if not name or name in self.counted:
            return False
        self.counted.add(name)
        return True


# ----------------------------------------------------------------------------- ranking


def normalised_scores(trace: Trace, scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each group's class scores divided by the mean score of its unfrozen classes."""
    out: dict[int, np.ndarray] = {}
    for group in trace.groups:
        if group.is_frozen or group.index not in scores:
            continue
        s = np.asarray(scores[group.index], dtype=np.float64)
        free = ~np.asarray(group.frozen)
        mean = float(np.mean(np.abs(s[free]))) if free.any() else 0.0
        out[group.index] = s / mean if mean > 0 and math.isfinite(mean) else s.copy()
    return out


@dataclass(frozen=True, eq=False)
class _GroupOrder:
    group: Group
    units: np.ndarray  # [n_units, block]: class positions removed by each unit, in removal order
    keys: np.ndarray  # [n_units]: ranking key of each unit


@dataclass(frozen=True, eq=False)
class Ranking:
    """One global removal order: step i removes the next unit of group `steps[i]`."""

    orders: Mapping[int, _GroupOrder]
    steps: np.ndarray
    round_to: Rounding
    multiples: Mapping[int, int]  # group index -> the multiple its kept class count keeps

    @staticmethod
    def build(trace: Trace, keys: Keys, max_ratio: float, round_to: int | Rounding = 1,
              caps: Mapping[int, float] | None = None) -> Ranking:
        """`caps`: group index -> the most that group may lose, below `max_ratio` (``--heads`` / ``--ffn`` / ``--hidden``)."""
        rounding = Rounding.of(round_to)
        multiples = {g.index: rounding.classes(g, trace) for g in trace.groups if not g.is_frozen}
        orders: dict[int, _GroupOrder] = {}
        entries: list[tuple[np.ndarray, int]] = []
        for group in trace.groups:
            if group.is_frozen or group.index not in keys:
                continue
            cap = min(max_ratio, (caps or {}).get(group.index, max_ratio))
            order = _group_order(group, np.asarray(keys[group.index], dtype=np.float64), cap)
            if order.keys.size:
                orders[group.index] = order
                entries.append((order.keys, group.index))
        return Ranking(orders, _steps(entries), rounding, multiples)

    @staticmethod
    def of_units(trace: Trace, units: Mapping[int, tuple[np.ndarray, np.ndarray]], round_to: int | Rounding = 1) -> Ranking:
        """A ranking of given per-group removal orders: group index -> (units ``[n, block]`` in removal order, the
        global key of each unit, non-decreasing along the order)."""
        rounding = Rounding.of(round_to)
        multiples = {g.index: rounding.classes(g, trace) for g in trace.groups if not g.is_frozen}
        orders: dict[int, _GroupOrder] = {}
        entries: list[tuple[np.ndarray, int]] = []
        for index, (group_units, keys) in units.items():
            if len(group_units):
                orders[index] = _GroupOrder(trace.groups[index], np.asarray(group_units), np.asarray(keys, dtype=np.float64))
                entries.append((orders[index].keys, index))
        return Ranking(orders, _steps(entries), rounding, multiples)

    @property
    def length(self) -> int:
        return int(self.steps.size)

    def counts(self, k: int) -> dict[int, int]:
        """Units removed per group by the first `k` steps."""
        taken = np.bincount(self.steps[: max(0, k)], minlength=max(self.orders, default=-1) + 1)
        return {index: int(taken[index]) for index in self.orders}

    def plan(self, trace: Trace, counts: Mapping[int, int], keys: Keys) -> Plan:
        """Remove `counts[g]` units of each group (round_to applied, every tensor kept alive)."""
        groups: list[GroupPlan] = []
        for index, order in self.orders.items():
            n_units = _rounded_units(order.group, counts.get(index, 0), self.multiples[index])
            if n_units <= 0:
                continue
            removed = order.units[:n_units].ravel()
            pruned = tuple(order.group.classes[int(i)] for i in sorted(removed.tolist()))
            groups.append(GroupPlan(index, order.group.size, pruned))
        return keep_every_tensor_alive(trace, Plan(tuple(groups)), keys, self.round_to)


def _steps(entries: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The global order of (unit keys, group) entries: by key, then group index, then position in the group."""
    if not entries:
        return np.zeros(0, dtype=np.int64)
    all_keys = np.concatenate([k for k, _ in entries])
    groups = np.concatenate([np.full(k.size, g, dtype=np.int64) for k, g in entries])
    ranks = np.concatenate([np.arange(k.size) for k, _ in entries])
    return groups[np.lexsort((ranks, groups, all_keys))]


def _group_order(group: Group, keys: np.ndarray, max_ratio: float) -> _GroupOrder:
    free = ~np.asarray(group.frozen)
    block = max(1, group.block)
    per_block = group.size // block
    per_block_orders: list[np.ndarray] = []
    for b in range(block):
        idx = np.arange(b * per_block, (b + 1) * per_block)
        idx = idx[free[idx]]
        per_block_orders.append(idx[np.argsort(keys[idx], kind="stable")])
    cap = min(len(o) for o in per_block_orders)
    cap = min(cap, int(math.floor(max_ratio * per_block + 1e-9)), per_block - 1)
    cap = max(cap, 0)
    units = np.stack([o[:cap] for o in per_block_orders], axis=1) if cap else np.zeros((0, block), dtype=np.int64)
    unit_keys = keys[units].mean(axis=1) if cap else np.zeros(0)
    return _GroupOrder(group, units, unit_keys)


def _rounded_units(group: Group, n_units: int, multiple: int) -> int:
    """Fewest-removal adjustment so the kept count is a multiple of `multiple`."""
    block = max(1, group.block)
    while n_units > 0 and multiple > 1 and (group.size - n_units * block) % multiple:
        n_units -= 1
    return n_units


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Measured:
    """A plan and the fractions of the original it keeps."""

    plan: Plan
    macs: float
    params: float
    exact: bool  # measured on the materialised model (else: by the cost model)


class BudgetSearch:
    """Find the plan of a global order that meets a `Budget`; measure, then correct."""

    def __init__(self, ctx: Context, budget: Budget) -> None:
        self.ctx = ctx
        self.budget = budget
        self.cost = CostModel.build(ctx.trace, ctx.graph)
        before = validate.model_stats(ctx.model, ctx.input_shapes)
        self.base_macs = max(before.macs, 1)
        self.base_params = max(before.params, 1)
        #: measured minus modelled fraction, learned from the materialised candidates
        self.offset_macs = 0.0
        self.offset_params = 0.0

    # -- the cost model ----------------------------------------------------------------

    def modelled(self, plan: Plan) -> tuple[float, float]:
        saved_macs, saved_params = self.cost.savings(plan)
        return (
            1.0 - saved_macs / self.base_macs + self.offset_macs,
            1.0 - saved_params / self.base_params + self.offset_params,
        )

    def measure(self, plan: Plan) -> tuple[float, float, onnx.ModelProto]:
        ctx = self.ctx
        model = materialize(ctx.graph, ctx.model, ctx.trace, plan, ctx.opset)
        stats = validate.model_stats(model, ctx.input_shapes)
        return stats.macs / self.base_macs, stats.params / self.base_params, model

    def _at(self, ranking: Ranking, counts: Mapping[int, int], keys: Keys) -> Measured:
        plan = ranking.plan(self.ctx.trace, counts, keys)
        macs, params = self.modelled(plan)
        return Measured(plan, macs, params, False)

    def _dev(self, m: Measured) -> float:
        return self.budget.deviation(m.macs, m.params)

    def _select(self, ranking: Ranking, keys: Keys) -> Measured:
        """The plan closest to the budget by the cost model.

        Bisection finds the shortest prefix of the order that meets the budget. When its
        last step is coarse (a grouped conv's unit, a wide flattened channel) and jumps far
        past the target, the order is continued from the prefix before it, taking each
        further step that does not overshoot by more than `TOLERANCE` and closing the group
        of any step that does, until the budget is met.
        """

        def at(k: int) -> Measured:
            return self._at(ranking, ranking.counts(k), keys)

        lo, hi = 0, ranking.length
        first = at(lo)
        if self._dev(first) <= 0:
            return first
        last = at(hi)
        if self._dev(last) > 0:
            return last
        while hi - lo > 1:  # invariant: at(lo) misses the budget, at(hi) meets it
            mid = (lo + hi) // 2
            m = at(mid)
            if self._dev(m) <= 0:
                hi, last = mid, m
            else:
                lo = mid
        below = at(lo)
        best = min((below, last), key=lambda m: abs(self._dev(m)))
        if abs(self._dev(best)) <= TOLERANCE:
            return best
        counts, filled = self._fill(ranking, keys, lo, below)
        if abs(self._dev(filled)) > TOLERANCE:
            counts, filled = self._polish(ranking, keys, counts, filled)
        return min((best, filled), key=lambda m: abs(self._dev(m)))

    def _fill(self, ranking: Ranking, keys: Keys, start: int, current: Measured) -> tuple[dict[int, int], Measured]:
        counts = ranking.counts(start)
        closed: set[int] = set()
        for index in ranking.steps[start : start + MAX_FILL_STEPS].tolist():
            if index in closed:
                continue
            counts[index] += 1
            trial = self._at(ranking, counts, keys)
            if self._dev(trial) < -TOLERANCE:
                counts[index] -= 1
                closed.add(index)
                continue
            current = trial
            if self._dev(current) <= 0:
                break
        return counts, current

    def _polish(
        self, ranking: Ranking, keys: Keys, counts: dict[int, int], current: Measured
    ) -> tuple[dict[int, int], Measured]:
        """Last resort for coarse steps (grouped convs, --round-to): move single units in or out.

        Each move keeps every group's removals a prefix of its own order (one more unit, or
        the last one back); moves of two groups at once are tried when there are few groups.
        """
        moves: list[dict[int, int]] = []
        groups = list(ranking.orders)
        for g in groups:
            moves.extend(({g: 1}, {g: -1}))
        if len(groups) <= POLISH_PAIR_GROUPS:
            moves.extend({g: 1, h: -1} for g in groups for h in groups if g != h)
        for _ in range(POLISH_ROUNDS):
            best_counts, best = counts, current
            for move in moves:
                trial_counts = self._moved(ranking, counts, move)
                if trial_counts is None:
                    continue
                trial = self._at(ranking, trial_counts, keys)
                if abs(self._dev(trial)) < abs(self._dev(best)) - 1e-12:
                    best_counts, best = trial_counts, trial
            if best is current:
                break
            counts, current = best_counts, best
            if abs(self._dev(current)) <= TOLERANCE / 2:
                break
        return counts, current

    @staticmethod
    def _moved(ranking: Ranking, counts: Mapping[int, int], move: Mapping[int, int]) -> dict[int, int] | None:
        """`counts` with each group moved by whole effective units (round_to counted), or None."""
        out = dict(counts)
        for g, direction in move.items():
            order = ranking.orders[g]
            limit = len(order.units)
            n = out.get(g, 0)
            now = _rounded_units(order.group, n, ranking.multiples[g])
            while 0 <= n <= limit and _rounded_units(order.group, n, ranking.multiples[g]) == now:
                n += direction
            if not 0 <= n <= limit:
                return None
            out[g] = n
        return out

    def modelled_plan(self, ranking: Ranking, keys: Keys) -> Measured:
        """The plan meeting the budget by the cost model (with the offsets learned so far)."""
        return self._select(ranking, keys)

    def measured_plan(self, ranking: Ranking, keys: Keys, *, quiet: bool = False) -> tuple[Measured, list[str]]:
        """The plan meeting the budget on the materialised model, within `TOLERANCE` if reachable."""
        notes: list[str] = []
        best: Measured | None = None
        tried: set[frozenset[int]] = set()
        for _ in range(MAX_MEASUREMENTS):
            guess = self._select(ranking, keys)
            if guess.plan.pruned_classes in tried:
                break
            tried.add(guess.plan.pruned_classes)
            macs, params, _ = self.measure(guess.plan)
            self.offset_macs += macs - guess.macs
            self.offset_params += params - guess.params
            got = Measured(guess.plan, macs, params, True)
            if best is None or abs(self.budget.deviation(macs, params)) < abs(self.budget.deviation(best.macs, best.params)):
                best = got
            if abs(self.budget.deviation(macs, params)) <= TOLERANCE:
                break
        assert best is not None
        dev = self.budget.deviation(best.macs, best.params)
        full = self._at(ranking, {g: len(o.units) for g, o in ranking.orders.items()}, keys)
        if dev > TOLERANCE and self._dev(full) > 0:
            msg = (
                f"budget {self.budget.describe()} not reachable with --max-ratio {self.budget.max_ratio:g} and the "
                f"frozen channels: reached MACs {best.macs:.3f}, params {best.params:.3f}"
            )
            log.log(logging.DEBUG if quiet else logging.WARNING, msg)
            notes.append(msg)
        elif abs(dev) > TOLERANCE:
            msg = (
                f"budget {self.budget.describe()}: the channel steps are too coarse to land closer; "
                f"kept MACs {best.macs:.3f}, params {best.params:.3f}"
            )
            log.log(logging.DEBUG if quiet else logging.WARNING, msg)
            notes.append(msg)
        log.info("budget %s: MACs %.4f, params %.4f kept", self.budget.describe(), best.macs, best.params)
        return best, notes


def global_plan_with_notes(ctx: Context, scores: Mapping[int, np.ndarray], budget: Budget | None = None) -> tuple[Plan, list[str]]:
    """`global_plan`, also returning notes for the report (an unreachable budget, ...)."""
    budget = budget or Budget.from_params(ctx.params)
    keys = normalised_scores(ctx.trace, scores)
    ranking = Ranking.build(ctx.trace, keys, budget.max_ratio, ctx.options.round_to, part_caps(ctx))
    search = BudgetSearch(ctx, budget)
    best, notes = search.measured_plan(ranking, keys)
    notes.insert(0, f"global budget {budget.describe()}: kept MACs {best.macs:.3f}, params {best.params:.3f}")
    return best.plan, notes


def choose_plan(ctx: Context, scores: Mapping[int, np.ndarray]) -> Plan:
    """Uniform ratio per group (or the per-group `group_ratios`), or a global ranking under --target-macs / --target-params."""
    params = ctx.params
    if params.target_macs is not None or params.target_params is not None:
        plan, notes = global_plan_with_notes(ctx, scores)
        if params.budget_allocation == BudgetAllocation.DAMAGE.value:
            notes.append("--budget-allocation damage needs the statistics of a reconstruction method (thinet, cp, ldrf, "
                         "contrib, obs) and no per-group allocation: the budget is shared by the global ranking")
        ctx.notes.extend(notes)
        return plan
    per_group = dict(params.group_ratios) if params.group_ratios is not None else group_ratios(ctx)
    return uniform_plan(ctx.trace, scores, ctx.options.ratio, ctx.options.round_to, per_group)


def group_ratios(ctx: Context) -> dict[int, float] | None:
    """Per group, the ratio of its transformer part (``--heads`` / ``--ffn`` / ``--hidden``); None when none is set."""
    params = ctx.params
    if params.heads is None and params.ffn is None and params.hidden is None:
        return None
    return {g.index: params.part_ratio(transformer_part(ctx.trace.node_kind, g), ctx.options.ratio) for g in ctx.trace.groups}


def part_caps(ctx: Context) -> dict[int, float]:
    """Under a budget, an explicit ``--heads`` / ``--ffn`` / ``--hidden`` is the most each group of that part may lose
    (``--heads 0``: heads kept whole while the rest meets the target)."""
    caps: dict[int, float] = {}
    for group in ctx.trace.groups:
        cap = ctx.params.part_setting(transformer_part(ctx.trace.node_kind, group))
        if cap is not None:
            caps[group.index] = cap
    return caps


def global_plan(ctx: Context, scores: Mapping[int, np.ndarray]) -> Plan:
    """Remove the globally lowest normalised classes until --target-macs / --target-params is met."""
    plan, _ = global_plan_with_notes(ctx, scores)
    return plan


# ----------------------------------------------------------------------------- allocation by predicted damage


@dataclass(frozen=True, eq=False)
class GroupDamage:
    """The predicted damage of removing each prefix of one group's removal order (`datadriven.damage_table`).

    ``units[i]``: the class positions (in ``group.classes``) the i-th step removes, one per block of a grouped
    conv; ``damage[k]``: the damage when the first ``k`` units are removed (``damage[0] = 0``), in the common unit
    of `datadriven.damage_table` (the consumers' output error left after their least-squares refit, relative to
    their output energy), so that groups compare.
    """

    group: int
    units: np.ndarray  # [n, block]
    damage: np.ndarray  # [n + 1]


def allowed_units(group: Group, table: GroupDamage, max_ratio: float, min_width: float, cap: float | None = None) -> int:
    """Units of `table` a budget may remove: at most `max_ratio` (and the part's `cap`) of each block, and no more
    than leaves `min_width` of it, unless the damage of going further is negligible (`NEGLIGIBLE_DAMAGE`)."""
    per_block = group.size // max(1, group.block)
    n = min(len(table.units), per_block - 1, int(math.floor(min(max_ratio, cap if cap is not None else 1.0) * per_block + 1e-9)))
    floor_units = per_block - int(math.ceil(min_width * per_block - 1e-9))
    harmless = int(np.flatnonzero(table.damage[: n + 1] <= NEGLIGIBLE_DAMAGE).max(initial=0))
    return max(0, min(n, max(floor_units, harmless)))


def hull_slopes(saved: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """Per step ``1..n`` of a curve ``(saved[k], damage[k])`` (``k = 0..n``, saved increasing): the slope of the
    lower convex hull over the segment the step lies in (non-decreasing in ``k``).

    Taking steps across groups in order of these slopes is the greedy solution of the knapsack "least total damage
    for the cost saved", exact at the hull's vertices (the LP relaxation's optimum).
    """
    hull = [0]
    for k in range(1, saved.size):
        while len(hull) >= 2 and _slope(saved, damage, hull[-2], hull[-1]) >= _slope(saved, damage, hull[-1], k):
            hull.pop()
        hull.append(k)
    slopes = np.zeros(saved.size - 1)
    for a, b in zip(hull, hull[1:]):
        slopes[a:b] = _slope(saved, damage, a, b)
    return slopes


def _slope(saved: np.ndarray, damage: np.ndarray, a: int, b: int) -> float:
    return float(damage[b] - damage[a]) / max(float(saved[b] - saved[a]), 1e-30)


def damage_plan_with_notes(
    ctx: Context, damage: Mapping[int, GroupDamage], scores: Keys, budget: Budget | None = None
) -> tuple[Plan, list[str]]:
    """The plan meeting the budget with the least total predicted damage (module section "allocation by damage").

    Per group, the kept counts allowed by the rounding multiple (`_rounded_units`), `allowed_units` and the part
    caps are the points of its curve (MACs, or parameters with only ``--target-params``, saved by the cost model
    against predicted damage); each step of the group's removal order gets the slope of the curve's lower convex
    hull there, and one global order of those slopes goes through the same search as the ranking (`BudgetSearch`:
    cost model, bisection, measured correction). Groups without a damage table stay whole.
    """
    budget = budget or Budget.from_params(ctx.params)
    trace = ctx.trace
    rounding = Rounding.of(ctx.options.round_to)
    caps = part_caps(ctx)
    search = BudgetSearch(ctx, budget)
    which = 0 if budget.macs is not None else 1
    units: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for index, table in damage.items():
        group = trace.groups[index]
        multiple = rounding.classes(group, trace)
        n = allowed_units(group, table, budget.max_ratio, ctx.params.min_width, caps.get(index))
        points = [k for k in range(n + 1) if _rounded_units(group, k, multiple) == k]
        if len(points) < 2:
            continue
        saved = np.array([search.cost.savings(_prefix_plan(group, table.units[:k]))[which] for k in points])
        slopes = hull_slopes(saved, table.damage[points])
        keys = np.repeat(slopes, np.diff(points))
        units[index] = (table.units[: points[-1]], keys)
    ranking = Ranking.of_units(trace, units, rounding)
    best, notes = search.measured_plan(ranking, scores)
    widths = {gp.group: gp.kept for gp in best.plan.groups}
    predicted = sum(float(damage[g].damage[min((trace.groups[g].size - k) // max(1, trace.groups[g].block),
                                               damage[g].damage.size - 1)]) for g, k in widths.items() if g in damage)
    log.info("damage allocation: kept widths %s; predicted damage %.4g",
             {g: f"{k}/{trace.groups[g].size}" for g, k in sorted(widths.items())}, predicted)
    narrow = sorted(widths.items(), key=lambda gk: gk[1] / trace.groups[gk[0]].size)[:5]
    notes.insert(0, f"global budget {budget.describe()} by predicted damage: kept MACs {best.macs:.3f}, params "
                    f"{best.params:.3f}; narrowest groups {', '.join(f'{g}: {k}/{trace.groups[g].size}' for g, k in narrow)}")
    skipped = [g.index for g in trace.groups if not g.is_frozen and g.index not in damage]
    if skipped:
        notes.append(f"damage allocation: {len(skipped)} prunable group(s) without a refitted consumer kept whole")
    return best.plan, notes


def _prefix_plan(group: Group, removed: np.ndarray) -> Plan:
    pruned = tuple(group.classes[int(i)] for i in sorted(removed.ravel().tolist()))
    return Plan((GroupPlan(group.index, group.size, pruned),) if pruned else ())
