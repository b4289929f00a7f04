"""Statistics as units: what a statistic needs exposed, how it folds a batch in, merges, and is cached.

A `Statistic` is one unit of calibration statistics. It names

* ``tensors``: the activations it reads, exposed by the engine as extra outputs (or, for a
  statistic that reduces inside onnxruntime, ``exposed(model)`` returns its own graph);
* ``update(values, batch)``: folds one batch of those tensors into its state;
* ``merge(other)``: adds a statistic of the same key computed on other samples (the totals
  are sums, so merging is adding);
* ``state()`` / ``load(state)``: its totals as named arrays, what the cache stores;
* ``key``: its kind, the version of its arithmetic and every setting that changes its numbers.

`collect` gathers many statistics over one calibration set: cached ones are loaded, the rest
share one streaming pass per exposed graph (every statistic with the default exposure shares
one pass). The one cache key of a statistic is ``(model digest, calibration fingerprint,
batch size, statistic key)`` (`cache_key`; batches change the float summation order): a change to a statistic's arithmetic bumps its ``version``, and
nothing else can reuse a stale entry. `collect_staged` gathers statistics split only to bound memory (one per
chunk of layers) as the stages of one pass, so each node runs once over the data.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from .cache import DEFAULT, CacheDir, load_entry, model_digest, store_entry
from .collect import stream_tensors
from .engine import StagedPasses
from .memory import give_back
from .threads import blas_limited
from .in_session import moments_model
from .sources import CalibrationSet
from .accumulators import ChannelMoments, GramAccumulator

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
#: rows pending before one Gram product (a product streams the whole D x D matrix through memory)
PENDING_ROWS = 256


class Statistic(ABC):
    """One unit of calibration statistics (module docstring)."""

    kind: ClassVar[str]
    #: bump when the arithmetic changes: old cache entries then no longer match
    version: ClassVar[int] = 1

    @property
    @abstractmethod
    def tensors(self) -> tuple[str, ...]:
        """Activations the statistic reads."""

    @abstractmethod
    def settings(self) -> str:
        """Every setting that changes the numbers, as canonical text (part of the key)."""

    @abstractmethod
    def update(self, values: Mapping[str, np.ndarray], batch: int) -> None:
        """Fold one batch in (`values`: what `exposed` fetches, by name; `batch`: its index)."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Totals as named arrays (what the cache stores)."""

    @abstractmethod
    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Take the totals of `state` (a cache hit)."""

    def merge(self, other: Statistic) -> None:
        """Add `other`'s totals (the same key, other samples): every state entry is a sum."""
        if other.key != self.key:
            raise ValueError(f"cannot merge statistic {other.key!r} into {self.key!r}")
        mine, theirs = self.state(), other.state()
        self.load({k: mine[k] + theirs[k] for k in mine})

    def finish(self) -> None:
        """Called once after the last batch (flush pending rows)."""

    def exposed(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]] | None:
        """A graph of its own and what to fetch from it, or None to share the default pass over `tensors`."""
        return None

    @property
    def key(self) -> str:
        return f"{self.kind}/v{self.version}|{self.settings()}|" + "||".join(self.tensors)


def cache_key(model_id: str, calibration: CalibrationSet, batch_size: int, statistic: Statistic) -> list[str]:
    """The one cache key of `statistic` on `model_id` (`model_digest`), `calibration` in batches of `batch_size`."""
    return [model_id, str(calibration.fingerprint), f"bs={batch_size}", statistic.key]


def _load_cached(model_id: str, calibration: CalibrationSet, statistics: Sequence[Statistic], batch_size: int,
                 cache_dir: CacheDir) -> list[Statistic]:
    """Load every statistic the cache holds; the others, in order, are returned (to be computed)."""
    missing = []
    for stat in statistics:
        hit = load_entry(cache_key(model_id, calibration, batch_size, stat), cache_dir)
        if hit is None:
            missing.append(stat)
        else:
            stat.load(hit)
    return missing


