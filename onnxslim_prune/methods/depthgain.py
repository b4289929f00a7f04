"""Depth gains: how much a layer's error grows or shrinks on its way to the model's outputs.

The damage table (`datadriven.damage_table`) counts a layer's error where it lands: relative to the residual sum
its output is added into, after the LayerNormalization that reads it. The same relative error does not cost the
same at the outputs from every depth: later layers add their own signal, the norms rescale, attention mixes tokens.
Measured on all-MiniLM-L6-v2 (pooled sentence embedding): the error of layer 1-3's FFN refits costs about half of
what the same damage costs after layer 4's attention, and layer 5's attention output 2.7 times the mean. So the
damage of each probed layer ``C`` is multiplied by its gain, measured on the calibration data, not set by hand.

The probe: ``C``'s output ``y`` becomes ``y + (x - mu) M``, the error its refit leaves when the budget's share of
its groups goes (`residual_map`: ``M_R = -W_R`` for the removed input columns, ``M_K = D`` for the refitted ones,
``mu`` its input's mean, absorbed by the refit's intercept), at its real size; without a removal order (API use)
its input becomes ``x + (x - mu) r`` with ``r ~ N(0, eps^2)`` per sample and input column, the same for every
token (a small partial removal of every column at once). One run per probed layer on the first `GAIN_SAMPLES`
samples of the fit part, beside one clean run, all in one session whose extra inputs switch each probe on (only
the probed layer's). Per layer, with sums over those samples::

    injected e_in(C)  = sum_t m_t ||g * (d_t - mean_c d_t)||^2 / sigma_t^2 / sum_t m_t ||g * z_t||^2
    output   e_out(C) = sum over outputs of sum_n ||dy_n||^2 / sum_n ||y_n||^2   (real tokens only)
    gain(C)  = (e_out / e_in) / mean over probed layers of e_out / e_in

with ``d`` the change of the residual sum, ``g`` the norm's scale, ``sigma_t`` and ``z_t`` each token's standard
deviation and normalised vector there (the damage table's units: `datadriven.norm_scales`; without a norm, the
sum's centred energy), ``m_t`` the token mask, and ``y_n`` sample ``n`` of an output: its tokens
(`DepthGain.TOKENS`, as the verdict compares them) or their mean over the real tokens (`DepthGain.POOLED`, a
sentence embedding). The mean gain is 1, so the damage keeps its scale (`budget.NEGLIGIBLE_DAMAGE`,
``--min-width``). A gain is that of one layer's error alone on the original model (the errors of other layers and
the error correction of the layers downstream are not counted); gains are cached with the statistics
(`calib.cache`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import ir
from ..calib.cache import load_entry, model_digest, store_entry
from ..calib.collect import exposed_session
from ..calib.sources import CalibrationSet
from ..calib.threads import blas_limited
from ..errors import CalibrationError
from .base import DepthGain

log = logging.getLogger(__name__)

#: calibration samples the gains are measured on (the first of the fit part)
GAIN_SAMPLES = 64
#: standard deviation of the random relative perturbation of each input column (first order; measured on
#: all-MiniLM-L6-v2: gains at 0.03 and 0.1 agree within 3%)
GAIN_EPS = 0.03
#: the version of the arithmetic (part of the cache key)
VERSION = 2


@dataclass(frozen=True, eq=False)
class Probe:
    """One layer whose gain is measured: the consumer node (the name its gain goes by) and its output (how it is
    found in the model, whose nodes may be unnamed), its input (of `rank` axes, samples first, `width` features
    last) and the mean of that input, and the residual sum its output is added into with the squared scale of the
    LayerNormalization that reads the sum (None: a plain relative error there)."""

    node: str
    y: str
    x: str
    rank: int
    width: int
    mean: np.ndarray
    sink: str
    norm_weights: np.ndarray | None
    #: the error the layer's pruning leaves, as a map of its centred input ``[width, outputs]`` (added to its output
    #: when probed: `residual_map`); None: a random perturbation of its input
    residual: np.ndarray | None = None


def _noise_name(index: int) -> str:
    return f"depth_gain_noise_{index}"


def perturbed_model(model: onnx.ModelProto, probes: Sequence[Probe]) -> onnx.ModelProto:
    """`model` without its initializers (the session takes them from `model`), probe ``i``'s node reading
    ``x + (x - mean_i) * noise_i`` where ``noise_i`` is a new float input ``[N, 1, ..., width]``."""
    bare = ir.without_initializers(model)
    producers = {n.output[0]: k for k, n in enumerate(bare.graph.node) if n.output}
    before: dict[int, list[onnx.NodeProto]] = {}
    after: dict[int, list[onnx.NodeProto]] = {}
    for i, probe in enumerate(probes):
        at = producers.get(probe.y)
        node = None if at is None else bare.graph.node[at]
        if at is None or node is None or probe.x not in node.input:
            raise CalibrationError(f"depth gain: no node makes {probe.y!r} from {probe.x!r}")
        noise, tag = _noise_name(i), f"depth_gain_{i}"
        if probe.residual is not None:
            _add_residual(bare, at, probe, noise, tag, after)
            continue
        bare.graph.input.append(helper.make_tensor_value_info(noise, TensorProto.FLOAT,
                                                              ["N", *([1] * max(probe.rank - 2, 0)), probe.width]))
        bare.graph.initializer.append(onnx.numpy_helper.from_array(probe.mean.astype(np.float32), f"{tag}_mean"))
        before[at] = [
            helper.make_node("Sub", [probe.x, f"{tag}_mean"], [f"{tag}_centred"], name=f"{tag}_sub"),
            helper.make_node("Mul", [f"{tag}_centred", noise], [f"{tag}_delta"], name=f"{tag}_mul"),
            helper.make_node("Add", [probe.x, f"{tag}_delta"], [f"{tag}_x"], name=f"{tag}_add"),
        ]
        for k, name in enumerate(node.input):
            if name == probe.x:
                node.input[k] = f"{tag}_x"
    ordered: list[onnx.NodeProto] = []
    for k, node in enumerate(bare.graph.node):
        ordered.extend(before.get(k, ()))
        ordered.append(onnx.NodeProto())
        ordered[-1].CopyFrom(node)  # a copy: the field is cleared below
        ordered.extend(after.get(k, ()))
    del bare.graph.node[:]
    bare.graph.node.extend(ordered)
    return bare


def _add_residual(bare: onnx.ModelProto, at: int, probe: Probe, gate: str, tag: str,
                  after: dict[int, list[onnx.NodeProto]]) -> None:
    """Probe `probe` by its pruning's error: its output ``y`` becomes ``y + gate * (x - mean) R`` for every reader."""
    assert probe.residual is not None
    bare.graph.input.append(helper.make_tensor_value_info(gate, TensorProto.FLOAT, [1]))
    bare.graph.initializer.append(onnx.numpy_helper.from_array(probe.mean.astype(np.float32), f"{tag}_mean"))
    bare.graph.initializer.append(onnx.numpy_helper.from_array(probe.residual.astype(np.float32), f"{tag}_map"))
    if probe.y in {o.name for o in bare.graph.output}:
        raise CalibrationError(f"depth gain: {probe.y!r} is a graph output")
    for node in bare.graph.node:
        for k, name in enumerate(node.input):
            if name == probe.y:
                node.input[k] = f"{tag}_y"
    after[at] = [
        helper.make_node("Sub", [probe.x, f"{tag}_mean"], [f"{tag}_centred"], name=f"{tag}_sub"),
        helper.make_node("MatMul", [f"{tag}_centred", f"{tag}_map"], [f"{tag}_error"], name=f"{tag}_matmul"),
        helper.make_node("Mul", [f"{tag}_error", gate], [f"{tag}_gated"], name=f"{tag}_mul"),
        helper.make_node("Add", [probe.y, f"{tag}_gated"], [f"{tag}_y"], name=f"{tag}_add"),
    ]


