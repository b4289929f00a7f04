"""Activation-aware low-rank decomposition (``lowrank``): a layer becomes two, through the principal subspace of its outputs.

A weighted layer ``Y = X W + b`` (a Conv with group 1, a Gemm, a MatMul by a constant weight;
``W [D, O]`` on rows, ``D`` = input channels x kernel taps) is replaced by ``r`` channels in between::

    Y ~ (X A) B + b',   A = W U_r [D, r],   B = U_r^T [r, O],   b' = b + mx W (I - U_r U_r^T)

with ``U_r`` the top ``r`` eigenvectors of the covariance of the layer's calibrated outputs,
``C = cov(X W) = W^T S W`` (``S`` the centred covariance of the input rows, im2col patches at
sampled positions for a Conv, from the statistics the selection methods already stream:
`datadriven.input_covariances`, one `calib.statistic.SampledGrams` stage of one pass per chunk,
bounded memory). The bias correction ``b'`` puts the mean of the discarded directions back, so the output
error is ``(X - mx) W (I - U_r U_r^T)``, whose energy is exactly the discarded eigenvalues:
``||err||^2 / n = sum_{i > r} lambda_i``. A layer with no per-output bias (a MatMul without a
following Add) uses the uncentred second moment ``S + mx mx^T`` instead, and needs no correction.
This is LDRF's decomposition (Chen et al., AAAI 2019) kept as two layers, as in ASVD (Yuan et al.
2023), SVD-LLM (Wang et al. 2024) and BALF (2025).

SVD-LLM's whitening form, ``W' = L^-T [L^T W]_r`` with ``S = L L^T`` and ``[.]_r`` the truncated
SVD, is the same matrix: the right singular vectors of ``L^T W`` are the eigenvectors of
``W^T L L^T W = C``, so ``L^T W U_r U_r^T = [L^T W]_r`` and both are the best rank-``r``
approximation in ``||X (W - W')||``. The projection form needs no inverse of ``L`` (``S`` is
often singular: dead channels, more columns than rows) and gives an orthonormal second factor;
`tests/test_lowrank.py` checks the two agree.

A Conv with a ``k x k`` kernel becomes a ``k x k`` Conv to ``r`` channels (its own strides, pads
and dilations) and a ``1 x 1`` Conv; a Gemm becomes a MatMul to ``r`` features and the Gemm (its
alpha, beta and C); a MatMul becomes two MatMuls (a following bias Add stays on the second). The
second layer keeps the original node's name and output, so names, dtypes and shapes of the graph's
inputs and outputs never change.

Ranks. Layer ``l`` costs ``P_l D_l O_l`` MACs whole and ``P_l r (D_l + O_l)`` decomposed, so it is
decomposed only at ranks with ``r (D + O) < D O``; ranks are multiples of the kernels' channel
block (``--round-to``: the CPU's block with ``auto``, `roundto`), at least ``(1 - max_ratio)`` of
``min(D, O)``. Its predicted damage at rank ``r`` is the relative discarded energy
``d_l(r) = sum_{i > r} lambda_i / sum_i lambda_i``. Starting from the original, the allocation
takes, greedily, the step with the least damage per MAC saved (a layer's first step goes to the
largest rank that saves MACs, each next one a block lower) until the model's MACs reach
``--target-macs`` (else ``1 - --ratio``). With calibration data and ``--reconstruct`` (the
default), the second layer of every decomposition is then refitted by least squares to the
original's output of the layer, from the decomposed network's own inputs, level by level
(`reconstruct.Reconstructor`: errors are corrected, not accumulated).

Mixed allocation (channel removal or rank, at equal MACs): `methods.budget` ranks classes of groups
by score per cost; a decomposition is one more kind of candidate step, ``(layer, rank)`` with cost
``P (D O - r (D + O))`` and damage ``d_l(r)`` in the same units as a group's closed-form
reconstruction error, so one priority queue over both (per step: damage / MACs saved) decides per
layer, with a layer that loses input channels taking its rank steps on the reduced ``D``.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..judge import validate
from ..channels import Kind
from ..calib.threads import blas_limited
from ..graph import edit, qdq
from .base import Context, LowRankParams, Options, MethodOutcome
from .defaults import model_kind
from ..roundto import Rounding
from . import reconstruct as rc
from .datadriven import input_covariances, layer_covariance, need_calibration
from ..analysis.plan import Plan

log = logging.getLogger(__name__)

#: the MACs a decomposition's steps compare against are met within this fraction of the model's
TOLERANCE = 1e-9


@dataclass(frozen=True, eq=False)
class Candidate:
    """A layer that could be decomposed: its spectrum, its cost and the ranks it may take."""

    layer: rc.Layer
    w: np.ndarray  # [D, O], float64
    bias: np.ndarray | None  # [O]; None: no per-output bias (uncentred statistics)
    mean: np.ndarray  # [D] input mean (zeros with uncentred statistics)
    scale: np.ndarray  # [O] output channel scales the spectrum is measured in (`OutputMetric`)
    values: np.ndarray  # eigenvalues of the output covariance, descending, >= 0
    vectors: np.ndarray  # [O, first]: the eigenvectors of the ranks that may be chosen
    macs: int  # undecomposed
    multiple: int  # ranks are multiples of it
    floor: int  # the least rank
    first: int  # the largest rank that saves MACs

    @property
    def dims(self) -> tuple[int, int]:
        return int(self.w.shape[0]), int(self.w.shape[1])

    def macs_at(self, rank: int | None) -> float:
        d, o = self.dims
        return float(self.macs) if rank is None else self.macs * rank * (d + o) / (d * o)

    def damage(self, rank: int | None) -> float:
        """Relative output energy discarded at `rank` (0 undecomposed)."""
        total = float(self.values.sum())
        if rank is None or total <= 0:
            return 0.0
        return float(self.values[rank:].sum()) / total

    def next_rank(self, rank: int | None) -> int | None:
        """The allocation's next step from `rank` (None: no lower rank allowed)."""
        if rank is None:
            return self.first
        lower = rank - self.multiple
        return lower if lower >= self.floor else None