def collect(
    model: onnx.ModelProto,
    calibration: CalibrationSet,
    statistics: Sequence[Statistic],
    batch_size: int,
    *,
    progress: Progress | None = None,
    cache_dir: CacheDir = DEFAULT,
    subgraph: Callable[[onnx.ModelProto, Sequence[str]], onnx.ModelProto] | None = None,
) -> None:
    """Fill every statistic over `calibration`: cache hits are loaded, the rest computed in as few passes as possible.

    `subgraph(model, names)`: the smallest graph computing `names` for a pass (default: the whole model); it may
    leave the weights out (`methods.reconstruct.weightless_cut`): the pass reads them from the model it was cut from.
    """
    model_id = model_digest(model)
    missing = _load_cached(model_id, calibration, statistics, batch_size, cache_dir)
    cut = subgraph or (lambda m, _n: m)
    passes: list[tuple[onnx.ModelProto, tuple[str, ...], list[Statistic], onnx.ModelProto]] = []
    shared: list[Statistic] = []
    for stat in missing:
        own = stat.exposed(model)
        if own is None:
            shared.append(stat)
        else:
            passes.append((cut(own[0], own[1]), own[1], [stat], own[0]))
    if shared:
        names = tuple(dict.fromkeys(t for s in shared for t in s.tensors))
        passes.insert(0, (cut(model, names), names, shared, model))
    per_pass = calibration.num_batches(batch_size)
    done, total, count = 0, per_pass * len(passes), len(passes)
    while passes:
        graph, names, stats, source = passes.pop(0)
        # stream_tensors limits BLAS to one thread while onnxruntime runs (calib.threads); once its session is
        # made, nothing holds the cut model (a copy of the weights it reads, if it has any) while the pass runs
        stream = stream_tensors(graph, calibration, list(names), batch_size=batch_size, weights=source)
        del graph, source
        for batch, values in enumerate(stream):
            for stat in stats:
                stat.update(values, batch)
            done += 1
            if progress is not None:
                progress(min(done, total), total)
        for stat in stats:
            stat.finish()
            store_entry(cache_key(model_id, calibration, batch_size, stat), stat.state(), cache_dir)
        del stream
        give_back()  # the pass's cut model and session: their pages go back before the next pass copies again
    if missing:
        log.debug("collected %d statistics in %d passes (%d cached)", len(missing), count, len(statistics) - len(missing))


#: the frontier of `collect_staged`'s pass, as its log lines name it
STATISTICS_LABEL = "statistics"


def collect_staged(
    model: onnx.ModelProto,
    calibration: CalibrationSet,
    statistics: Sequence[Statistic],
    batch_size: int,
    *,
    done: Callable[[Statistic], None],
    budget: int | None = None,
    progress: Progress | None = None,
    cache_dir: CacheDir = DEFAULT,
) -> None:
    """Fill `statistics`, given in the order the network computes their tensors (shallow first), in ONE pass.

    `collect` runs a graph from the model's inputs for every statistic of its own, so statistics split only to bound
    memory (the Gram matrices of one chunk of layers, one batch's exposed inputs) cost a prefix of the network each:
    13 passes of SmolLM2-135M were about 6 runs of the whole network. Here every statistic is one stage of one
    `calib.engine.StagedPasses`: each node runs once over the data, the tensors later stages read kept in its
    frontier (`budget` bytes of it in memory, default the calibration budget; the rest spilled). ``done(stat)`` is called as each statistic finishes (or is
    loaded from the cache), before the next stage: the caller takes its totals then, so only one stage's
    accumulators are alive at a time. The same cache entries as `collect` (`cache_key`).
    """
    if any(stat.exposed(model) is not None for stat in statistics):
        raise ValueError("collect_staged: a statistic with a graph of its own cannot be a stage")
    model_id = model_digest(model)
    missing = _load_cached(model_id, calibration, statistics, batch_size, cache_dir)
    if not missing:
        for stat in statistics:
            done(stat)
        return
    schedule = [list(stat.tensors) for stat in missing]
    computed = {id(stat) for stat in missing}
    engine = StagedPasses(model, calibration, batch_size, schedule, budget=budget, label=STATISTICS_LABEL)
    total = engine.batches * len(schedule)
    finished = 0
    try:
        with blas_limited():  # the stages' sessions stay alive between batches: BLAS must not fight them
            for stat in statistics:
                if id(stat) in computed:
                    for batch, values in enumerate(engine.advance(list(stat.tensors))):
                        stat.update(values, batch)
                        finished += 1
                        if progress is not None:
                            progress(finished, total)
                    stat.finish()
                    store_entry(cache_key(model_id, calibration, batch_size, stat), stat.state(), cache_dir)
                done(stat)
    finally:
        engine.close()
    log.debug("collected %d statistics in one staged pass (%d cached)", len(missing), len(statistics) - len(missing))


