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
nothing else can reuse a stale entry.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx

from .cache import DEFAULT, CacheDir, load_entry, model_digest, store_entry
from .collect import stream_tensors
from .memory import give_back
from .reduce import moments_model
from .sources import CalibrationSet
from .stats import ChannelMoments, GramAccumulator

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

    `subgraph(model, names)`: the smallest graph computing `names` for the shared pass (default: the whole model).
    """
    model_id = model_digest(model)
    missing = []
    for stat in statistics:
        hit = load_entry(cache_key(model_id, calibration, batch_size, stat), cache_dir)
        if hit is None:
            missing.append(stat)
        else:
            stat.load(hit)
    cut = subgraph or (lambda m, _n: m)
    passes: list[tuple[onnx.ModelProto, tuple[str, ...], list[Statistic]]] = []
    shared: list[Statistic] = []
    for stat in missing:
        own = stat.exposed(model)
        if own is None:
            shared.append(stat)
        else:
            passes.append((cut(own[0], own[1]), own[1], [stat]))
    if shared:
        names = tuple(dict.fromkeys(t for s in shared for t in s.tensors))
        passes.insert(0, (cut(model, names), names, shared))
    per_pass = calibration.num_batches(batch_size)
    done, total, count = 0, per_pass * len(passes), len(passes)
    while passes:
        graph, names, stats = passes.pop(0)
        # stream_tensors limits BLAS to one thread while onnxruntime runs (calib.threads); once its session is
        # made, nothing holds the cut model (a copy of the weights it reads) while the pass runs
        stream = stream_tensors(graph, calibration, list(names), batch_size=batch_size)
        del graph
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


class ActivationMoments(Statistic):
    """``ChannelMoments`` of tensors, reduced inside onnxruntime (`calib.reduce.moments_model`).

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
    version = 2  # 2: vectorised position sampling (calib.patches)

    def __init__(self, layers: Sequence[tuple[str, str, int, RowSampler]], *, seed: int, chunk: int, settings: str) -> None:
        """`layers`: (key, input tensor, row width D, rows sampler); `settings`: what else shapes the rows."""
        self.layers = list(layers)
        self.seed, self.chunk, self._settings = seed, chunk, settings
        self._accs = [GramAccumulator(dim, product_dtype=np.float32) for _k, _x, dim, _r in self.layers]
        self._pending: list[list[np.ndarray]] = [[] for _ in self.layers]
        self._sums: dict[str, np.ndarray] | None = None  # finished, loaded or merged totals
        #: layer key -> rows summed (filled by `take_covariances`)
        self.rows: dict[str, int] = {}

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(x for _k, x, _d, _r in self.layers))

    def settings(self) -> str:
        return f"{self._settings}|seed={self.seed}|chunk={self.chunk}|" + "||".join(k for k, _x, _d, _r in self.layers)

    def update(self, values: Mapping[str, np.ndarray], batch: int) -> None:
        rng = np.random.default_rng([self.seed, self.chunk, batch])
        for i, (_k, x, _d, rows) in enumerate(self.layers):
            self._pending[i].append(np.asarray(rows(values[x], rng)))
            if sum(int(p.shape[0]) for p in self._pending[i]) >= PENDING_ROWS:
                self._flush(i)

    def _flush(self, i: int) -> None:
        if self._pending[i]:
            block = self._pending[i]
            self._accs[i].update(block[0] if len(block) == 1 else np.concatenate(block))
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
            sums.update(_totals(acc, str(i)))
            accs[i] = acc = None
        self._sums = sums

    def state(self) -> dict[str, np.ndarray]:
        if self._sums is not None:
            return self._sums
        return {k: v for i, acc in enumerate(self._accs) for k, v in _totals(acc, str(i)).items()}

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
            self.rows[key] = int(state.pop(f"count{i}"))
            out[key] = _centred(state.pop(f"xtx{i}"), state.pop(f"sum{i}"), self.rows[key])
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
        return _centred(state["xtx"], state["sum"], int(state["count"]))[0]


def _totals(acc: GramAccumulator, suffix: str = "") -> dict[str, np.ndarray]:
    """The sums a Gram statistic keeps of `acc`: ``xtx``, ``sum`` (of rows), ``count``, each name + `suffix`."""
    return {f"xtx{suffix}": acc.xtx, f"sum{suffix}": acc.sum_x, f"count{suffix}": np.array(acc.count)}


def _centred(xtx: np.ndarray, total: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(X^T X / n - m m^T, m)`` with ``m = sum X / n``: the centred second moment and the mean."""
    n = max(count, 1)
    mean = total / n
    return xtx / n - np.outer(mean, mean), mean
