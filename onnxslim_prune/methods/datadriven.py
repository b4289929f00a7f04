"""Data-driven channel selection by reconstruction: ThiNet, Channel Pruning (LASSO), LDRF, and the helpers the data-driven methods share.

All statistics come from calibration data streamed through the ORIGINAL model (one batch
in memory at a time) and are cached on disk (``calib.cached``, keyed by the model digest and
the calibration fingerprint). Selection is per channel group (``Trace.groups``); the plan is
made by ``methods.choose_plan`` (uniform ratio, or a global budget).

Reconstruction-based criteria work on the consumers ``C`` of a group (Conv with group 1,
Gemm, MatMul), written on rows as ``Y = X W``. With the centred input covariance
``S = cov(X)`` (im2col rows at sampled positions for a Conv) and the columns of ``X`` that
belong to class ``a`` of the group, the output energy carried by a set ``T`` of classes is::

    E(T) = || sum_{a in T} X_a W_a ||^2 / n = sum_{a, b in T} M[a, b],
    M = sum_C  P_C^T (S_C o W_C W_C^T) P_C           (o: elementwise; P_C: column -> class)

Only the output channels of ``C`` that its own group keeps are counted (groups are decided
downstream first).

* ``thinet`` (Luo, Wu, Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
  Compression", ICCV 2017): greedily grow the removed set ``T`` by the class that adds the
  least ``E``: ``argmin_c M[c, c] + 2 sum_{t in T} M[c, t]`` (their Algorithm 1 on Gram
  statistics), then least-squares reconstruction (``reconstruct``).
* ``cp`` (He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks",
  ICCV 2017): LASSO on per-class coefficients with normalised contributions,
  ``min_b 1/2 b^T Mn b - q^T b + lam |b|_1`` with ``Mn = D^-1/2 M D^-1/2``, ``q = Mn D^1/2 1``,
  ``lam`` bisected until the kept count is met (FISTA), then least squares.
* ``ldrf`` (Chen et al., "Layer Decomposition-Recomposition Framework for Neuron Pruning
  towards Accurate Lightweight Networks", AAAI 2019): each consumer is decomposed as
  ``W = W U U^T`` with ``U`` the principal subspace of its output (``energy`` of the
  variance); classes are kept greedily by how much of that embedding they explain by least
  squares given the classes already kept, ``gain(a) = tr(C_a^T R_aa^-1 C_a)`` with the
  residual covariances ``R = S - S_.K S_KK^-1 S_K.`` and ``C = (S - S_.K S_KK^-1 S_K.) W U``
  (forward selection, block Gram-Schmidt updates); the embedding is then solved from the
  surviving channels of the pruned network and recomposed into the consumer
  (``reconstruct`` with ``mode="ldrf"``).
NISP is `methods.nisp`, the activation criteria (``mean_act``, ``apoz``) `methods.activation`.

Every statistic is a `calib.statistic.Statistic` (``ActivationMoments``, ``SampledGrams``,
``PooledCovariance``) collected and cached by `calib.statistic.collect` under one key scheme.
Gram statistics for selection use float32 batch products over buffered rows (totals in
float64); the least-squares refit itself (``reconstruct``) stays in float64.

Groups for which a criterion has no statistic (no supported consumer, no activation)
fall back to ``l1`` with a note.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import Group, Kind, TransformerPart, Role, Trace, transformer_part
from ..calib.engine import FrontierStore
from ..calib.threads import blas_limited
from ..calib.memory import calibration_budget, explicit_budget
from ..calib.statistic import ActivationMoments, RowSampler, RowWeights, SampledGrams, Statistic, collect, collect_staged
from ..errors import CalibrationError
from . import reconstruct as rc
from .base import BudgetAllocation, Context, DepthGain, MethodOutcome
from . import depthgain
from .budget import GroupDamage, _group_order, choose_plan, damage_plan_with_notes
from ..analysis.plan import removed_count
from ..roundto import Rounding
from ..analysis.score import l1

log = logging.getLogger(__name__)

#: layer name -> (input covariance, input mean) of a consumer
Covariances = Mapping[str, tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- helpers


def need_calibration(ctx: Context, method: str) -> None:
    if ctx.calibration is None:
        raise CalibrationError(f"method {method!r} needs calibration data: pass --calib PATH (or --calib random)")


def settings(ctx: Context, mode: str = "ls") -> rc.Settings:
    return rc.Settings.from_params(ctx.params, ctx.options.batch_size, ctx.options.seed, mode)


def per_class(trace: Trace, group: Group, tensor: str, values: np.ndarray, *, mean: bool = True) -> np.ndarray:
    """Mean (or sum) of per-position `values` of `tensor` over the positions of each class of `group`."""
    roots = trace.class_positions(tensor)
    assert roots is not None
    index = {c: i for i, c in enumerate(group.classes)}
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    for root, v in zip(roots.tolist(), np.asarray(values, dtype=np.float64).tolist()):
        i = index.get(root)
        if i is not None:
            total[i] += v
            count[i] += 1
    if not mean:
        return total
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def with_fallback(ctx: Context, scores: dict[int, np.ndarray], name: str) -> tuple[dict[int, np.ndarray], list[str]]:
    """l1 scores for prunable groups the criterion could not score."""
    notes = []
    for group in ctx.trace.groups:
        if group.is_frozen or group.index in scores:
            continue
        scores[group.index] = l1(ctx.trace, ctx.graph, group, ctx.options.seed)
        notes.append(f"{name}: group {group.index} has no statistic; scored by l1")
    if len(notes) > 3:
        notes = [*notes[:3], f"{name}: ... {len(notes) - 3} more groups scored by l1"]
    return scores, notes


def removal_count(ctx: Context, group: Group) -> int:
    """Classes the uniform ratio (its transformer part's, or the group's `group_ratios` share) removes from `group`
    (as ``plan.uniform_plan`` counts them)."""
    allocation = ctx.params.group_ratios
    if allocation is not None:
        ratio = dict(allocation).get(group.index, 0.0)
    else:
        ratio = ctx.params.part_ratio(transformer_part(ctx.trace.node_kind, group), ctx.options.ratio)
    if ratio <= 0:
        return 0
    return removed_count(group, ratio, Rounding.of(ctx.options.round_to).classes(group, ctx.trace))


def kept_whole(ctx: Context, group: Group) -> bool:
    """Whether no plan can remove a class of `group`: its `group_ratios` share is 0, or its transformer part is
    given 0 (``--heads 0``: the uniform ratio of the part, and under a budget the most it may lose, `budget.part_caps`)."""
    allocation = ctx.params.group_ratios
    if allocation is not None:
        return dict(allocation).get(group.index, 0.0) <= 0
    setting = ctx.params.part_setting(transformer_part(ctx.trace.node_kind, group))
    return setting is not None and setting <= 0


def _source_order(ctx: Context) -> list[Group]:
    """Prunable groups, downstream first (by the position of their last source node)."""
    position = {n.name: i for i, n in enumerate(ctx.graph.nodes)}
    last: dict[int, int] = {}
    for source in ctx.trace.sources:
        g = ctx.trace.class_group.get(int(ctx.trace.roots[ctx.trace.space_atoms[source.space][0]]))
        if g is not None:
            last[g] = max(last.get(g, -1), position.get(source.node, -1))
    groups = [g for g in ctx.trace.groups if not g.is_frozen]
    return sorted(groups, key=lambda g: -last.get(g.index, -1))


# ----------------------------------------------------------------------------- consumer statistics


@dataclass(frozen=True, eq=False)
class Consumer:
    """A consumer of a group: its layer, weights as ``[D, Cout]`` and column -> class roots."""

    layer: rc.Layer
    node: gs.Node
    kind: Kind
    column_roots: np.ndarray  # [D]

    @property
    def w(self) -> np.ndarray:
        """The weights ``[D, Cout]`` in float64, read from the graph when asked: held for every consumer at once
        they would be twice the model's weights (SmolLM2-135M: 1 GB for the whole selection)."""
        affine = rc.read_affine(self.node, self.kind)
        assert affine is not None
        return affine.w


