"""Global budgets (--target-macs / --target-params) and layer-compensated pruning (Chin et al. 2018).

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
is rounded up to a multiple of ``round_to``, and every traced tensor keeps a channel
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

Layer-compensated pruning (Chin, Ding, Zhang, Marculescu, "Layer-Compensated Pruning for
Resource-Constrained Convolutional Neural Networks", 2018). The global order is taken on

    k_c = a_g * s'_c + b_g

with one affine compensation ``(a_g > 0, b_g)`` per group, learned by regularised evolution
(Real et al., "Regularized Evolution for Image Classifier Architecture Search", AAAI 2019):
seeds (the plain ranking, offsets that reproduce a uniform ratio, and the latter with
coupled groups such as residual streams ranked later), then children of the best of ``S``
random members (tournament), one or two mutated genes each, and aging (the oldest member
dies). The fitness of a genome is the output error of the pruned model against the
original on a few calibration batches (for a classifier the top-1 disagreement plus
0.1 * KL of the softmax outputs, else the relative squared error; see `output_error`),
with the budget met for every candidate. The best genome ever evaluated is kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, validate
from ..channels import Group, Trace, transformer_part
from ..ops import lookup
from ..ops.registry import MAX_OPSET, NodeCost
from .materialize import materialize
from ..methods.base import CommonParams, Context, LcpParams, Outcome, get_method
from .plan import GroupPlan, Plan, keep_every_tensor_alive, uniform_plan
from .score import score_groups

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
#: weight of the KL divergence next to the top-1 disagreement in `output_error`
KL_WEIGHT = 0.1

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
            rule = lookup(None, node.op, MAX_OPSET)  # the cost of an op does not depend on its opset
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
    round_to: int

    @staticmethod
    def build(trace: Trace, keys: Keys, max_ratio: float, round_to: int = 1) -> Ranking:
        orders: dict[int, _GroupOrder] = {}
        entries: list[tuple[np.ndarray, int]] = []
        for group in trace.groups:
            if group.is_frozen or group.index not in keys:
                continue
            order = _group_order(group, np.asarray(keys[group.index], dtype=np.float64), max_ratio)
            if order.keys.size:
                orders[group.index] = order
                entries.append((order.keys, group.index))
        if not entries:
            return Ranking(orders, np.zeros(0, dtype=np.int64), round_to)
        all_keys = np.concatenate([k for k, _ in entries])
        groups = np.concatenate([np.full(k.size, g, dtype=np.int64) for k, g in entries])
        ranks = np.concatenate([np.arange(k.size) for k, _ in entries])
        steps = groups[np.lexsort((ranks, groups, all_keys))]
        return Ranking(orders, steps, round_to)

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
            n_units = _rounded_units(order.group, counts.get(index, 0), self.round_to)
            if n_units <= 0:
                continue
            removed = order.units[:n_units].ravel()
            pruned = tuple(order.group.classes[int(i)] for i in sorted(removed.tolist()))
            groups.append(GroupPlan(index, order.group.size, pruned))
        return keep_every_tensor_alive(trace, Plan(tuple(groups)), keys)


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


def _rounded_units(group: Group, n_units: int, round_to: int) -> int:
    """Fewest-removal adjustment so the kept count is a multiple of `round_to`."""
    block = max(1, group.block)
    while n_units > 0 and round_to > 1 and (group.size - n_units * block) % round_to:
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
            now = _rounded_units(order.group, n, ranking.round_to)
            while 0 <= n <= limit and _rounded_units(order.group, n, ranking.round_to) == now:
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
    ranking = Ranking.build(ctx.trace, keys, budget.max_ratio, ctx.options.round_to)
    search = BudgetSearch(ctx, budget)
    best, notes = search.measured_plan(ranking, keys)
    notes.insert(0, f"global budget {budget.describe()}: kept MACs {best.macs:.3f}, params {best.params:.3f}")
    return best.plan, notes


def choose_plan(ctx: Context, scores: Mapping[int, np.ndarray]) -> Plan:
    """Uniform ratio per group, or a global ranking under --target-macs / --target-params."""
    params = ctx.params
    if params.target_macs is not None or params.target_params is not None:
        plan, notes = global_plan_with_notes(ctx, scores)
        ctx.notes.extend(notes)
        return plan
    return uniform_plan(ctx.trace, scores, ctx.options.ratio, ctx.options.round_to, group_ratios(ctx))


def group_ratios(ctx: Context) -> dict[int, float] | None:
    """Per group, the ratio of its transformer part (``--heads`` / ``--ffn`` / ``--hidden``); None when none is set."""
    params = ctx.params
    if params.heads is None and params.ffn is None and params.hidden is None:
        return None
    return {g.index: params.part_ratio(transformer_part(ctx.trace.node_kind, g), ctx.options.ratio) for g in ctx.trace.groups}


def global_plan(ctx: Context, scores: Mapping[int, np.ndarray]) -> Plan:
    """Remove the globally lowest normalised classes until --target-macs / --target-params is met."""
    plan, _ = global_plan_with_notes(ctx, scores)
    return plan


# ----------------------------------------------------------------------------- output error


def output_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Mean over float outputs of the error of `outputs` against `reference` (0: identical).

    A classifier's [N, C>1] output: the top-1 disagreement with the reference plus
    ``KL_WEIGHT * KL(softmax(y0) || softmax(y))`` (the KL term orders candidates that flip no
    prediction; alone it would reward a collapsed model for flat, uninformed outputs).
    Any other output: the relative squared error ``|y - y0|^2 / |y0|^2``.
    """
    errors: list[float] = []
    for y0, y in zip(reference, outputs):
        if not np.issubdtype(y0.dtype, np.floating):
            continue
        a, b = y0.astype(np.float64), y.astype(np.float64)
        if a.ndim == 2 and a.shape[1] > 1:
            la = a - a.max(axis=1, keepdims=True)
            la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
            lb = b - b.max(axis=1, keepdims=True)
            lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
            kl = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=1)))
            flips = float(np.mean(np.argmax(a, axis=1) != np.argmax(b, axis=1)))
            errors.append(flips + KL_WEIGHT * kl)
        else:
            denom = float(np.sum(a * a))
            errors.append(float(np.sum((a - b) ** 2) / denom) if denom > 0 else float(np.sum((a - b) ** 2)))
    return float(np.mean(errors)) if errors else 0.0