def residual_map(s: np.ndarray, w: np.ndarray, removed: np.ndarray, lam: float) -> np.ndarray:
    """The error of a layer ``Y = X W`` (centred input covariance `s`) whose input columns `removed` go and whose
    other columns ``K`` are refitted (`datadriven.refit_residuals`: ``W'_K = W_K + D``, ``D = (S_KK + lam I)^-1 S_KR
    W_R``), as a map of the centred input: ``Y' - Y = (X - mu) M`` with ``M_K = D`` and ``M_R = -W_R``."""
    from . import reconstruct as rc

    dim = s.shape[0]
    out = np.zeros_like(w, dtype=np.float64)
    gone = np.zeros(dim, dtype=bool)
    gone[removed] = True
    kept = np.flatnonzero(~gone)
    out[gone] = -w[gone]
    if kept.size and gone.any():
        out[kept] = rc.solve_spd(s[np.ix_(kept, kept)] + lam * np.eye(kept.size), s[np.ix_(kept, np.flatnonzero(gone))] @ w[gone])
    return out


@dataclass
class Injected:
    """Sums over batches of one probe's error at its residual sum and of the sum's energy (`injected_error`)."""

    error: float = 0.0
    energy: float = 0.0
    #: without a norm: the sum's per-channel total and row count, to centre its energy over every batch at once
    total: np.ndarray | float = 0.0
    rows: int = 0

    def add(self, other: Injected) -> None:
        self.error += other.error
        self.energy += other.energy
        self.total = self.total + other.total
        self.rows += other.rows

    @property
    def relative(self) -> float:
        energy = self.energy - (float(np.sum(np.square(self.total))) / self.rows if self.rows else 0.0)
        return self.error / energy if energy > 0 else float("nan")