@dataclass(frozen=True, eq=False)
class Decomposition:
    """One layer's rewrite: ``Y = (X A) B + bias`` (``A [D, r]``, ``B [r, O]``; bias None: unchanged)."""

    node: str
    kind: Kind
    a: np.ndarray
    b: np.ndarray
    bias: np.ndarray | None
    damage: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


# ----------------------------------------------------------------------------- candidates


def rank_multiple(rounding: Rounding) -> int:
    """Ranks are a new channel count: a multiple of the block (``auto``) or of ``--round-to N``."""
    return max(1, rounding.multiple)


def first_rank(d: int, o: int, multiple: int) -> int:
    """The largest multiple of `multiple` with ``r (d + o) < d o`` (0 when none)."""
    most = (d * o - 1) // (d + o)
    return most // multiple * multiple


def least_rank(d: int, o: int, multiple: int, max_ratio: float) -> int:
    """At least ``(1 - max_ratio) min(d, o)``, rounded up to the multiple, and one multiple."""
    least = int(np.ceil((1.0 - max_ratio) * min(d, o) - 1e-9))
    return max(multiple, -(-least // multiple) * multiple)


def _weighted_nodes(ctx: Context) -> list[tuple[gs.Node, rc.Layer]]:
    """Decomposable layers: traced Conv (group 1), Gemm, MatMul with float, unquantized constant weights, reading
    a computed tensor (not a graph input: a stem conv on the image is cheap and rank-starved anyway)."""
    out = []
    inputs = {t.name for t in ctx.graph.inputs}  # the statistics pass reads node outputs only
    for node in ctx.graph.nodes:
        kind = ctx.trace.node_kind.get(node.name)
        if kind not in rc.FITTED_KINDS or any(fnmatchcase(node.name, p) for p in ctx.options.exclude):
            continue
        layer = rc.layer_of(node, kind)
        weight = ir.input_const(node, 1)
        if layer is None or weight is None or not np.issubdtype(weight.dtype, np.floating) or layer.x in inputs:
            continue
        if qdq.scheme_of(node.inputs[1]) is not None:
            continue  # a quantized weight: its factors would need a scheme of their own
        if layer.y not in ctx.trace.shapes or layer.x not in ctx.trace.shapes:
            continue
        out.append((node, layer))
    return out


class OutputMetric(str, Enum):
    """The norm a layer's output error is measured (and minimised) in."""

    #: ``||E||^2``: the output covariance as it is (the discarded eigenvalue energy)
    ENERGY = "energy"
    #: ``||E D^-1||^2`` with ``D`` the output channels' standard deviations: every channel counts alike, so a few
    #: high-variance channels (the outlier dimensions of a transformer's residual stream) do not own the subspace
    CHANNEL = "channel"


def output_scale(variances: np.ndarray, metric: OutputMetric) -> np.ndarray:
    """Per output channel, the scale `metric` divides it by, from the outputs' `variances` (the diagonal of ``C``;
    ones for `OutputMetric.ENERGY`)."""
    if metric is OutputMetric.ENERGY:
        return np.ones(variances.shape[0])
    std = np.sqrt(np.clip(variances, 0.0, None))
    return np.maximum(std, 1e-6 * max(float(std.max(initial=0.0)), 1e-30))


def output_spectrum(s: np.ndarray, w: np.ndarray, metric: OutputMetric, first: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`metric`'s per-output scale, the eigenvalues (descending, >= 0) of the scaled output covariance
    ``C = diag(1/scale) W^T S W diag(1/scale)`` and its first `first` eigenvectors ``[O, first]``.

    A layer with more outputs than inputs (a language model's logits: 576 -> 49,152) never forms the ``O x O``
    matrix (19 GB there): with ``S = L L^T`` and ``M = L^T W diag(1/scale)`` (``D x O``), ``C = M^T M`` has the
    eigenvalues of ``M M^T`` (``D x D``; the other ``O - D`` are 0) and the eigenvectors ``M^T p_i / sqrt(l_i)``
    (orthonormalised, so directions of no energy complete them)."""
    d, o = w.shape
    if o <= d:
        c = w.T @ s @ w
        scale = output_scale(np.diag(c), metric)
        c = c / np.outer(scale, scale)
        values, vectors = np.linalg.eigh((c + c.T) / 2)
        return scale, values[::-1].clip(min=0.0), np.ascontiguousarray(vectors[:, ::-1][:, :first])
    # diag(W^T S W) without the matrix (ENERGY does not read it)
    scale = output_scale(np.ones(o) if metric is OutputMetric.ENERGY else np.einsum("do,do->o", w, s @ w), metric)
    lam, v = np.linalg.eigh((s + s.T) / 2)
    m = (v * np.sqrt(lam.clip(min=0.0))).T @ (w / scale)
    values, p = np.linalg.eigh(m @ m.T)
    values, p = values[::-1].clip(min=0.0), p[:, ::-1]
    vectors, _ = np.linalg.qr(m.T @ p[:, :first])
    return scale, values, np.ascontiguousarray(vectors)


def candidates(ctx: Context, rounding: Rounding, max_ratio: float, metric: OutputMetric = OutputMetric.ENERGY) -> list[Candidate]:
    """Every layer that can save MACs by decomposition, with the spectrum of its calibrated outputs."""
    multiple = rank_multiple(rounding)
    found: list[tuple[gs.Node, rc.Layer, rc.Affine, int]] = []
    for node, layer in _weighted_nodes(ctx):
        affine = rc.read_affine(node, layer.kind)
        d, o = affine.w.shape
        first = first_rank(d, o, multiple)
        if first < least_rank(d, o, multiple, max_ratio):
            continue
        y_shape = ctx.trace.shapes[layer.y]
        macs = int(np.prod(y_shape, dtype=np.int64)) // max(o, 1) * d * o
        if macs > 0:
            found.append((node, layer, affine, first))
    if not found:
        return []
    cov = input_covariances(ctx, [layer for _n, layer, _a, _f in found])
    out = []
    with blas_limited():
        for node, layer, affine, first in found:
            s, mean = layer_covariance(cov, layer)
            if affine.b is None:  # no bias to absorb the mean: the uncentred second moment
                s, mean = s + np.outer(mean, mean), np.zeros_like(mean)
            w = affine.w
            scale, values, vectors = output_spectrum(s, w, metric, first)
            d, o = w.shape
            out.append(Candidate(layer, w, affine.b, np.asarray(mean, dtype=np.float64), scale, values,
                                 vectors, int(np.prod(ctx.trace.shapes[layer.y],
                                 dtype=np.int64)) // o * d * o, multiple, least_rank(d, o, multiple, max_ratio), first))
    return out


# ----------------------------------------------------------------------------- allocation


def allocate(cands: Sequence[Candidate], needed: float) -> dict[int, int]:
    """Candidate index -> rank, the least predicted damage per MAC saved first, until `needed` MACs are saved."""
    ranks: dict[int, int] = {}
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        current = ranks.get(i)
        nxt = cands[i].next_rank(current)
        if nxt is None:
            return
        saved = cands[i].macs_at(current) - cands[i].macs_at(nxt)
        cost = cands[i].damage(nxt) - cands[i].damage(current)
        heapq.heappush(heap, (max(cost, 0.0) / max(saved, 1e-30), i, nxt))

    for i in range(len(cands)):
        push(i)
    saved = 0.0
    while heap and saved < needed:
        _, i, rank = heapq.heappop(heap)
        saved += cands[i].macs_at(ranks.get(i)) - cands[i].macs_at(rank)
        ranks[i] = rank
        push(i)
    return ranks


def decomposition(cand: Candidate, rank: int) -> Decomposition:
    """The factors of `cand` at `rank` (module docstring): ``A = W D^-1 U_r``, ``B = U_r^T D`` (``D = diag(scale)``)."""
    u = cand.vectors[:, :rank]
    a = (cand.w / cand.scale) @ u
    b = u.T * cand.scale
    bias = None
    if cand.bias is not None:
        through = cand.mean @ cand.w
        bias = cand.bias + through - ((through / cand.scale) @ u) @ b
    return Decomposition(cand.layer.node, cand.layer.kind, a, np.ascontiguousarray(b), bias, cand.damage(rank))


# ----------------------------------------------------------------------------- rewriting


def rewrite(graph: gs.Graph, d: Decomposition) -> None:
    """Split `d.node` in two (module docstring); the node itself becomes the second layer."""
    node = ir.node_by_name(graph)[d.node]
    weight = ir.input_const(node, 1)
    assert weight is not None
    dtype = weight.dtype
    x = node.inputs[0]
    first = edit.fresh_name(graph, f"{d.node}_lowrank")
    hidden = edit.make_variable(edit.fresh_name(graph, f"{first}_out"), x.dtype if x.dtype is not None else dtype)
    factor = edit.make_constant(edit.fresh_name(graph, f"{first}_weight"), _first_weight(node, d).astype(dtype))
    if d.kind == Kind.CONV:
        attrs = {k: v for k, v in node.attrs.items()}
        edit.insert_node_before(graph, node, "Conv", first, [x, factor], [hidden], attrs)
        spatial = weight.ndim - 2
        edit.remove_attrs(node, "auto_pad")
        edit.set_attr(node, "kernel_shape", [1] * spatial)
        edit.set_attr(node, "strides", [1] * spatial)
        edit.set_attr(node, "dilations", [1] * spatial)
        edit.set_attr(node, "pads", [0] * (2 * spatial))
        edit.set_input_const(node, 1, d.b.T.reshape((d.b.shape[1], d.rank, *([1] * spatial))))
    else:
        edit.insert_node_before(graph, node, "MatMul", first, [x, factor], [hidden])
    edit.replace_input(node, 0, hidden)
    rc.write_affine(graph, node, d.kind, d.b, d.bias)


def _first_weight(node: gs.Node, d: Decomposition) -> np.ndarray:
    """``A`` in the first layer's layout: ``[r, C_in, k...]`` for a Conv, ``[D, r]`` for a MatMul."""
    if d.kind != Kind.CONV:
        return d.a
    weight = ir.input_const(node, 1)
    assert weight is not None
    return d.a.T.reshape((d.rank, *weight.shape[1:]))


@dataclass(frozen=True, eq=False)
class Decomposer:
    """``finish`` step: every planned decomposition written into the model, then the optional refit."""

    decompositions: tuple[Decomposition, ...]
    refit: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        graph = ir.to_graph(model)
        for d in self.decompositions:
            rewrite(graph, d)
        edit.forget_inner_shapes(graph)
        out = ir.to_model(graph, like=model)
        return out if self.refit is None else self.refit(out)


# ----------------------------------------------------------------------------- the method


def lowrank(ctx: Context) -> MethodOutcome:
    """Activation-aware low-rank decomposition to the MACs target (module docstring)."""
    need_calibration(ctx, "lowrank")
    params = ctx.params
    assert isinstance(params, LowRankParams)
    target = params.target_macs if params.target_macs is not None else 1.0 - ctx.options.ratio
    rounding = Rounding.of(ctx.options.round_to)
    total = validate.model_stats(ctx.model, ctx.input_shapes).macs
    cands = candidates(ctx, rounding, params.max_ratio, OutputMetric(params.lowrank_metric))
    needed = total * (1.0 - target) - TOLERANCE * total
    ranks = allocate(cands, needed)
    decompositions = tuple(decomposition(cands[i], r) for i, r in sorted(ranks.items()))
    planned = total - sum(cands[i].macs - cands[i].macs_at(r) for i, r in ranks.items())
    notes = [f"lowrank: {len(decompositions)} of {len(cands)} decomposable layers split in two (ranks multiples of "
             f"{rank_multiple(rounding)}), planned MACs {planned / max(total, 1):.3f} of the original"]
    if planned > total * target * (1 + 1e-6):
        notes.append(f"lowrank: the MACs target {target:g} is out of reach by decomposition alone "
                     f"(every layer at its least rank: {planned / max(total, 1):.3f})")
    for d in decompositions:
        log.info("lowrank: %s rank %d (%s -> %d -> %s), predicted relative damage %.4f", d.node, d.rank,
                 d.a.shape[0], d.rank, d.b.shape[1], d.damage)
    for line in notes:
        log.info("%s", line)
    if not decompositions:
        return MethodOutcome(Plan(()), notes=tuple(notes))
    refit = None
    if rc.wants_reconstruction(ctx):
        settings = rc.Settings.from_params(params, ctx.options.batch_size, ctx.options.seed, kind=model_kind(ctx.model))
        refit = rc.Reconstructor(ctx.model, ctx.trace, Plan(()), ctx.calibration, tuple(d.node for d in decompositions),
                                 settings, ctx.progress)
    return MethodOutcome(Plan(()), notes=tuple(notes), finish=Decomposer(decompositions, refit))


def ignored(options: Options) -> list[str]:
    """Settings of channel methods that decomposition does not read."""
    params = options.params
    unused = [flag for key, flag in (("target_params", "--target-params"), ("heads", "--heads"), ("ffn", "--ffn"),
                                     ("hidden", "--hidden")) if params.get(key) is not None]
    if unused:
        return [f"--method lowrank plans ranks for --target-macs (else 1 - --ratio); {', '.join(unused)} are ignored"]
    return []