def evaluation_feeds(
    model: onnx.ModelProto,
    calibration: object,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    samples: int,
    batch_size: int,
    seed: int,
) -> tuple[list[dict[str, np.ndarray]], bool]:
    """A few batches to compare models on: calibration data, or seeded random inputs.

    Returns the feeds and whether they are random (data-free). A model with a static
    batch dimension gets batches of exactly that size.
    """
    static = ir.static_batch(model)
    size = static or max(1, min(batch_size, samples))
    feeds: list[dict[str, np.ndarray]] = []
    if calibration is not None and not getattr(calibration, "is_random", False):
        taken = 0
        for batch in calibration.iter_batches(size, drop_last=static is not None):  # type: ignore[attr-defined]
            feeds.append(batch)
            taken += len(next(iter(batch.values())))
            if taken >= samples:
                break
        if feeds:
            return feeds, False
    count = max(1, math.ceil(min(samples, 64) / size))
    shapes = {name: (size, *shape[1:]) if shape else shape for name, shape in input_shapes.items()}
    for i in range(count):
        feeds.append(validate.random_inputs(model, shapes, seed + i))
    return feeds, True


class OutputError:
    """Output error of candidate models against the original on fixed feeds."""

    def __init__(self, original: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        sess = validate.session(original)
        self.reference = [sess.run(None, feed) for feed in feeds]

    def __call__(self, model: onnx.ModelProto) -> float:
        sess = validate.session(model)
        errors = [output_error(ref, sess.run(None, feed)) for ref, feed in zip(self.reference, self.feeds)]
        return float(np.mean(errors))


# ----------------------------------------------------------------------------- LCP


@dataclass(frozen=True)
class Genome:
    """Per-group compensation: key = exp(log_a) * s' + b, over `LcpSearch.groups` in order."""

    log_a: tuple[float, ...]
    b: tuple[float, ...]


@dataclass(frozen=True)
class _Member:
    genome: Genome
    error: float


class LcpSearch:
    """Regularised evolution of per-group affine compensations (see the module docstring)."""

    def __init__(self, ctx: Context, budget: Budget, scores: Mapping[int, np.ndarray], error: Callable[[onnx.ModelProto], float]) -> None:
        self.ctx = ctx
        self.budget = budget
        self.base = normalised_scores(ctx.trace, scores)
        self.groups = tuple(sorted(self.base))
        self.search = BudgetSearch(ctx, budget)
        self.error = error
        self.cache: dict[frozenset[int], float] = {}
        self.evaluations = 0

    def keys(self, genome: Genome) -> dict[int, np.ndarray]:
        return {g: math.exp(a) * self.base[g] + b for g, a, b in zip(self.groups, genome.log_a, genome.b)}

    def plan(self, genome: Genome) -> Plan:
        keys = self.keys(genome)
        ranking = Ranking.build(self.ctx.trace, keys, self.budget.max_ratio, self.ctx.options.round_to)
        return self.search.modelled_plan(ranking, keys).plan

    def fitness(self, genome: Genome) -> float:
        plan = self.plan(genome)
        key = plan.pruned_classes
        if key not in self.cache:
            ctx = self.ctx
            model = materialize(ctx.graph, ctx.model, ctx.trace, plan, ctx.opset)
            value = self.error(model)
            self.cache[key] = value if math.isfinite(value) else math.inf
            self.evaluations += 1
        return self.cache[key]

    def calibrate(self) -> None:
        """Learn the cost model's offset from one measured plan (the uncompensated ranking)."""
        zeros = tuple(0.0 for _ in self.groups)
        keys = self.keys(Genome(zeros, zeros))
        ranking = Ranking.build(self.ctx.trace, keys, self.budget.max_ratio, self.ctx.options.round_to)
        self.search.measured_plan(ranking, keys, quiet=True)  # an intermediate plan: its misses are not the result's

    def uniform_genome(self) -> Genome:
        """Offsets that align every group at one removal fraction: a near-uniform plan at the budget."""
        trace = self.ctx.trace
        lo, hi = 0.0, 1.0
        for _ in range(20):
            r = (lo + hi) / 2
            genome = self._aligned(r)
            keys = self.keys(genome)
            ranking = Ranking.build(trace, keys, self.budget.max_ratio, self.ctx.options.round_to)
            plan = ranking.plan(trace, {g: int((o.keys < 0).sum()) for g, o in ranking.orders.items()}, keys)
            macs, params = self.search.modelled(plan)
            if self.budget.deviation(macs, params) <= 0:
                hi = r
            else:
                lo = r
        return self._aligned(hi)

    def protect_coupled(self, genome: Genome, offset: float = 1.0) -> Genome:
        """`genome` with coupled groups (several sources, e.g. a residual stream) ranked later:
        one of their classes is a channel of every member layer at once."""
        groups = {g.index: g for g in self.ctx.trace.groups}
        b = tuple(v + (offset if len(groups[g].spaces) > 1 else 0.0) for g, v in zip(self.groups, genome.b))
        return Genome(genome.log_a, b)

    def _aligned(self, r: float) -> Genome:
        b: list[float] = []
        groups = {g.index: g for g in self.ctx.trace.groups}
        for g in self.groups:
            s = self.base[g]
            free = s[~np.asarray(groups[g].frozen)]
            ordered = np.sort(free)
            n = int(math.floor(r * groups[g].size + 1e-9))
            if n <= 0:
                b.append(-(ordered[0] - 1e-6) if ordered.size else 0.0)
            elif n >= ordered.size:
                b.append(-(ordered[-1] + 1e-6))
            else:
                b.append(-0.5 * (ordered[n - 1] + ordered[n]))
        return Genome(tuple(0.0 for _ in self.groups), tuple(b))

    def mutate(self, genome: Genome, rng: np.random.Generator) -> Genome:
        log_a, b = list(genome.log_a), list(genome.b)
        for _ in range(1 + int(rng.integers(0, 2))):
            i = int(rng.integers(0, len(self.groups)))
            if rng.random() < 0.5:
                log_a[i] += float(rng.normal(0.0, 0.3))
            else:
                b[i] += float(rng.normal(0.0, 0.15))
        return Genome(tuple(log_a), tuple(b))

    def run(self, iterations: int, population: int, tournament: int, seed: int) -> tuple[Genome, float]:
        rng = np.random.default_rng([seed, 2018])
        zeros = tuple(0.0 for _ in self.groups)
        uniform = self.uniform_genome()
        seeds = [Genome(zeros, zeros), uniform, self.protect_coupled(uniform)]
        members: deque[_Member] = deque()
        best: _Member | None = None
        done = 0

        def add(genome: Genome) -> None:
            nonlocal best, done
            member = _Member(genome, self.fitness(genome))
            members.append(member)
            if best is None or member.error < best.error:
                best = member
            done += 1
            if self.ctx.progress is not None:
                self.ctx.progress(done, iterations)

        for genome in seeds[: max(1, iterations)]:
            add(genome)
        while len(members) < min(population, iterations):
            parent = seeds[len(members) % len(seeds)]
            add(self.mutate(parent, rng))
        while done < iterations:
            size = min(tournament, len(members))
            picks = rng.choice(len(members), size=size, replace=False)
            winner = min((members[int(i)] for i in picks), key=lambda m: m.error)
            add(self.mutate(winner.genome, rng))
            if len(members) > population:
                members.popleft()  # aging: the oldest dies, however good
        assert best is not None
        return best.genome, best.error


def lcp(ctx: Context) -> Outcome:
    """Layer-compensated pruning: a global ranking with per-group affine compensation, evolved."""
    started = time.perf_counter()
    params = ctx.params
    assert isinstance(params, LcpParams)
    default_macs = get_method(ctx.options.method).default_macs
    budget = Budget.from_params(params, default_macs=None if default_macs is None else default_macs(ctx.options.ratio))
    iterations, population = params.lcp_iterations, params.lcp_population
    tournament, samples = params.lcp_tournament, params.lcp_samples
    scores = score_groups(ctx.trace, ctx.graph, ctx.options.criterion, ctx.options.seed)
    notes: list[str] = []
    if not scores:
        return Outcome(Plan(()), notes=("lcp: no prunable group",))
    feeds, random_data = evaluation_feeds(
        ctx.model, ctx.calibration, ctx.input_shapes, samples=samples, batch_size=ctx.options.batch_size,
        seed=ctx.options.seed,
    )
    if random_data:
        msg = "lcp: no calibration data; the output error was measured on seeded random inputs (data-free)"
        log.warning(msg)
        notes.append(msg)
    search = LcpSearch(ctx, budget, scores, OutputError(ctx.model, feeds))
    search.calibrate()
    genome, error = search.run(iterations, population, tournament, ctx.options.seed)
    keys = search.keys(genome)
    ranking = Ranking.build(ctx.trace, keys, budget.max_ratio, ctx.options.round_to)
    final, budget_notes = search.search.measured_plan(ranking, keys)
    notes.extend(budget_notes)
    seconds = time.perf_counter() - started
    notes.append(
        f"lcp: {iterations} iterations ({search.evaluations} distinct plans evaluated) in {seconds:.1f} s; "
        f"output error {max(error, 0.0):.4g}; kept MACs {final.macs:.3f}, params {final.params:.3f}"  # KL rounds below 0
    )
    return Outcome(final.plan, notes=tuple(notes))