def injected_error(clean: np.ndarray, perturbed: np.ndarray, mask: np.ndarray | None,
                   norm_weights: np.ndarray | None) -> Injected:
    """``e_in`` of the module docstring, its sums over one batch: the change of a residual sum ``[..., C]`` and the
    sum's energy as the LayerNormalization after it sees them (or, without `norm_weights`, the change's and the
    sum's plain energies, centred over the batches by `Injected.relative`)."""
    s = clean.astype(np.float64).reshape(-1, clean.shape[-1])
    d = perturbed.astype(np.float64).reshape(-1, clean.shape[-1]) - s
    if mask is not None and mask.size == s.shape[0]:
        s, d = s[mask], d[mask]
    if norm_weights is None:
        return Injected(float(np.sum(np.square(d))), float(np.sum(np.square(s))), s.sum(axis=0), s.shape[0])
    var = s.var(axis=1)
    live = var > 0
    s, d, var = s[live], d[live], var[live]
    d = d - d.mean(axis=1, keepdims=True)
    z2 = np.square(s - s.mean(axis=1, keepdims=True)) / var[:, None]
    return Injected(float(np.sum(norm_weights * np.square(d) / var[:, None])), float(np.sum(norm_weights * z2)))


def output_error(clean: Sequence[np.ndarray], perturbed: Sequence[np.ndarray], mask: np.ndarray | None,
                 how: DepthGain) -> np.ndarray:
    """``e_out`` of the module docstring as (error, energy) sums over one batch, one row per output (padding tokens
    out when an output's leading axes are the mask's ``[N, T]``)."""
    rows = []
    for y0, y1 in zip(clean, perturbed):
        a, b = y0.astype(np.float64), y1.astype(np.float64)
        if mask is not None and a.ndim >= 2 and a.shape[:2] == mask.shape:
            weight = mask.reshape(*mask.shape, *([1] * (a.ndim - 2))).astype(np.float64)
            a, b = a * weight, b * weight
            if how is DepthGain.POOLED:
                count = np.maximum(mask.sum(axis=1), 1).reshape(-1, *([1] * (a.ndim - 2)))
                a, b = a.sum(axis=1) / count, b.sum(axis=1) / count
        rows.append((float(np.sum(np.square(b - a))), float(np.sum(np.square(a)))))
    return np.array(rows).reshape(-1, 2)