class ActivationMoments(Statistic):
    """``ChannelMoments`` of tensors, reduced inside onnxruntime (`calib.in_session.moments_model`).

    Per tensor and channel ``c``: ``sum v``, ``sum |v|``, ``sum v^2``, ``#(v <= 0)`` over every
    value on that channel (float32 inside the session, float64 totals), and the count.
    """

    kind = "moments"
    version = 2

    def __init__(self, tensors: Mapping[str, tuple[int, int, int]]) -> None:
        """`tensors`: name -> (channel axis, rank, channels)."""
        self.spec = dict(tensors)
        self._totals = {n: {k: np.zeros(c) for k in ChannelMoments._FIELDS} for n, (_a, _r, c) in self.spec.items()}
        self._counts = dict.fromkeys(self.spec, 0)
        self._outs: dict[str, list[str]] = {}

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(self.spec)

    def settings(self) -> str:
        return ""

    def exposed(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
        graph, self._outs = moments_model(model, {n: (a, r) for n, (a, r, _c) in self.spec.items()})
        return graph, tuple(o for n in self.spec for o in self._outs[n])

    def update(self, values: Mapping[str, np.ndarray], batch: int) -> None:
        for n, (axis, _rank, _c) in self.spec.items():
            parts = [values[o] for o in self._outs[n]]
            for key, part in zip(ChannelMoments._FIELDS, parts[:4]):
                self._totals[n][key] += part.astype(np.float64)
            shape = parts[4].astype(np.int64)
            self._counts[n] += int(np.prod(shape)) // max(int(shape[axis % len(shape)]), 1)

    def _state_of(self, name: str) -> dict[str, np.ndarray]:
        """One tensor's totals in `ChannelMoments.state` form."""
        return {**self._totals[name], "count": np.array(self._counts[name]), "channel_axis": np.array(self.spec[name][0])}

    def state(self) -> dict[str, np.ndarray]:
        return {f"{i}:{k}": v for i, n in enumerate(self.spec) for k, v in self._state_of(n).items()}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        for i, n in enumerate(self.spec):
            self._totals[n] = {k: np.asarray(state[f"{i}:{k}"], dtype=np.float64) for k in ChannelMoments._FIELDS}
            self._counts[n] = int(state[f"{i}:count"])

    def merge(self, other: Statistic) -> None:
        # channel_axis is a label, not a sum
        if not isinstance(other, ActivationMoments) or other.key != self.key:
            raise ValueError(f"cannot merge statistic {other.key!r} into {self.key!r}")
        for n in self.spec:
            for k in ChannelMoments._FIELDS:
                self._totals[n][k] = self._totals[n][k] + other._totals[n][k]
            self._counts[n] += other._counts[n]

    def result(self) -> dict[str, ChannelMoments]:
        return {n: ChannelMoments.from_state(self._state_of(n)) for n in self.spec}


#: rows of one layer from one batch of its input and the batch's generator (sampled positions)
RowSampler = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class RowWeights:
    """How much each row (token) of a sequence layer ``[N, T, D]`` counts.

    ``mask``: a graph input ``[N, T]`` whose zeros mark padding tokens (weight 0: their outputs are never read).
    ``norm``: the tensor ``[N, T, C]`` a LayerNormalization over its last axis reads (the residual sum the layer's
    output is added into): row ``t`` gets ``1 / sigma_t^2``, its variance over the channels, so that an error ``e_t``
    there counts as it does after the norm, ``gamma e_t / sigma_t`` (a token whose stream is ten times larger
    loses a tenth of an error's effect). None: every row counts 1.
    """

    mask: str | None = None
    norm: str | None = None

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(t for t in (self.mask, self.norm) if t)

    def describe(self) -> str:
        return f"mask={self.mask or ''},norm={self.norm or ''}"

    def of(self, values: Mapping[str, np.ndarray], rows: int) -> np.ndarray | None:
        """One weight per row (None: all 1, or the tensors' shapes do not line up with the `rows`)."""
        weights = np.ones(rows)
        if self.mask is not None:
            mask = np.asarray(values[self.mask]).reshape(-1)
            if mask.size != rows:
                return None
            if self.norm is None and mask.all():
                return None  # no padding in this batch (a language model's full windows): every row counts 1
            weights = weights * (mask != 0)
        if self.norm is not None:
            inverse = inverse_variances(values[self.norm])
            if inverse.size != rows:
                return None
            weights = weights * inverse
        return weights


def inverse_variances(stream: np.ndarray) -> np.ndarray:
    """``1 / sigma_t^2`` per row of `stream` ``[..., C]``, its variance over the last axis: how much an error in that
    row counts after a LayerNormalization (`RowWeights`); 0 for a row of no variance (a constant row, whose norm
    output is its bias whatever the error)."""
    var = np.asarray(stream, dtype=np.float64).reshape(-1, stream.shape[-1]).var(axis=1)
    live = var > 0
    return np.where(live, 1.0 / np.where(live, var, 1.0), 0.0)


def norm_energy(values: Mapping[str, np.ndarray], weights: RowWeights, row_weights: np.ndarray) -> np.ndarray | None:
    """Per channel, the summed square of the normalised stream ``z_tc = (s_tc - mu_t) / sigma_t`` over the rows of
    nonzero weight (what ``gamma_c^2`` multiplies in the norm's output energy)."""
    if weights.norm is None:
        return None
    stream = np.asarray(values[weights.norm], dtype=np.float64)
    flat = stream.reshape(-1, stream.shape[-1])
    live = row_weights > 0
    z = flat[live] - flat[live].mean(axis=1, keepdims=True)
    sd = z.std(axis=1, keepdims=True)
    return np.asarray(np.square(np.divide(z, sd, out=np.zeros_like(z), where=sd > 0)).sum(axis=0))


class SampledGrams(Statistic):
    """Centred covariance and mean of sampled input rows, for layers sharing one pass.

    Per layer ``l``: rows ``X_l = rows_l(x, rng)`` of its input ``x`` (im2col patches at sampled
    positions, or the rows of a Gemm/MatMul), accumulated as ``X^T X``, ``sum X``, count
    (`GramAccumulator`: float32 products, float64 totals); ``S = X^T X / n - mean mean^T``.
    One generator per batch, ``default_rng([seed, chunk, batch])``, drawn by the layers in order:
    the positions depend on the layers that share the pass (``chunk`` and the layer list are
    part of the key).
    """

    kind = "sampled-grams"
    version = 4  # 2: vectorised position sampling (calib.patches); 3: row weights; 4: inputs computed stage by stage

    def __init__(self, layers: Sequence[tuple[str, str, int, RowSampler]], *, seed: int, chunk: int, settings: str,
                 weights: Mapping[str, RowWeights] | None = None) -> None:
        """`layers`: (key, input tensor, row width D, rows sampler); `settings`: what else shapes the rows;
        `weights`: layer key -> how its rows count (`RowWeights`; a sequence layer's rows, one per token)."""
        self.layers = list(layers)
        self.seed, self.chunk, self._settings = seed, chunk, settings
        self.weights = {k: w for k, w in (weights or {}).items() if w.tensors}
        self._accs = [GramAccumulator(dim, product_dtype=np.float32) for _k, _x, dim, _r in self.layers]
        self._pending: list[list[tuple[np.ndarray, np.ndarray | None]]] = [[] for _ in self.layers]
        self._live = [0.0] * len(self.layers)
        self._zsq: list[np.ndarray | None] = [None] * len(self.layers)
        self._sums: dict[str, np.ndarray] | None = None  # finished, loaded or merged totals
        #: layer key -> rows summed (filled by `take_covariances`; rows of weight 0 not counted)
        self.rows: dict[str, int] = {}
        #: layer key -> the mean weight of its rows of nonzero weight (1 without weights)
        self.mean_weight: dict[str, float] = {}
        #: layer key -> per channel of its `RowWeights.norm` stream, the mean of ``z_tc^2`` over those rows
        self.norm_energy: dict[str, np.ndarray] = {}

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*(x for _k, x, _d, _r in self.layers), *(t for w in self.weights.values() for t in w.tensors)]))

    def settings(self) -> str:
        weights = "".join(f"|{k}:{w.describe()}" for k, w in sorted(self.weights.items()))
        return f"{self._settings}|seed={self.seed}|chunk={self.chunk}|" + "||".join(k for k, _x, _d, _r in self.layers) + weights

    def update(self, values: Mapping[str, np.ndarray], batch: int) -> None:
        rng = np.random.default_rng([self.seed, self.chunk, batch])
        for i, (k, x, _d, rows) in enumerate(self.layers):
            block = np.asarray(rows(values[x], rng))
            spec = self.weights.get(k)
            w = None if spec is None else spec.of(values, int(block.shape[0]))
            if w is not None and spec is not None:
                energy = norm_energy(values, spec, w)
                if energy is not None:
                    self._zsq[i] = energy if self._zsq[i] is None else self._zsq[i] + energy
            self._live[i] += float(block.shape[0]) if w is None else float(np.count_nonzero(w))
            self._pending[i].append((block, w))
            if sum(int(p.shape[0]) for p, _w in self._pending[i]) >= PENDING_ROWS:
                self._flush(i)

    def _flush(self, i: int) -> None:
        if self._pending[i]:
            block = self._pending[i]
            x = block[0][0] if len(block) == 1 else np.concatenate([b for b, _w in block])
            if all(w is None for _b, w in block):
                self._accs[i].update(x)
            else:
                w = np.concatenate([np.ones(b.shape[0]) if w is None else w for b, w in block])
                self._accs[i].update(x, weights=w)
            self._pending[i] = []

    def finish(self) -> None:
        """Flush pending rows and keep only the totals (the accumulators' working copies are freed)."""
        if self._sums is not None:
            return
        for i in range(len(self.layers)):
            self._flush(i)
        sums: dict[str, np.ndarray] = {}
        accs: list[GramAccumulator | None] = list(self._accs)
        self._accs = []
        for i, acc in enumerate(accs):  # one layer at a time: its accumulator is freed before the next total is made
            assert acc is not None
            sums.update(self._extra(acc, i))
            accs[i] = acc = None
        self._sums = sums

    def _extra(self, acc: GramAccumulator, i: int) -> dict[str, np.ndarray]:
        out = _totals(acc, str(i))
        out[f"live{i}"] = np.array(self._live[i])
        zsq = self._zsq[i]
        out[f"zsq{i}"] = np.zeros(0) if zsq is None else zsq
        return out

    def state(self) -> dict[str, np.ndarray]:
        if self._sums is not None:
            return self._sums
        return {k: v for i, acc in enumerate(self._accs) for k, v in self._extra(acc, i).items()}

    def merge(self, other: Statistic) -> None:
        if other.key != self.key:
            raise ValueError(f"cannot merge statistic {other.key!r} into {self.key!r}")
        mine, theirs = self.state(), other.state()
        self.load({k: (mine[k] if not theirs[k].size else theirs[k] if not mine[k].size else mine[k] + theirs[k])
                   for k in mine})

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self._sums = {k: np.asarray(v) for k, v in state.items()}
        self._accs = []

    def take_covariances(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """layer key -> (centred covariance [D, D], mean [D]); the totals are consumed layer by layer
        (at most one extra D x D matrix is held), so call it once, after `finish` or a cache hit."""
        state = self.state()
        self._sums = {}
        out = {}
        for i, (key, _x, _d, _r) in enumerate(self.layers):
            total = float(state.pop(f"count{i}"))  # the sum of the rows' weights
            live = float(state.pop(f"live{i}"))
            self.rows[key] = int(round(live))
            self.mean_weight[key] = total / live if live > 0 else 1.0
            zsq = state.pop(f"zsq{i}")
            if zsq.size and live > 0:
                self.norm_energy[key] = zsq / live
            out[key] = _centred(state.pop(f"xtx{i}"), state.pop(f"sum{i}"), total)
        return out


class PooledCovariance(Statistic):
    """Centred channel covariance of one tensor, one row per sample (the mean over its positions).

    ``x`` moved to ``[N, ..., C]``, averaged over every position axis: ``S = X^T X / n - m m^T``
    with float64 products (C is small: one channel per column).
    """

    kind = "pooled-cov"

    def __init__(self, tensor: str, axis: int, channels: int, settings: str = "") -> None:
        self.tensor, self.axis, self.channels, self._settings = tensor, axis, channels, settings
        self._acc = GramAccumulator(channels)
        self._sums: dict[str, np.ndarray] | None = None  # loaded or merged totals

    @property
    def tensors(self) -> tuple[str, ...]:
        return (self.tensor,)

    def settings(self) -> str:
        return f"{self._settings}|axis={self.axis}"

    def update(self, values: Mapping[str, np.ndarray], batch: int) -> None:
        x = np.moveaxis(np.asarray(values[self.tensor], dtype=np.float64), self.axis, -1)
        if x.ndim > 2:  # spatial / sequence positions: one row per sample (their mean)
            x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
        self._acc.update(x.reshape(-1, self.channels))

    def state(self) -> dict[str, np.ndarray]:
        if self._sums is not None:
            return dict(self._sums)
        return _totals(self._acc)

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self._sums = {k: np.asarray(v) for k, v in state.items()}

    def covariance(self) -> np.ndarray:
        state = self.state()
        return _centred(state["xtx"], state["sum"], float(state["count"]))[0]


def _totals(acc: GramAccumulator, suffix: str = "") -> dict[str, np.ndarray]:
    """The sums a Gram statistic keeps of `acc`: ``xtx``, ``sum`` (of rows), ``count``, each name + `suffix`."""
    return {f"xtx{suffix}": acc.xtx, f"sum{suffix}": acc.sum_x, f"count{suffix}": np.array(acc.count)}


def _centred(xtx: np.ndarray, total: np.ndarray, count: float) -> tuple[np.ndarray, np.ndarray]:
    """``(X^T X / n - m m^T, m)`` with ``m = sum X / n``: the centred second moment and the mean."""
    n = count if count > 0 else 1.0
    mean = total / n
    return xtx / n - np.outer(mean, mean), mean