def group_consumers(ctx: Context) -> dict[int, list[Consumer]]:
    """For each prunable group, its refittable consumers (role "in": Conv group 1, Gemm, MatMul)."""
    nodes = ir.node_by_name(ctx.graph)
    found: dict[int, list[Consumer]] = defaultdict(list)
    seen: dict[str, Consumer] = {}
    for group in ctx.trace.groups:
        if group.is_frozen:
            continue
        for m in dict.fromkeys(m for m in group.members if m.role == Role.IN):
            kind = ctx.trace.node_kind.get(m.node)
            if kind not in rc.FITTED_KINDS or m.node not in nodes:
                continue
            if m.node not in seen:
                layer = rc.layer_of(nodes[m.node], kind)
                roots = ctx.trace.class_positions(nodes[m.node].inputs[0].name)
                if layer is None or roots is None:
                    continue
                if rc.read_affine(nodes[m.node], kind).w.shape[0] != roots.size * layer.taps:
                    continue
                seen[m.node] = Consumer(layer, nodes[m.node], kind, np.repeat(roots, layer.taps))
            found[group.index].append(seen[m.node])
    return dict(found)


def _layer_key(layer: rc.Layer) -> str:
    return f"{layer.x}|{layer.kernel}|{layer.strides}|{layer.pads}|{layer.dilations}|{layer.auto_pad}"


def layer_covariance(cov: Covariances, layer: rc.Layer) -> tuple[np.ndarray, np.ndarray]:
    """`layer`'s ``(S, mean)`` in the result of `input_covariances` (layers of one input and geometry share it)."""
    return cov[_layer_key(layer)]


#: the covariances `input_covariances` returns hold at most 1 / COVARIANCE_SHARE of the budget in memory (the rest
#: wait in files), and its pass's frontier 1 / STAGED_FRONTIER_SHARE: with a chunk's Gram matrices and one batch's
#: exposed inputs (a quarter each of an explicit ``--calib-memory``) they add up to it
COVARIANCE_SHARE = 4
STAGED_FRONTIER_SHARE = 4
#: the label of the covariances' `FrontierStore` (its log lines say it)
COVARIANCE_LABEL = "selection covariances"