def measure_gains(model: onnx.ModelProto, calibration: CalibrationSet, probes: Sequence[Probe], *, batch_size: int,
                  seed: int, how: DepthGain, samples: int = GAIN_SAMPLES, eps: float = GAIN_EPS,
                  mask_input: str | None = None) -> dict[str, float]:
    """probe node -> its gain (module docstring), from one clean run and one perturbed run per probe on each
    batch of the first `samples` calibration samples (cached under the model, the data and every setting)."""
    if not probes:
        return {}
    key = [model_digest(model), str(calibration.fingerprint), f"bs={batch_size}",
           f"depth-gain/v{VERSION}|{how.value}|samples={samples}|eps={eps!r}|seed={seed}|"
           + "||".join(f"{p.node}:{p.x}:{p.sink}:{_digest(p.residual)}" for p in probes)]
    hit = load_entry(key)
    if hit is not None:
        ratios = np.asarray(hit["ratios"], dtype=np.float64)
    else:
        ratios = _measure(model, calibration, probes, batch_size, seed, how, samples, eps, mask_input)
        store_entry(key, {"ratios": ratios})
    live = ratios[np.isfinite(ratios) & (ratios > 0)]
    if not live.size:
        return {}
    gains = {p.node: float(r / live.mean()) for p, r in zip(probes, ratios.tolist()) if np.isfinite(r) and r > 0}
    log.info("depth gains (%s, output error per unit of damage, mean 1): %s", how.value,
             {p.node: round(gains.get(p.node, 1.0), 3) for p in probes})
    return gains


def _digest(array: np.ndarray | None) -> str:
    return "" if array is None else hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).tobytes()).hexdigest()[:16]


def _measure(model: onnx.ModelProto, calibration: CalibrationSet, probes: Sequence[Probe], batch_size: int,
             seed: int, how: DepthGain, samples: int, eps: float, mask_input: str | None) -> np.ndarray:
    graph = perturbed_model(model, probes)
    outputs = [o.name for o in model.graph.output]
    sinks = list(dict.fromkeys(p.sink for p in probes))
    fetch = outputs + [s for s in sinks if s not in outputs]
    session = exposed_session(graph, fetch, weights=model)
    del graph
    injected = [Injected() for _ in probes]
    produced = np.zeros((len(probes), len(outputs), 2))
    seen = 0
    with blas_limited():
        for batch, feed in enumerate(calibration.iter_batches(batch_size)):
            if seen >= samples:
                break
            feed = {k: v[: samples - seen] for k, v in feed.items()}
            n = len(next(iter(feed.values())))
            seen += n
            mask = None if mask_input is None or mask_input not in feed else np.asarray(feed[mask_input]) != 0
            flat_mask = None if mask is None else mask.reshape(-1)
            zeros = {_noise_name(i): _noise(p, n, None) for i, p in enumerate(probes)}
            clean = dict(zip(fetch, session.run(fetch, {**feed, **zeros})))
            rng = np.random.default_rng([seed, batch])
            for i, probe in enumerate(probes):
                noise = dict(zeros)
                noise[_noise_name(i)] = _noise(probe, n, rng) * np.float32(1.0 if probe.residual is not None else eps)
                values = dict(zip(fetch, session.run(fetch, {**feed, **noise})))
                injected[i].add(injected_error(clean[probe.sink], values[probe.sink], flat_mask, probe.norm_weights))
                produced[i] += output_error([clean[o] for o in outputs], [values[o] for o in outputs], mask, how)
    if seen == 0:
        raise CalibrationError("depth gain: the calibration set is empty")
    e_in = np.array([i.relative for i in injected])
    e_out = np.sum(produced[:, :, 0] / np.maximum(produced[:, :, 1], 1e-30), axis=1)
    return np.divide(e_out, e_in, out=np.full(len(probes), np.nan), where=np.isfinite(e_in) & (e_in > 0))


def _noise(probe: Probe, n: int, rng: np.random.Generator | None) -> np.ndarray:
    """Probe input noise for `n` samples: zeros, or standard normal draws of `rng` (a residual probe's gate: 0 or 1)."""
    if probe.residual is not None:
        return np.array([0.0 if rng is None else 1.0], np.float32)
    shape = (n, *([1] * max(probe.rank - 2, 0)), probe.width)
    return np.zeros(shape, np.float32) if rng is None else rng.standard_normal(shape).astype(np.float32)
