"""Layer-compensated pruning (Chin, Ding, Zhang, Marculescu, "Layer-Compensated Pruning for
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..judge.evaluation import OutputError, evaluation_feeds
from ..analysis.materialize import materialize
from ..analysis.plan import Plan
from .budget import Budget, BudgetSearch, Ranking, normalised_scores
from ..analysis.score import score_groups
from .base import Context, LcpParams, MethodOutcome, get_method

log = logging.getLogger(__name__)




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


def lcp(ctx: Context) -> MethodOutcome:
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
        return MethodOutcome(Plan(()), notes=("lcp: no prunable group",))
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
    return MethodOutcome(final.plan, notes=tuple(notes))