class CovarianceStore(Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """``layer key -> (S, mean)`` in a `calib.engine.FrontierStore` of one batch: in memory up to `budget` bytes,
    beyond it in ``.npy`` files, read back at each look-up (a selection reads each a few times). SmolLM2-135M's 121
    layers have 0.8 GB of float64 covariances, which a ``--calib-memory 1G`` run cannot hold beside its model. The
    files go when the store is collected, or at exit (Ctrl-C)."""

    def __init__(self, budget: int, order: Sequence[str]) -> None:
        self._order = list(order)  # iteration follows the network, whatever order the passes filled it in
        self._keys: set[str] = set()
        self._store = FrontierStore(budget, COVARIANCE_LABEL)
        weakref.finalize(self, self._store.close)

    @property
    def spilled(self) -> bool:
        return self._store.spilled

    def put(self, key: str, value: tuple[np.ndarray, np.ndarray]) -> None:
        self._store.put(0, dict(zip(_parts(key), value)))
        self._keys.add(key)

    def __getitem__(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._keys:
            raise KeyError(key)
        s_name, mean_name = _parts(key)
        got = self._store.get(0, [s_name, mean_name])
        return got[s_name], got[mean_name]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._order if k in self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


def _parts(key: str) -> tuple[str, str]:
    return f"{key}\0S", f"{key}\0mean"


@dataclass
class RowInfo:
    """What `input_covariances` learned of each layer key's rows besides the covariance."""

    rows: dict[str, int]
    mean_weight: dict[str, float]
    norm_energy: dict[str, np.ndarray]
    weights: dict[str, RowWeights]


def input_covariances(ctx: Context, layers: Sequence[rc.Layer], budget: int | None = None,
                      info: RowInfo | None = None) -> CovarianceStore:
    """``_layer_key -> (S centred covariance [D, D], mean [D])`` of each layer's input rows (`info`, when given,
    receives per ``_layer_key`` the rows summed and what their weights say, `RowInfo`).

    Layers sharing an input and geometry share one Gram matrix; layers are collected in
    chunks of at most `budget` bytes of Gram matrices (default `rc.DEFAULT_GRAM_BUDGET`, or a quarter of
    an explicit ``--calib-memory``) whose inputs take at most `rc.DEFAULT_EXPOSED_BUDGET` bytes per
    batch (or a quarter of an explicit ``--calib-memory``; onnxruntime holds every exposed tensor of a
    batch at once, so all of a deep network's inputs at a large batch would dominate the peak), one
    `SampledGrams` statistic and one stage of one calibration pass per chunk (`calib.statistic.collect_staged`).
    The result holds a quarter of the budget in memory (`CovarianceStore`): the rest is read back from files.
    """
    given = explicit_budget()
    if budget is None:
        budget = rc.DEFAULT_GRAM_BUDGET if given is None else min(rc.DEFAULT_GRAM_BUDGET, given // 4)
    exposed_budget = rc.DEFAULT_EXPOSED_BUDGET if given is None else min(rc.DEFAULT_EXPOSED_BUDGET, given // 4)
    s = settings(ctx)
    unique: dict[str, rc.Layer] = {}
    for layer in layers:
        unique.setdefault(_layer_key(layer), layer)
    # chunks follow the graph's (topological) node order: the stages of one pass go from the input to the output
    produced_at = {t: i for i, node in enumerate(ctx.model.graph.node) for t in node.output}
    chunks: list[list[str]] = [[]]
    used = 0
    exposed: set[str] = set()
    for key in sorted(unique, key=lambda k: produced_at.get(unique[k].x, -1)):
        layer = unique[key]
        size = _dims(ctx, layer) ** 2 * 8
        batch_bytes = _batch_bytes(ctx, exposed | {layer.x}, s.batch_size)
        if chunks[-1] and (used + size > budget or batch_bytes > exposed_budget):
            chunks.append([])
            used = 0
            exposed = set()
        chunks[-1].append(key)
        used += size
        exposed.add(layer.x)
    if len(chunks) > 1:
        log.info("selection statistics: %d layers in %d stages of one pass (Gram matrices within %d MiB, one batch's "
                 "inputs within %d MiB)", len(unique), len(chunks), budget >> 20, exposed_budget >> 20)

    def sampler(layer: rc.Layer) -> RowSampler:
        return lambda x, rng: layer.x_rows(x, layer.positions(x.shape, s.positions, rng))

    out = CovarianceStore((given if given is not None else calibration_budget()) // COVARIANCE_SHARE, list(unique))
    # the damage allocation compares errors after the norms; a ranking within a group only needs real tokens
    # (measured on all-MiniLM-L6-v2 at 85% of the MACs: obs on 1 / sigma^2-weighted rows lost 2 points of NN)
    by_norm = by_damage(ctx)
    stats: list[SampledGrams] = []
    weights_of: dict[int, dict[str, RowWeights]] = {}
    for c, chunk in enumerate(chunks):
        if not chunk:
            continue
        weights = {k: w for k in chunk if (w := row_weights(ctx, unique[k], norm=by_norm)) is not None}
        stats.append(SampledGrams([(k, unique[k].x, _dims(ctx, unique[k]), sampler(unique[k])) for k in chunk],
                                  seed=s.seed, chunk=c, settings=f"P={s.positions}", weights=weights))
        weights_of[c] = weights

    def take(stat: Statistic) -> None:  # a chunk's totals become covariances one at a time, before the next stage
        assert isinstance(stat, SampledGrams)
        for key, value in stat.take_covariances().items():
            out.put(key, value)
        if info is not None:
            info.rows.update(stat.rows)
            info.mean_weight.update(stat.mean_weight)
            info.norm_energy.update(stat.norm_energy)
            info.weights.update(weights_of[stat.chunk])

    # one pass over the data, a stage per chunk (`collect_staged`): only one chunk's Gram matrices are accumulated
    # at a time, and each node runs once (a pass per chunk from the graph input ran SmolLM2-135M's first layers 13
    # times)
    collect_staged(ctx.model, ctx.calibration, stats, s.batch_size, done=take, progress=ctx.progress,
                   budget=(given if given is not None else calibration_budget()) // STAGED_FRONTIER_SHARE)
    return out


def row_weights(ctx: Context, layer: rc.Layer, norm: bool = True) -> RowWeights | None:
    """How the rows of a sequence layer (input ``[N, T, D]``) count (`RowWeights`): padding tokens not at all, and
    with `norm` and a LayerNormalization after the residual sum its output is added into, each token by
    ``1 / sigma_t^2`` (the statistics of a budget shared by damage; `input_covariances`)."""
    if ctx.params.token_weights is False or layer.spatial:
        return None
    shape = ctx.trace.shapes.get(layer.x)
    if not shape or len(shape) != 3:
        return None
    mask = ir.token_mask_input(ctx.model)
    sink = sink_of(ctx, layer)
    stream = sink.tensor if norm and sink is not None and sink.weights is not None else None
    if mask is None and stream is None:
        return None
    return RowWeights(mask, stream)


def _batch_bytes(ctx: Context, tensors: set[str], batch_size: int) -> int:
    """Bytes of one batch of `tensors` (float32 where the dtype is not known; unknown shapes count 0)."""
    total = 0
    for name in tensors:
        shape = ctx.trace.shapes.get(name)
        if shape:
            total += batch_size * int(np.prod(shape[1:], dtype=np.int64)) * 4
    return total


def _dims(ctx: Context, layer: rc.Layer) -> int:
    shape = ctx.trace.shapes.get(layer.x)
    cmap = ctx.trace.maps.get(layer.x)
    channels = cmap.size if cmap is not None else (int(shape[-1 if layer.kind != Kind.CONV else 1]) if shape else 1)
    return channels * layer.taps


def _kept_outputs(ctx: Context, layer: rc.Layer, removed: set[int]) -> np.ndarray | None:
    roots = ctx.trace.class_positions(layer.y)
    if roots is None or not removed:
        return None
    keep = np.array([r not in removed for r in roots.tolist()])
    return None if keep.all() else np.flatnonzero(keep)


def _class_map(group: Group, column_roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(columns of the group, their class index in `group.classes`)."""
    index = {c: i for i, c in enumerate(group.classes)}
    cls = np.array([index.get(int(r), -1) for r in column_roots.tolist()])
    cols = np.flatnonzero(cls >= 0)
    return cols, cls[cols]


def _block_sum(matrix: np.ndarray, cls: np.ndarray, size: int) -> np.ndarray:
    """``P^T matrix P`` with ``P[i, cls[i]] = 1``."""
    p = np.zeros((cls.size, size))
    p[np.arange(cls.size), cls] = 1.0
    return p.T @ matrix @ p


def _energy_matrix(
    ctx: Context, group: Group, consumers: Sequence[Consumer], cov: Mapping[str, tuple[np.ndarray, np.ndarray]],
    removed: set[int], energy: float | None = None,
) -> np.ndarray:
    """``M`` of the module docstring (optionally with ``W U U^T`` in place of ``W``)."""
    m = np.zeros((group.size, group.size))
    for consumer in consumers:
        s, _ = cov[_layer_key(consumer.layer)]
        w = consumer.w
        keep = _kept_outputs(ctx, consumer.layer, removed)
        if keep is not None:
            w = w[:, keep]
        if energy is not None:
            w = w @ rc.principal_projector(w.T @ s @ w, energy)
        cols, cls = _class_map(group, consumer.column_roots)
        m += _block_sum(s[np.ix_(cols, cols)] * (w[cols] @ w[cols].T), cls, group.size)
    return m


# ----------------------------------------------------------------------------- selection rules


def thinet_scores(m: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Greedy removal order under ``E(T)``; score = energy removed so far / total (low = first)."""
    n = m.shape[0]
    scores = np.full(n, np.inf)
    total = max(float(np.trace(m)), 1e-30)
    gain = np.diag(m).copy()
    value = 0.0
    left = set(np.flatnonzero(free).tolist())
    while left:
        candidates = np.fromiter(left, dtype=np.int64)
        best = int(candidates[np.argmin(gain[candidates])])
        value += float(gain[best])
        scores[best] = max(value, 0.0) / total
        gain += 2.0 * m[:, best]
        left.discard(best)
    finite = scores[np.isfinite(scores)]
    scores[~np.isfinite(scores)] = (finite.max() if finite.size else 0.0) + 1.0
    # strictly increasing with the removal order, even when energies tie
    order = np.argsort(scores, kind="stable")
    ranked = np.empty(n)
    ranked[order] = np.maximum.accumulate(scores[order]) + np.arange(n) * 1e-12
    return ranked


def _fista(mn: np.ndarray, q: np.ndarray, lam: np.ndarray, start: np.ndarray, iters: int = 400) -> np.ndarray:
    step = 1.0 / max(float(np.linalg.eigvalsh(mn)[-1]), 1e-12)
    beta, z, t = start.copy(), start.copy(), 1.0
    for _ in range(iters):
        grad = mn @ z - q
        nxt = z - step * grad
        nxt = np.sign(nxt) * np.maximum(np.abs(nxt) - step * lam, 0.0)
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = nxt + ((t - 1.0) / t_next) * (nxt - beta)
        if np.max(np.abs(nxt - beta)) < 1e-10:
            beta = nxt
            break
        beta, t = nxt, t_next
    return beta


def lasso_scores(m: np.ndarray, free: np.ndarray, n_remove: int) -> np.ndarray:
    """CP's LASSO: ``|beta|`` at the penalty whose support keeps ``size - n_remove`` classes."""
    d = np.sqrt(np.clip(np.diag(m), 0.0, None))
    alive = d > 1e-12 * max(float(d.max(initial=0.0)), 1e-30)
    scale = np.where(alive, d, 1.0)
    mn = m / np.outer(scale, scale)
    mn[~alive, :] = 0.0
    mn[:, ~alive] = 0.0
    mn[np.flatnonzero(~alive), np.flatnonzero(~alive)] = 1.0
    q = mn @ np.where(alive, d, 0.0)
    target = int(free.sum()) - n_remove  # free classes to keep
    greedy = thinet_scores(m, free)
    if n_remove <= 0 or target <= 0:
        return greedy
    lam_max = float(np.max(np.abs(q[free]))) if free.any() else 0.0
    if lam_max <= 0:
        return greedy
    lo, hi = -8.0, 0.0  # log10(lam / lam_max)
    beta = np.where(alive, d, 0.0)
    best = beta
    for _ in range(30):
        mid = (lo + hi) / 2
        lam = np.where(free, lam_max * 10.0**mid, 0.0)
        beta = _fista(mn, q, lam, beta)
        nnz = int(np.count_nonzero(np.abs(beta[free]) > 1e-9))
        if nnz >= target:
            best, lo = beta, mid
            if nnz == target:
                break
        else:
            hi = mid
    coef = np.abs(best)
    tie = greedy / (greedy.max() + 1.0)
    return np.where(free, coef + 1e-9 * tie, np.inf)


def _class_columns(cls: np.ndarray, classes: np.ndarray) -> np.ndarray | None:
    """``[len(classes), t]`` column indices per class when every class has ``t`` columns."""
    order = np.argsort(cls, kind="stable")
    counts = np.bincount(cls, minlength=int(classes.max(initial=-1)) + 1)[classes]
    if counts.size == 0 or counts.min() != counts.max() or counts[0] == 0:
        return None
    starts = np.searchsorted(cls[order], classes)
    return order[starts[:, None] + np.arange(int(counts[0]))[None, :]]


class _Residual:
    """One consumer's residual covariances given the kept columns (mutable selection state)."""

    def __init__(self, s: np.ndarray, c: np.ndarray, cls: np.ndarray, lam: float) -> None:
        self.r, self.c, self.cls, self.lam = s.copy(), c.copy(), cls, lam

    def explained(self, idx: np.ndarray) -> float:
        sol = rc.solve_spd(self.r[np.ix_(idx, idx)] + self.lam * np.eye(idx.size), self.c[idx])
        return float(np.einsum("ij,ij->", self.c[idx], sol))

    def gains(self, candidates: np.ndarray) -> np.ndarray:
        """Explained variance each candidate class would add (batched when classes are equal-sized)."""
        cols = _class_columns(self.cls, candidates)
        if cols is None:
            out = np.zeros(candidates.size)
            for k, a in enumerate(candidates.tolist()):
                idx = np.flatnonzero(self.cls == a)
                if idx.size:
                    out[k] = self.explained(idx)
            return out
        t = cols.shape[1]
        rb = self.r[cols[:, :, None], cols[:, None, :]] + self.lam * np.eye(t)
        cb = self.c[cols]
        try:
            sol = np.linalg.solve(rb, cb)
        except np.linalg.LinAlgError:
            sol = np.linalg.pinv(rb, hermitian=True) @ cb
        return np.asarray(np.einsum("kij,kij->k", cb, sol))

    def add(self, a: int) -> float:
        """Keep class `a`: its explained variance; ``R`` and ``C`` become residuals given it."""
        idx = np.flatnonzero(self.cls == a)
        if idx.size == 0:
            return 0.0
        dim = self.r.shape[0]
        block = self.r[np.ix_(idx, idx)] + self.lam * np.eye(idx.size)
        coef = rc.solve_spd(block, np.concatenate([self.r[idx], self.c[idx]], axis=1))
        gained = float(np.einsum("ij,ij->", self.c[idx], coef[:, dim:]))
        self.c = self.c - self.r[:, idx] @ coef[:, dim:]
        self.r = self.r - self.r[:, idx] @ coef[:, :dim]
        return gained


def ls_forward_scores(
    blocks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int, free: np.ndarray,
    ridge: float | Sequence[float],
) -> np.ndarray:
    """Forward selection by the least-squares fit of the embedding (LDRF selection).

    `blocks` holds, per consumer, ``(S [D, D], C [D, r], cls [D])``: the input covariance on
    the group's columns, their covariance with the embedding target ``(Y - my) U`` and the
    class of each column. Starting from the frozen classes, the class adding the most
    explained variance ``tr(C_a^T R_aa^-1 C_a)`` (summed over consumers) joins the kept set,
    where ``R`` and ``C`` are the residual covariances given the kept columns (updated by a
    block Gram-Schmidt step). Score: the fraction of the target variance still unexplained
    when the class joined (high = joined early = kept first). `ridge` is the ridge alpha of
    every block, or one per block (``lam = alpha * trace(S) / D``; `_selection_alpha`).
    """
    alphas = [float(ridge)] * len(blocks) if isinstance(ridge, (int, float, np.number)) else [float(a) for a in ridge]
    states = [_Residual(s, c, cls, rc.ridge_lambda(s, a)) for (s, c, cls), a in zip(blocks, alphas)]
    total = max(sum(st.explained(np.arange(st.cls.size)) for st in states), 1e-30)
    scores = np.zeros(size)
    left = [int(i) for i in np.flatnonzero(free)]
    explained = sum(st.add(a) for a in np.flatnonzero(~free).tolist() for st in states)
    while left:
        candidates = np.asarray(left)
        gain = np.sum([st.gains(candidates) for st in states], axis=0) if states else np.zeros(candidates.size)
        best = int(candidates[int(np.argmax(gain))])
        scores[best] = 1.0 - explained / total + 1e-9 * len(left)  # strictly decreasing in order
        explained += sum(st.add(best) for st in states)
        left.remove(best)
    scores[~free] = 2.0
    return scores


# ----------------------------------------------------------------------------- reconstruction methods


Selector = Callable[[Context, Group, Sequence[Consumer], Mapping[str, tuple[np.ndarray, np.ndarray]], set[int], np.ndarray, int], np.ndarray]


def _reconstruction_method(ctx: Context, name: str, select: Selector, mode: str = "ls") -> MethodOutcome:
    need_calibration(ctx, name)
    consumers = group_consumers(ctx)
    whole = {g.index for g in ctx.trace.groups if kept_whole(ctx, g)}
    # a group kept whole needs no statistic: SmolLM2 with --heads 0 --hidden 0 reads 30 layers' inputs, not 121
    layers = [c.layer for index, cs in consumers.items() if index not in whole for c in cs]
    info = RowInfo({}, {}, {}, {})
    cov = input_covariances(ctx, layers, info=info) if layers else {}
    scores: dict[int, np.ndarray] = {}
    removed: set[int] = set()
    with blas_limited():  # thousands of small solves: one BLAS thread (calib.threads; 205 s -> 3.5 s on ResNet-56)
        for group in _source_order(ctx):
            if group.index not in consumers:
                continue
            if group.index in whole:
                scores[group.index] = np.zeros(group.size)  # never pruned: its scores are never read
                continue
            free = np.array([not f for f in group.frozen])
            n_remove = removal_count(ctx, group)
            if n_remove == 0 and ctx.params.group_ratios is not None:
                scores[group.index] = np.zeros(group.size)  # an allocation keeps this group whole: no selection
                continue
            s = select(ctx, group, consumers[group.index], cov, removed, free, n_remove)
            scores[group.index] = s
            order = np.argsort(np.where(free, s, np.inf), kind="stable")[:n_remove]
            removed.update(group.classes[int(i)] for i in order)
    scores, notes = with_fallback(ctx, scores, name)
    if by_damage(ctx):
        scales = norm_scales(ctx, layers, info)
        gains = depth_gains(ctx, layers, cov, scores, consumers, info.rows)
        with blas_limited():
            table = damage_table(ctx, scores, consumers, cov, scales, info.rows, gains)
        plan, budget_notes = damage_plan_with_notes(ctx, table, scores)
        ctx.notes.extend(budget_notes)
    else:
        plan = choose_plan(ctx, scores)
    return rc.with_reconstruction(ctx, MethodOutcome(plan, notes=tuple(notes)), mode=mode)


# ----------------------------------------------------------------------------- predicted damage


#: the methods whose budget can be shared by predicted damage (`by_damage`): their selection holds the statistics
DAMAGE_METHODS = ("thinet", "cp", "ldrf", "contrib", "obs")


#: how a reconstruction method shares a budget when ``--budget-allocation`` is not given: by predicted damage, on
#: every kind of model. Measured on the real-model suite: EfficientNet-Lite1 +13 to +15 points of top-1 at 75% and 85%
#: of the MACs against the ranking; all-MiniLM-L6-v2 (post-LN, token weights) at 60% cosine 0.913 / NN 46.2% against
#: 0.905 / 48.6%, at 85% 0.978 / 70.4% against 0.973 / 67.4% (without token weights the ranking led: 0.905 / 48.6%
#: against 0.895 / 42.6%); SmolLM2-135M (pre-LN) obs at 80%, 128 windows: perplexity 1.53x the original's against
#: 2.36x (the ranking cut the FFNs of layers 11 and 28 to 160-240 of 1,536 neurons and pruned the hidden size;
#: the damage keeps layers 0-10 and 26-29 nearly whole and narrows the middle)
DEFAULT_ALLOCATION = BudgetAllocation.DAMAGE


def by_damage(ctx: Context) -> bool:
    """A budget shared by predicted damage: ``--target-macs`` / ``--target-params`` with ``--budget-allocation damage``
    (the default, `DEFAULT_ALLOCATION`), and no per-group allocation."""
    params = ctx.params
    budget = params.target_macs is not None or params.target_params is not None
    if not budget or params.group_ratios is not None:
        return False
    return params.allocation(DEFAULT_ALLOCATION) is BudgetAllocation.DAMAGE


def damage_after_norms(ctx: Context) -> bool:
    """Token weights are on and every refittable consumer of a prunable head or FFN group adds its output into a
    residual sum read by a LayerNormalization (a post-LN transformer: BERT, all-MiniLM): the damage table then
    counts the errors after the norms (`norm_scales`), where heads and FFN neurons compare."""
    if ctx.params.token_weights is False:
        return False
    layers = [c.layer for index, cs in group_consumers(ctx).items()
              if transformer_part(ctx.trace.node_kind, ctx.trace.groups[index]) in (TransformerPart.HEADS, TransformerPart.FFN) for c in cs]
    return bool(layers) and all(not layer.spatial and (sink := sink_of(ctx, layer)) is not None and sink.weights is not None
                                for layer in layers)


def depth_gain_output(ctx: Context) -> DepthGain:
    """``--depth-gain`` as given; by default POOLED on a post-LN transformer (`damage_after_norms`), else OFF."""
    # measured on the real-model suite, all-MiniLM-L6-v2 default at 60% of the MACs: cosine 0.913 / NN 46.2% without
    # gains, 0.922 / 50.4% pooled, 0.918 / 47.6% tokens (refit-residual probes; random probes: 0.919 / 43.8% pooled,
    # 0.918 / 46.2% tokens; squared pooled gains, over-weighing depth: 0.916 / 47.6%); at 85%: 0.978 / 70.4% without,
    # 0.979 / 70.0% pooled
    given = ctx.params.depth_gain
    if given is not None:
        return DepthGain(given)
    # a graph without a LayerNormalization (a CNN) is not walked (`damage_after_norms` reads every group's consumers)
    if not any(node.op == "LayerNormalization" for node in ctx.graph.nodes):
        return DepthGain.OFF
    return DepthGain.POOLED if damage_after_norms(ctx) else DepthGain.OFF


def depth_gains(ctx: Context, layers: Sequence[rc.Layer], cov: Covariances,
                scores: Mapping[int, np.ndarray] | None = None, consumers: Mapping[int, Sequence[Consumer]] | None = None,
                rows: Mapping[str, int] | None = None) -> dict[str, float]:
    """layer node -> its gain to the outputs (`depthgain`), when ``--depth-gain`` is on (`depth_gain_output`) and
    every layer of the damage table is a sequence or dense layer (features last) whose output is added into a
    residual sum; else none (every damage counts as it is). With `scores` and `consumers`, each layer is probed by
    the error of its refit at the budget's share of its group removed (`probe_residuals`), else by a random one."""
    how = depth_gain_output(ctx)
    if how is DepthGain.OFF or not layers or ctx.calibration is None:
        return {}
    residuals = {} if scores is None or consumers is None else probe_residuals(ctx, scores, consumers, cov, rows or {})
    probes: list[depthgain.Probe] = []
    for layer in dict.fromkeys(layers):
        sink = sink_of(ctx, layer)
        shape = ctx.trace.shapes.get(layer.x)
        key = _layer_key(layer)
        if layer.spatial or sink is None or not shape or len(shape) < 2 or key not in cov:
            ctx.notes.append(f"depth gain: layer {layer.node} is not a dense layer adding into a residual sum; "
                             "damages count as they are")
            return {}
        _, mean = cov[key]
        probes.append(depthgain.Probe(layer.node, layer.y, layer.x, len(shape), int(mean.size), mean, sink.tensor,
                                      sink.weights, residuals.get(layer.node)))
    position = {n.name: i for i, n in enumerate(ctx.graph.nodes)}
    probes.sort(key=lambda p: position.get(p.node, -1))
    s = settings(ctx)
    gains = depthgain.measure_gains(ctx.model, ctx.calibration, probes, batch_size=s.batch_size, seed=s.seed,
                                    how=how, mask_input=ir.token_mask_input(ctx.model))
    if gains:
        ctx.notes.append(f"depth gains ({how.value}) of {len(gains)} layers, in network order: "
                         + " ".join(f"{gains.get(p.node, 1.0):.2f}" for p in probes))
    return gains


def probe_residuals(ctx: Context, scores: Mapping[int, np.ndarray], consumers: Mapping[int, Sequence[Consumer]],
                    cov: Covariances, rows: Mapping[str, int]) -> dict[str, np.ndarray]:
    """layer node -> the error map of its refit (`depthgain.residual_map`) when the first ``1 - target`` of each of
    its groups' removal order (the budget's share; `scores`, lowest first) goes."""
    target = ctx.params.target_macs if ctx.params.target_macs is not None else ctx.params.target_params
    share = 1.0 - (target if target is not None else 0.5)
    s_ = settings(ctx)
    removed: dict[str, list[np.ndarray]] = defaultdict(list)
    by_node: dict[str, Consumer] = {}
    for group in ctx.trace.groups:
        if group.is_frozen or group.index not in consumers or group.index not in scores or kept_whole(ctx, group):
            continue
        order = _group_order(group, np.asarray(scores[group.index], dtype=np.float64), 1.0)
        per_block = group.size // max(1, group.block)
        k = min(len(order.units), max(1, int(round(share * per_block))))
        gone = set(order.units[:k].ravel().tolist())
        for consumer in consumers[group.index]:
            cols, cls = _class_map(group, consumer.column_roots)
            removed[consumer.layer.node].append(cols[np.isin(cls, list(gone))])
            by_node[consumer.layer.node] = consumer
    out: dict[str, np.ndarray] = {}
    for node, parts in removed.items():
        consumer = by_node[node]
        full, _ = cov[_layer_key(consumer.layer)]
        n = rows.get(_layer_key(consumer.layer))
        lam = rc.ridge_lambda(full, s_.ridge, n, s_.ridge_rows if n else 0.0)
        out[node] = depthgain.residual_map(full, consumer.w, np.concatenate(parts), lam)
    return out


def refit_residuals(s: np.ndarray, w: np.ndarray, columns: Sequence[np.ndarray], lam: float) -> np.ndarray:
    """The error left by the refit of a layer ``Y = X W`` from the columns ``K`` still there, when the column sets
    `columns` are removed one after another: ``[m + 1]``, entry ``k`` after the first ``k`` sets (0 first).

    The refit (`reconstruct`) is ``W'_K = W_K + D`` with ``D = argmin ||X_R W_R - X_K D||^2 / n + lam ||D||^2`` (the
    ridge pulls toward plain pruning); the error counted is that minimum, ``tr(W_R^T (S_RR - S_RK (S_KK + lam I)^-1
    S_KR) W_R)``: the least-squares residual as ``lam -> 0``, plain pruning's error as ``lam -> inf``, and never
    below the refit's output error (it includes the penalty). ``S`` is the centred input covariance (the refit's
    intercept absorbs the mean). With ``P = (S + lam I)^-1`` it is ``tr(W_R^T (P_RR)^-1 W_R) - lam ||W_R||^2``
    (Optimal Brain Surgeon's block form). With the Cholesky factor ``P_GG = L L^T`` of the removable columns in
    removal order, ``P_RR`` of every prefix ``R`` is a leading block and ``(P_RR)^-1 = L_RR^-T L_RR^-1``; the rows
    of ``Z = L^-1 W_G`` do not depend on the columns after them, so each prefix's error is a sum of squared rows
    of ``Z`` (and of ``W_G``) up to it: every width from one factorisation.
    """
    import scipy.linalg  # on first use (see `reconstruct.solve_spd`)

    dim = s.shape[0]
    ends = np.cumsum([0, *(c.size for c in columns)])
    if ends[-1] == 0:
        return np.zeros(len(columns) + 1)
    scale = float(np.trace(s)) / max(dim, 1)
    shift = max(lam, 1e-12 * scale, 1e-30)  # lam = 0 (exact least squares) still needs an invertible S
    p = rc.solve_spd(s + shift * np.eye(dim), np.eye(dim))
    cols = np.concatenate(columns)
    pgg = (p[np.ix_(cols, cols)] + p[np.ix_(cols, cols)].T) / 2
    try:
        factor = scipy.linalg.cholesky(pgg, lower=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        jitter = 1e-10 * float(np.trace(pgg)) / cols.size
        factor = scipy.linalg.cholesky(pgg + jitter * np.eye(cols.size), lower=True, check_finite=False)
    z = scipy.linalg.solve_triangular(factor, w[cols], lower=True, check_finite=False)
    per_row = np.einsum("ij,ij->i", z, z) - shift * np.einsum("ij,ij->i", w[cols], w[cols])
    cumulative = np.concatenate([[0.0], np.cumsum(per_row)])
    return np.asarray(np.maximum(cumulative[ends], 0.0))


#: ops a layer's error passes through unchanged in kind on its way to a residual Add (a bias, a folded scale)
_TO_SINK = ("Add", "Sub", "Mul", "Div", "BatchNormalization", "Identity", "Cast", "Reshape", "Transpose")
#: most such ops followed
_SINK_STEPS = 4


@dataclass(frozen=True, eq=False)
class Sink:
    """Where a layer's error lands: the residual sum its output is added into, and the per-channel weight of an
    error there (the squared scale of the LayerNormalization that reads the sum; None: all 1)."""

    tensor: str
    weights: np.ndarray | None


def sink_of(ctx: Context, layer: rc.Layer) -> Sink | None:
    """The residual sum a layer's output is added into (``x + f(x)``), past biases and constant scales; None when
    there is none within `_SINK_STEPS` ops (the layer's own output is then its scale)."""
    nodes = ir.node_by_name(ctx.graph)
    node = nodes.get(layer.node)
    tensor = node.outputs[0] if node is not None else None
    for _ in range(_SINK_STEPS):
        if tensor is None or len(tensor.outputs) != 1:
            return None
        nxt = tensor.outputs[0]
        others = [t for t in nxt.inputs if t is not tensor and t.name]
        if nxt.op not in _TO_SINK:
            return None
        if nxt.op == "Add" and len(others) == 1 and ir.const_value(others[0]) is None:
            out = nxt.outputs[0]
            name = str(out.name)
            if name not in ctx.trace.maps or name not in ctx.trace.shapes:
                return None
            return Sink(name, _norm_weights(out, ctx.trace.maps[name].size))
        if nxt.op in ("Add", "Sub", "Mul", "Div") and any(ir.const_value(t) is None for t in others):
            return None
        tensor = nxt.outputs[0]
    return None


def _norm_weights(tensor: gs.Tensor, channels: int) -> np.ndarray | None:
    """``gamma^2`` of a LayerNormalization over the last axis that alone reads `tensor` (an error ``e_c`` before it
    becomes ``gamma_c e_c / sigma`` after it; ``sigma`` cancels in a relative error)."""
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != "LayerNormalization":
        return None
    norm = tensor.outputs[0]
    gamma = ir.input_const(norm, 1)
    if int(ir.attr(norm, "axis", -1)) not in (-1, len(tensor.shape or ()) - 1) or gamma is None or gamma.size != channels:
        return None
    return np.square(np.asarray(gamma, dtype=np.float64).ravel())


def sink_scales(ctx: Context, layers: Sequence[rc.Layer]) -> dict[str, tuple[float, np.ndarray | None]]:
    """layer node -> (the weighted total variance ``sum_c w_c var_c`` of its `Sink`, the weights), from one cached
    pass of channel moments."""
    sinks = {layer.node: sink for layer in layers if (sink := sink_of(ctx, layer)) is not None}
    if not sinks:
        return {}
    names = list(dict.fromkeys(sink.tensor for sink in sinks.values()))
    stat = ActivationMoments({n: (ctx.trace.maps[n].axis, len(ctx.trace.shapes[n]), ctx.trace.maps[n].size) for n in names})
    collect(ctx.model, ctx.calibration, [stat], settings(ctx).batch_size, progress=ctx.progress, subgraph=rc.weightless_cut)
    moments = stat.result()
    out: dict[str, tuple[float, np.ndarray | None]] = {}
    for node, sink in sinks.items():
        var = moments[sink.tensor].var
        out[node] = (float(np.sum(var if sink.weights is None else sink.weights * var)), sink.weights)
    return out


def norm_scales(ctx: Context, layers: Sequence[rc.Layer], info: RowInfo) -> dict[str, tuple[float, np.ndarray | None]]:
    """`sink_scales`, except for layers whose rows were weighed by the LayerNorm after their sum (`RowWeights`):
    their energy is the norm's output energy per token, ``sum_c gamma_c^2 mean_t z_tc^2``, over the mean weight of
    the rows (the weighted covariance averages ``w_t e_t^2`` over ``sum w``, the error after the norm averages
    ``e_t^2 / sigma_t^2`` over the tokens), so that the damage is the relative error after the norm."""
    scales = sink_scales(ctx, [layer for layer in layers if _layer_key(layer) not in info.norm_energy])
    for layer in layers:
        key = _layer_key(layer)
        sink = sink_of(ctx, layer)
        if key in info.norm_energy and sink is not None and sink.weights is not None:
            energy = float(np.sum(sink.weights * info.norm_energy[key])) / info.mean_weight[key]
            scales[layer.node] = (energy, sink.weights)
    return scales


def damage_table(ctx: Context, scores: Mapping[int, np.ndarray], consumers: Mapping[int, Sequence[Consumer]],
                 cov: Covariances, scales: Mapping[str, tuple[float, np.ndarray | None]] | None = None,
                 rows: Mapping[str, int] | None = None, gains: Mapping[str, float] | None = None
                 ) -> dict[int, GroupDamage]:
    """Per prunable group with refitted consumers, the predicted damage of every width (`budget.GroupDamage`).

    The group's free classes go in the order of `scores` (lowest first; one class per block of a grouped conv);
    removing the first ``k``, each consumer ``C`` loses the output error its least-squares refit cannot recover
    (`refit_residuals`, from the input covariances the selection already holds, ridge as the selection's), divided
    by the energy of what that error lands in: `scales` (layer node -> the variance of the residual sum its output
    is added into and the weights of its channels, `sink_scales`) or else its own output energy ``tr(W^T S W)``;
    a group's damage is the sum
    over its consumers. Relative errors make layers of different scale comparable (the residual stream is what
    the next layers read, through a normalisation); groups are counted one at a time (their interactions through
    the refit of a consumer that reads several groups are left out). Before a LayerNormalization the error's mean
    over the channels is left out (the norm removes it) and each channel weighs ``gamma_c^2``; with token weights
    (`row_weights`: padding out, token ``t`` weighed by ``1 / sigma_t^2`` of the sum, in the covariance itself) the
    energy is the norm's output energy (`norm_scales`), so the damage is the relative error after the norm, up to
    the part of the error along each token's own normalised vector (which the norm also removes: one direction of
    the hidden size). `gains` (layer node -> `depthgain` gain, 1 when absent) weighs each consumer's damage by how
    much its error grows on the way to the model's outputs.
    """
    s_ = settings(ctx)
    scales = scales or {}
    out: dict[int, GroupDamage] = {}
    for group in ctx.trace.groups:
        if group.is_frozen or group.index not in consumers or group.index not in scores or kept_whole(ctx, group):
            continue  # a group kept whole has no statistics (`_reconstruction_method`) and no widths to weigh
        order = _group_order(group, np.asarray(scores[group.index], dtype=np.float64), 1.0)
        if not order.units.size:
            continue
        flat = order.units.ravel()
        damage = np.zeros(len(order.units) + 1)
        for consumer in consumers[group.index]:
            full, _ = cov[_layer_key(consumer.layer)]
            w = consumer.w
            sink_energy, weights = scales.get(consumer.layer.node, (0.0, None))
            if weights is not None and weights.size == w.shape[1]:
                # the error as the norm after the sum sees it: its mean over the channels removed, then scaled by gamma
                w = (w - w.mean(axis=1, keepdims=True)) * np.sqrt(weights)
            energy = sink_energy if sink_energy > 0 else float(np.einsum("ij,ij->", w, full @ w))
            if energy <= 0:
                continue
            cols, cls = _class_map(group, consumer.column_roots)
            by_class = {int(k): cols[cls == k] for k in np.unique(cls).tolist()}
            empty = np.zeros(0, dtype=np.int64)
            columns = [by_class.get(int(k), empty) for k in flat.tolist()]
            n = (rows or {}).get(_layer_key(consumer.layer))
            lam = rc.ridge_lambda(full, s_.ridge, n, s_.ridge_rows if n else 0.0)
            per_class = refit_residuals(full, w, columns, lam) / energy * (gains or {}).get(consumer.layer.node, 1.0)
            damage += per_class[:: max(1, group.block)]
        out[group.index] = GroupDamage(group.index, order.units, damage)
    return out


def _select_thinet(ctx: Context, group: Group, consumers: Sequence[Consumer], cov: Covariances, removed: set[int], free: np.ndarray,
         n_remove: int) -> np.ndarray:
    return thinet_scores(_energy_matrix(ctx, group, consumers, cov, removed), free)


def _select_cp(ctx: Context, group: Group, consumers: Sequence[Consumer], cov: Covariances, removed: set[int], free: np.ndarray,
         n_remove: int) -> np.ndarray:
    return lasso_scores(_energy_matrix(ctx, group, consumers, cov, removed), free, n_remove)


def _selection_alpha(ctx: Context, layer: rc.Layer, dim: int, s: rc.Settings) -> float:
    """The ridge alpha of LDRF's selection solves for `layer`: the user's base alpha, ``params["ridge"]``.

    The refit adds ``c * dim / rows`` (`reconstruct` module docstring) because it shrinks
    toward plain pruning; the selection's explained variance ``tr(C_a^T (R_aa + lam)^-1 C_a)``
    has no such prior, and a large ``lam`` turns it into a correlation ranking blind to
    redundant channels. Measured (benchmarks/results/ridge.md, ``+rowsel``): the row-scaled alpha
    here cost ResNet-56 at ratio 0.5 1.3 points with 64 samples and 1 with 16, and moved
    LeNet-300-100 by +-0.3, so the selection keeps the small base alpha (same `rc.ridge_lambda`
    scaling by the mean input variance as the refit).
    """
    return s.ridge


def _select_ldrf(ctx: Context, group: Group, consumers: Sequence[Consumer], cov: Covariances, removed: set[int], free: np.ndarray,
         n_remove: int) -> np.ndarray:
    s = settings(ctx, "ldrf")
    blocks = []
    alphas = []
    for consumer in consumers:
        full, _ = cov[_layer_key(consumer.layer)]
        alpha = _selection_alpha(ctx, consumer.layer, full.shape[0], s)
        w = consumer.w
        keep = _kept_outputs(ctx, consumer.layer, removed)
        if keep is not None:
            w = w[:, keep]
        projector = rc.principal_projector(w.T @ full @ w, s.energy)
        cols, cls = _class_map(group, consumer.column_roots)
        others = np.setdiff1d(np.arange(full.shape[0]), cols)
        # columns of other groups stay: condition on them (Schur complement) so only this group's classes compete
        sxx, sxy = full[np.ix_(cols, cols)], full[cols] @ w @ projector
        if others.size:
            lam = rc.ridge_lambda(full[np.ix_(others, others)], alpha)
            inv = rc.solve_spd(full[np.ix_(others, others)] + lam * np.eye(others.size), full[np.ix_(others, cols)])
            sxx = sxx - full[np.ix_(cols, others)] @ inv
            sxy = sxy - inv.T @ (full[others] @ w @ projector)
        blocks.append((sxx, sxy, cls))
        alphas.append(alpha)
    return ls_forward_scores(blocks, group.size, free, alphas)


def thinet(ctx: Context) -> MethodOutcome:
    """ThiNet (Luo et al., ICCV 2017): greedy minimal next-layer change, then least squares."""
    return _reconstruction_method(ctx, "thinet", _select_thinet)


def cp(ctx: Context) -> MethodOutcome:
    """Channel Pruning (He, Zhang, Sun, ICCV 2017): LASSO channel selection, then least squares."""
    return _reconstruction_method(ctx, "cp", _select_cp)


def ldrf(ctx: Context) -> MethodOutcome:
    """LDRF (Chen et al., AAAI 2019): embedding-space selection, closed-form recomposition."""
    return _reconstruction_method(ctx, "ldrf", _select_ldrf, mode="ldrf")
