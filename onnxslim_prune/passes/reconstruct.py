"""Least-squares reconstruction of the consumers of pruned channels from calibration data.

After channels are removed, every *consumer* of a pruned group (a Conv with ``group=1``, a
Gemm, or a MatMul with a constant weight) is refitted so that its output matches the
ORIGINAL model's output of that layer, while its input is taken from the ALREADY PRUNED
(and already refitted) network::

    X' = rows of the layer input in the pruned network      (im2col patches at P sampled
                                                              positions per image for a Conv)
    Y  = rows of the layer output in the original network  (the kept output channels)
    W0 = the original weights sliced to the kept input and output channels: plain pruning

    [W', b'] = argmin ||X' W' + 1 b'^T - Y||^2 / n + lam ||W' - W0||^2
             : W' = (S_xx + lam I)^-1 (S_xy + lam W0),   b' = mean(Y) - mean(X') W'

with the centred moments ``S_xx = X'^T X' / n - mx mx^T``, ``S_xy = X'^T Y / n - mx my^T``
accumulated in float64 over streamed batches (``calib.GramAccumulator``; nothing but one
batch of activations is ever held). The ridge shrinks toward plain pruning, not toward zero,
and its strength follows how well the solve is determined by its rows::

    lam = alpha * trace(S_xx) / dim,    alpha = ridge + c * dim / n

``dim`` is the number of input columns (kept input channels x kernel taps), ``n`` the sampled
rows, ``ridge`` the user's base alpha (``params["ridge"]``, `DEFAULT_RIDGE`) and ``c`` =
`DEFAULT_RIDGE_ROWS`. ``trace(S_xx) / dim`` is the mean input variance, so ``alpha`` is
dimensionless; ``dim / n`` is the classical variance factor of a least-squares fit (the
Bayes-optimal ridge for a Gaussian prior ``W - W0 ~ N(0, tau^2)`` is ``sigma^2 / (n tau^2)``,
i.e. ``alpha = (dim / n) / SNR`` with SNR the ratio of the correction's output variance to the
residual noise variance: ``c`` stands for ``1 / SNR`` and was chosen by measurement, see
`DEFAULT_RIDGE_ROWS` and benchmarks/results/ridge.md). With plentiful rows (ResNet-56 at
ratio 0.5 with 2,000 images: 32,000 rows for at most 288 columns of a Conv, 2,000 for the 32 of
the classifier; ``alpha <= 0.005``) the refit is the least-squares one of before; with fewer rows than unknowns ``alpha > c`` and the layer stays
close to plain pruning: as ``lam -> inf``, ``W' -> W0`` exactly, and as ``lam -> 0`` it is the
unregularised refit. The rows of a Conv are ``P`` positions of each image, correlated, so
``n`` overstates the independent samples; ``c`` absorbs that too.

The intercept is not penalised: ``b' = mean(Y) - mean(X') W'`` in every case, so as
``lam -> inf`` the layer is plain pruning with its bias corrected for the mean shift of its
output (``b' = b0 + mean(Y - X' W0 - b0)``: the mean of plain pruning's error removed). A
Conv or Gemm without a bias gets one, a MatMul's bias is the constant operand of the Add
that follows it (without one it is fitted through the origin: uncentred moments, ``b' = 0``,
and then ``lam -> inf`` is plain pruning exactly). A reconstruction in which some layer has
fewer sampled rows than unknowns (``dim`` plus the intercept) logs one warning, also returned
as a note for the report (`rows_note`).

Layers are fitted in topological order, level by level (a level holds the consumers whose
inputs do not depend on one another), so each layer compensates the error of everything
pruned and refitted before it and errors do not accumulate: the sequential scheme of He,
Zhang and Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV 2017,
eq. 1 and section 3.3) and of the layer-wise reconstruction in Luo, Wu and Lin, "ThiNet"
(ICCV 2017). For a layer whose output goes straight into a residual Add, the target is
``Y = Add_original - other_operand_pruned`` (He et al. 2017, section 3.3, multi-branch
networks), so the branch also absorbs the error of the shortcut.

``mode="ldrf"`` (Chen et al., "Layer Decomposition-Recomposition Framework for Neuron
Pruning towards Accurate Lightweight Networks", AAAI 2019): the layer is decomposed into
an embedding onto the principal subspace ``U`` (top eigenvectors of the original output
covariance holding ``energy`` of its variance, ``W = W U U^T``); the embedding is solved
in closed form from the surviving channels of the pruned network and recomposed into the
layer, ``W' = A U^T``, so no extra layer remains in the output model. With the ridge the
target is the recomposed embedding ``(Y - my) U U^T`` and the prior is the whole ``W0``::

    W' = argmin ||X' W - (Y - my) U U^T||^2 / n + lam ||W - W0||^2 = (S_xx + lam I)^-1 (S_xy U U^T + lam W0)

Since ``U^T U = I`` this splits into the embedding ``A = W' U = argmin ||X' A - (Y - my) U||^2 / n
+ lam ||A - W0 U||^2`` (the prior of the embedding: ``W0`` projected) and the minor directions
``W' (I - U U^T) = lam (S_xx + lam I)^-1 W0 (I - U U^T)``, which go from plain pruning's to zero
as rows grow. So ``lam -> 0`` is LDRF as before (``W_ls U U^T``) and ``lam -> inf`` is plain
pruning ``W0`` exactly. The alternative prior ``W0 U U^T`` (``W0`` projected everywhere) was
measured and rejected: ``U`` estimated from ``n`` rows has rank below ``n``, and projecting
plain pruning onto it cost LeNet-300-100 at ratio 0.5 with 16 samples 16 points of test
accuracy (58.6% against 74.8% without refit, at c = 1; this prior: 79.2% at c = 1, 80.3% at
the default c; benchmarks/bench_ridge.py).

Depthwise and grouped convolutions, ConvTranspose and 3-D convolutions are not refitted
(they are sliced exactly; a note says so).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import scipy.linalg

from .. import ir
from ..channels import Kind, Role, Trace
from ..calib import GramAccumulator, conv_output_size, conv_patches, expose_tensors, output_rows, sample_positions
from ..calib import stream_tensors
from ..calib.engine import StagedPasses
from ..calib.memory import FRONTIER_SHARE, RUN_SHARE, calibration_budget, give_back
from ..calib.threads import blas_limited
from ..errors import ModelError
from ..methods.base import CommonParams, Context, Outcome
from ..ops.registry import Affine, rule_of
from .plan import Plan

log = logging.getLogger(__name__)

#: sampled output positions per image for the Gram matrices of a Conv (``--calib-positions``)
DEFAULT_POSITIONS = 16
#: base ridge alpha, relative to the mean input variance (``params["ridge"]``; module docstring)
DEFAULT_RIDGE = CommonParams.ridge
#: ``c`` of ``alpha = ridge + c * dim / rows``: how hard a solve with few rows per unknown is
#: pulled toward plain pruning (module docstring). Measured (benchmarks/results/ridge.md, ratio
#: 0.5, 16 to 2,000 samples, ldrf and thinet): 0.3 and 1 are a flat optimum (ResNet-56 within 0.15
#: points of each other from 64 samples on; with 16, 0.3 leads by 0.3 to 0.6 on ResNet-56 and by
#: 1.1 on LeNet-300-100 ldrf); 0.1 loses 2.5 to 3.6 points on ResNet-56 with 16 samples, 3 loses
#: up to 3.2. With 0.3 every small-sample run beats no refit, and at 2,000 samples ResNet-56 ldrf
#: is 92.60% (92.57% before).
DEFAULT_RIDGE_ROWS = 0.3
#: LDRF: fraction of the output variance the embedding keeps (``params["energy"]``)
DEFAULT_ENERGY = CommonParams.energy
#: most bytes of Gram matrices held at once while collecting selection statistics
DEFAULT_GRAM_BUDGET = 1 << 30
#: most bytes of one batch's exposed layer inputs in one selection statistics pass
DEFAULT_EXPOSED_BUDGET = 128 << 20

Progress = Callable[[int, int], None]
FITTED_KINDS = (Kind.CONV, Kind.GEMM, Kind.MATMUL)


# ----------------------------------------------------------------------------- layer geometry


@dataclass(frozen=True)
class Layer:
    """A weighted node seen as ``Y = X W + b`` on rows: its tensors and its im2col geometry."""

    node: str
    kind: Kind  # CONV, GEMM or MATMUL
    x: str  # input tensor
    y: str  # output tensor
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def taps(self) -> int:
        """Columns per input channel (kernel elements; 1 for Gemm / MatMul)."""
        return int(np.prod(self.kernel)) if self.kind == Kind.CONV else 1

    def conv_pads(self, spatial: Sequence[int]) -> tuple[int, ...]:
        if self.auto_pad in ("", "NOTSET"):
            return self.pads or (0,) * (2 * len(spatial))
        if self.auto_pad == "VALID":
            return (0,) * (2 * len(spatial))
        begins, ends = [], []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if self.auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return (*begins, *ends)

    def positions(self, x_shape: Sequence[int], count: int | None, rng: np.random.Generator) -> np.ndarray | None:
        """Sampled output positions ``[N, P]`` of a Conv (None: every row, Gemm / MatMul)."""
        if self.kind != Kind.CONV:
            return None
        spatial = tuple(int(d) for d in x_shape[2:])
        out = conv_output_size(spatial, self.kernel, self.strides, self.conv_pads(spatial), self.dilations)
        return sample_positions(int(x_shape[0]), int(np.prod(out)), count, rng)

    def x_rows(self, x: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        if self.kind != Kind.CONV:
            return x.reshape(-1, x.shape[-1])
        pads = self.conv_pads(x.shape[2:])
        return conv_patches(x, self.kernel, self.strides, pads, self.dilations, positions=index)

    def y_rows(self, y: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        if self.kind != Kind.CONV:
            return y.reshape(-1, y.shape[-1])
        return output_rows(y, index)


def layer_of(node: gs.Node, kind: Kind | None) -> Layer | None:
    """The `Layer` of a traced Conv (group 1, 1-D or 2-D), Gemm or MatMul; None if unsupported."""
    x, y = node.inputs[0], node.outputs[0]
    if kind == Kind.CONV:
        weight = ir.input_const(node, 1)
        if weight is None or weight.ndim not in (3, 4) or int(ir.attr(node, "group", 1)) != 1:
            return None
        rank = weight.ndim - 2
        kernel = tuple(int(k) for k in weight.shape[2:])
        return Layer(
            node.name, kind, x.name, y.name, kernel,
            tuple(int(s) for s in ir.attr(node, "strides", [1] * rank)),
            tuple(int(p) for p in ir.attr(node, "pads", [0] * (2 * rank))),
            tuple(int(d) for d in ir.attr(node, "dilations", [1] * rank)),
            str(ir.attr(node, "auto_pad", "NOTSET") or "NOTSET"),
        )
    if kind in (Kind.GEMM, Kind.MATMUL):
        return Layer(node.name, kind, x.name, y.name)
    return None


# ----------------------------------------------------------------------------- weights as matrices


def read_affine(node: gs.Node, kind: Kind) -> Affine:
    """The layer as ``Y = X W + b`` (its op rule's `read_affine`; Gemm alpha and beta folded in), float64."""
    rule = rule_of(node)
    affine = None if rule is None else rule.read_affine(node, kind)
    if affine is None:
        raise ModelError(f"{node.name}: cannot read a {kind} layer as a matrix")
    return affine


def write_affine(graph: gs.Graph, node: gs.Node, kind: Kind, w: np.ndarray, b: np.ndarray | None) -> None:
    """Store ``W [dim_x, dim_y]`` and bias ``b`` back into `node` (the inverse of `read_affine`)."""
    rule = rule_of(node)
    if rule is None:
        raise ModelError(f"{node.name}: cannot write a {kind} layer")
    rule.write_affine(node, kind, w, b)


# ----------------------------------------------------------------------------- solving


def centred(acc: GramAccumulator) -> tuple[np.ndarray, np.ndarray | None]:
    """``(S_xx, S_xy)``: centred second moments per row (``S_xy`` None without targets)."""
    n = max(acc.count, 1)
    mx = acc.sum_x / n
    sxx = acc.xtx / n - np.outer(mx, mx)
    if acc.xty is None or acc.sum_y is None:
        return sxx, None
    return sxx, acc.xty / n - np.outer(mx, acc.sum_y / n)


def ridge_alpha(ridge: float, dim: int, rows: int | None, per_row: float) -> float:
    """``alpha = ridge + per_row * dim / rows`` (just ``ridge`` when `rows` is None or `per_row` 0)."""
    if rows is None or per_row == 0.0:
        return ridge
    return ridge + per_row * dim / max(rows, 1)


def ridge_lambda(sxx: np.ndarray, ridge: float, rows: int | None = None, per_row: float = 0.0) -> float:
    """``lam = alpha * trace(S_xx) / dim`` with ``alpha`` = `ridge_alpha` (module docstring)."""
    dim = max(sxx.shape[0], 1)
    alpha = ridge_alpha(ridge, dim, rows, per_row)
    scale = float(np.trace(sxx)) / dim
    return alpha * scale if scale > 0 else alpha


def solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^-1 b`` for a symmetric positive (semi-)definite ``a``; least squares if singular."""
    try:
        with warnings.catch_warnings():  # ill-conditioned: solve by least squares, say nothing on stderr
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            return np.asarray(scipy.linalg.solve(a, b, assume_a="pos", check_finite=False))
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
        return np.asarray(scipy.linalg.lstsq(a, b, check_finite=False)[0])


def principal_projector(cov: np.ndarray, energy: float) -> np.ndarray:
    """``U U^T`` onto the top eigenvectors of ``cov`` holding `energy` of its trace."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    values, vectors = values[::-1].clip(min=0.0), vectors[:, ::-1]
    total = float(values.sum())
    if total <= 0:
        return np.eye(cov.shape[0])
    rank = int(np.searchsorted(np.cumsum(values) / total, energy - 1e-12) + 1)
    u = vectors[:, : min(rank, values.size)]
    return u @ u.T


def fit(
    acc: GramAccumulator, intercept: bool, ridge: float, energy: float | None, prior: np.ndarray | None = None,
    per_row: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` minimising ``||X W + b - Y||^2 / n + lam ||W - prior||^2`` (b = 0 without intercept).

    ``lam = ridge_lambda(S_xx, ridge, n, per_row)``; `prior` None shrinks toward zero. An
    infinite ``lam`` returns `prior` itself. With `energy` (LDRF) the target is first projected
    on its principal subspace: ``W = (S_xx + lam I)^-1 (S_xy U U^T + lam prior)``.
    """
    assert acc.xty is not None and acc.sum_y is not None
    n = max(acc.count, 1)
    my = acc.sum_y / n
    if intercept:
        sxx, sxy = centred(acc)
        assert sxy is not None
        mx = acc.sum_x / n
    else:
        sxx, sxy = acc.xtx / n, acc.xty / n
        mx = np.zeros(acc.dim_x)
    if energy is not None and energy < 1.0 and acc.yty is not None and acc.full_yty:
        cov_y = acc.yty / n - (np.outer(my, my) if intercept else 0.0)
        sxy = sxy @ principal_projector(cov_y, energy)  # LDRF: the target is the recomposed embedding
    lam = ridge_lambda(sxx, ridge, acc.count, per_row)
    if not np.isfinite(lam):
        w = np.zeros_like(sxy) if prior is None else np.array(prior, dtype=np.float64)
    else:
        rhs = sxy if prior is None else sxy + lam * np.asarray(prior, dtype=np.float64)
        w = solve_spd(sxx + lam * np.eye(sxx.shape[0]), rhs)
    b = my - mx @ w if intercept else np.zeros(w.shape[1])
    return w, b


def unknowns(dim_x: int, intercept: bool) -> int:
    """Unknowns per output of a refit: its input columns, plus the intercept."""
    return dim_x + int(intercept)


def rows_note(short: Sequence[tuple[str, int, int, bool]], total: int) -> str | None:
    """The one warning for layers with fewer sampled rows than unknowns, or None.

    `short` holds ``(node, rows, unknowns, more_positions_help)`` of those layers; `total` is
    the number of refitted layers.
    """
    if not short:
        return None
    node, rows, count, _ = min(short, key=lambda s: (s[1] / max(s[2], 1), s[0]))
    more = "more calibration samples" + (" or --calib-positions" if any(s[3] for s in short) else "")
    return (
        f"reconstruction: {len(short)} of {total} layers have fewer sampled rows than unknowns "
        f"(worst: {rows:,} rows for {count:,} unknowns at {node}); the refit is pulled toward "
        f"plain pruning there (give {more})"
    )


# ----------------------------------------------------------------------------- streaming helpers


class RowBuffer:
    """Rows held until `rows` are pending, then added to a `GramAccumulator` in one product.

    A Gram update costs ``rows * dim^2`` but also streams the whole ``dim^2`` matrix through
    memory: with a handful of rows per batch (static batch 1, few sampled positions) the
    update is memory-bound. Pending rows are bounded by `rows` (independent of the sample count).
    """

    def __init__(self, acc: GramAccumulator, rows: int = 256) -> None:
        self.acc = acc
        self.rows = rows
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._pending = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        self._x.append(np.asarray(x))
        if y is not None:
            self._y.append(np.asarray(y))
        self._pending += int(x.shape[0])
        if self._pending >= self.rows:
            self.flush()

    def flush(self) -> GramAccumulator:
        if self._pending:
            x = self._x[0] if len(self._x) == 1 else np.concatenate(self._x)
            y = None if not self._y else (self._y[0] if len(self._y) == 1 else np.concatenate(self._y))
            self.acc.update(x, y)
            self._x, self._y, self._pending = [], [], 0
        return self.acc



def subgraph_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` computing only `names` (as its graph outputs); inputs are kept."""
    wanted = list(dict.fromkeys(names))
    # the graph without weights is exposed and cut; only the weights the cut reads are copied into it
    # (a copy of the whole model first would hold every weight twice while the cut is made)
    exposed = expose_tensors(ir.without_initializers(model), wanted, types_of=model)
    graph = exposed.graph
    outputs = {vi.name: vi for vi in graph.output}
    del graph.output[:]
    graph.output.extend(outputs[n] for n in wanted)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed: set[int] = set()
    stack = [producer[n] for n in wanted if n in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[t] for t in graph.node[i].input if t in producer)
    nodes = [n for i, n in enumerate(graph.node) if i in needed]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    return exposed


def stream(
    model: onnx.ModelProto, calib: Any, names: Sequence[str], batch_size: int, progress: Progress | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """``calib.stream_tensors`` over the smallest subgraph that computes `names`."""
    return stream_tensors(subgraph_model(model, names), calib, list(names), batch_size=batch_size, progress=progress)


def progress_steps(progress: Progress | None, total: int) -> Callable[[], None]:
    """A step callback reporting ``(done, total)`` to `progress`."""
    state = {"done": 0}

    def step() -> None:
        state["done"] += 1
        if progress is not None:
            progress(min(state["done"], total), total)

    return step


# ----------------------------------------------------------------------------- consumers of a plan


def kept_positions(trace: Trace, plan: Plan, tensor: str) -> np.ndarray | None:
    """Kept positions of `tensor`'s channel axis (None: untraced or intact)."""
    cmap = trace.maps.get(tensor)
    if cmap is None:
        return None
    mask = plan.atom_keep(trace)[cmap.atoms]
    return None if mask.all() else np.flatnonzero(mask)


def plan_consumers(trace: Trace, graph: gs.Graph, plan: Plan) -> tuple[list[str], list[str]]:
    """(nodes to refit in graph order, notes on consumers that are not refitted)."""
    pruned_groups = {g.group for g in plan.groups if g.pruned}
    wanted: set[str] = set()
    notes: list[str] = []
    for group in trace.groups:
        if group.index not in pruned_groups:
            continue
        for m in group.members:
            kind = trace.node_kind.get(m.node)
            if m.role == Role.IN and kind in FITTED_KINDS:
                wanted.add(m.node)
            elif m.role in (Role.IN, Role.DEPTHWISE) and kind in (Kind.DEPTHWISE, Kind.GROUPED, Kind.CONV_TRANSPOSE):
                notes.append(f"reconstruct: {kind} {m.op} {m.node} is sliced, not refitted")
    nodes = ir.node_by_name(graph)
    order = [n.name for n in graph.nodes if n.name in wanted]
    refit = []
    for name in order:
        node = nodes[name]
        if layer_of(node, trace.node_kind[name]) is None:
            notes.append(f"reconstruct: {node.op} {name} (not a 1-D/2-D group-1 conv) is sliced, not refitted")
        else:
            refit.append(name)
    return refit, list(dict.fromkeys(notes))


# ----------------------------------------------------------------------------- the finish step


@dataclass(frozen=True)
class Settings:
    positions: int | None = DEFAULT_POSITIONS
    ridge: float = DEFAULT_RIDGE
    ridge_rows: float = DEFAULT_RIDGE_ROWS  # c of alpha = ridge + c * dim / rows
    mode: str = "ls"  # "ls" or "ldrf"
    energy: float = DEFAULT_ENERGY
    residual_targets: bool = True
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def from_params(cls, params: CommonParams, batch_size: int, seed: int, mode: str = "ls") -> Settings:
        positions = params.calib_positions
        return cls(
            positions=DEFAULT_POSITIONS if positions is None else int(positions),
            ridge=float(params.ridge),
            ridge_rows=DEFAULT_RIDGE_ROWS,
            mode=mode,
            energy=float(params.energy),
            residual_targets=bool(params.residual_targets),
            batch_size=batch_size,
            seed=seed,
        )


@dataclass(frozen=True)
class _Fit:
    """One layer to refit in the pruned graph and where its target comes from."""

    layer: Layer
    out_keep: np.ndarray | None  # kept positions of the original output channel axis
    axis: int  # channel axis of the output
    target: str  # original tensor whose rows are the target (the layer output, or the Add output)
    minus: str | None  # pruned tensor subtracted from the target (the Add's other operand)
    intercept: bool
    level: int


class Schedule(str, Enum):
    """How the passes over data of a sequential refit are organised (same maths, same rows)."""

    FRONTIER = "frontier"  # calib.engine: each node of each network runs once over the data
    PREFIX = "prefix"  # every level re-runs both networks from the input (the reference)


DEFAULT_SCHEDULE = Schedule.FRONTIER


@dataclass(frozen=True, eq=False)
class Reconstructor:
    """``finish`` step: refits every consumer of pruned channels, level by level (module docstring)."""

    original: onnx.ModelProto
    trace: Trace
    plan: Plan
    calibration: Any
    nodes: tuple[str, ...]
    settings: Settings
    progress: Progress | None = None
    notes: tuple[str, ...] = field(default=())
    schedule: Schedule = field(default_factory=lambda: DEFAULT_SCHEDULE)

    def __call__(self, pruned: onnx.ModelProto) -> onnx.ModelProto:
        if not self.nodes:
            return pruned
        graph = ir.to_graph(pruned)
        fits = self._schedule(graph)
        if not fits:
            return pruned
        levels = sorted({f.level for f in fits})
        by_level = [[f for f in fits if f.level == level] for level in levels]
        s = self.settings
        per_level = self.calibration.num_batches(s.batch_size)
        step = progress_steps(self.progress, per_level * len(levels))
        # per level: the pruned network's layer inputs (and residual operands), the original's targets
        left_names = [list(dict.fromkeys([f.layer.x for f in todo] + [f.minus for f in todo if f.minus])) for todo in by_level]
        right_names = [list(dict.fromkeys(f.target for f in todo)) for todo in by_level]
        engines: tuple[StagedPasses, StagedPasses] | None = None
        limit = blas_limited()  # sessions stay alive between levels: BLAS must not fight them (calib.threads)
        limit.__enter__()
        try:
            for i, (level, todo) in enumerate(zip(levels, by_level)):
                current = ir.export_fast(ir.copy_graph(graph), pruned)  # the layers refitted so far
                if self.schedule is Schedule.PREFIX:
                    left = stream(current, self.calibration, left_names[i], s.batch_size)
                    right = stream(self.original, self.calibration, right_names[i], s.batch_size)
                else:
                    if engines is None:
                        refits = {f.layer.node: k for k, todo_k in enumerate(by_level) for f in todo_k}
                        engines = (
                            StagedPasses(current, self.calibration, s.batch_size, left_names, label="pruned network",
                                         changes=refits),
                            StagedPasses(self.original, self.calibration, s.batch_size, right_names,
                                         label="original network"),
                        )
                        frontier = frontier_budget(calibration_budget(), s.batch_size * max(
                            engines[0].sample_bytes(left) + engines[1].sample_bytes(right)
                            for left, right in zip(left_names, right_names)))
                        for engine in engines:
                            engine.store.budget = frontier
                    left, right = engines[0].advance(left_names[i], current), engines[1].advance(right_names[i])
                self._fit_level(graph, todo, level, left, right, step)
                del current, left, right
                give_back()  # this level's export and stage sessions
        finally:
            for engine in engines or ():
                engine.close()
            limit.__exit__(None, None, None)
        out = ir.to_model(graph, like=pruned)
        log.info("reconstruct: refitted %d layers in %d sequential levels", len(fits), len(levels))
        return out

    # -- scheduling -------------------------------------------------------------

    def _schedule(self, graph: gs.Graph) -> list[_Fit]:
        nodes = ir.node_by_name(graph)
        names = [n for n in self.nodes if n in nodes]
        fit_set = set(names)
        # consumer ancestors of every tensor, in the pruned graph
        above: dict[str, frozenset[str]] = {}
        for node in graph.nodes:
            acc: set[str] = set()
            for t in node.inputs:
                acc |= above.get(t.name, frozenset())
            if node.name in fit_set:
                acc.add(node.name)
            frozen = frozenset(acc)
            for t in node.outputs:
                above[t.name] = frozen
        level: dict[str, int] = {}
        fits: list[_Fit] = []
        outputs = {t.name for t in graph.outputs}
        for name in [n.name for n in graph.nodes if n.name in fit_set]:
            node = nodes[name]
            kind = self.trace.node_kind[name]
            layer = layer_of(node, kind)
            if layer is None:
                continue
            affine = read_affine(node, kind)
            target, minus = layer.y, None
            if kind == Kind.MATMUL and affine.bias_at is not None:
                target = nodes[affine.bias_at[0]].outputs[0].name  # the bias Add: the target includes the bias
            elif self.settings.residual_targets and affine.b is not None:
                target, minus = self._residual(node, outputs)
            deps = set(above.get(layer.x, frozenset()))
            if minus is not None:
                deps |= above.get(minus, frozenset())
            level[name] = 1 + max((level[d] for d in deps if d in level), default=-1)
            cmap = self.trace.maps.get(layer.y)
            axis = cmap.axis if cmap is not None else (1 if kind != Kind.MATMUL else -1)
            fits.append(_Fit(layer, kept_positions(self.trace, self.plan, layer.y), axis, target, minus,
                             affine.b is not None, level[name]))
        return fits

    def _residual(self, node: gs.Node, graph_outputs: set[str]) -> tuple[str, str | None]:
        """(target, subtrahend): an Add fed directly by the layer and another computed tensor."""
        y = node.outputs[0]
        if y.name in graph_outputs or len(y.outputs) != 1 or y.outputs[0].op != "Add":
            return y.name, None
        add = y.outputs[0]
        others = [t for t in add.inputs if t is not y]
        if len(add.inputs) != 2 or len(others) != 1 or isinstance(others[0], gs.Constant) or not others[0].inputs:
            return y.name, None
        ymap, amap = self.trace.maps.get(y.name), self.trace.maps.get(add.outputs[0].name)
        omap = self.trace.maps.get(others[0].name)
        if ymap is None or amap is None or omap is None or ymap.size != amap.size or omap.size != amap.size:
            return y.name, None
        if not np.array_equal(self.trace.roots[ymap.atoms], self.trace.roots[amap.atoms]):
            return y.name, None
        return add.outputs[0].name, others[0].name

    # -- one level ----------------------------------------------------------------

    def _fit_level(
        self, graph: gs.Graph, fits: Sequence[_Fit], level: int, left: Iterator[dict[str, np.ndarray]],
        right: Iterator[dict[str, np.ndarray]], step: Callable[[], None],
    ) -> None:
        s = self.settings
        nodes = ir.node_by_name(graph)
        accs: list[RowBuffer] = []
        priors: list[np.ndarray] = []  # W0: the layer as plain pruning left it (the ridge's prior)
        for f in fits:
            affine = read_affine(nodes[f.layer.node], f.layer.kind)
            priors.append(affine.w)
            accs.append(RowBuffer(GramAccumulator(affine.w.shape[0], affine.w.shape[1], full_yty=s.mode == "ldrf")))
        for batch, (p, o) in enumerate(zip(left, right, strict=True)):
            rng = np.random.default_rng([s.seed, level, batch])
            for f, acc in zip(fits, accs):
                x = p[f.layer.x]
                y = o[f.target]
                if f.out_keep is not None:
                    y = np.take(y, f.out_keep, axis=f.axis)
                if f.minus is not None:
                    y = y.astype(np.float64) - p[f.minus]
                index = f.layer.positions(x.shape, s.positions, rng)
                acc.add(f.layer.x_rows(x, index), f.layer.y_rows(y, index))
            del p, o, x, y  # this batch's tensors go before the engines compute the next
            step()
        for f, buffer, prior in zip(fits, accs, priors):
            gram = buffer.flush()
            if gram.count == 0:
                continue
            energy = s.energy if s.mode == "ldrf" else None
            w, b = fit(gram, f.intercept, s.ridge, energy, prior=prior, per_row=s.ridge_rows)  # rows: gram.count
            write_affine(graph, nodes[f.layer.node], f.layer.kind, w, b if f.intercept else None)


def frontier_budget(budget: int, batch_bytes: int) -> int:
    """Bytes each of the refit's two frontiers may hold in memory (beyond it they spill to disk).

    What no frontier sees is counted first: each network's onnxruntime run (1 / RUN_SHARE each,
    `calib.engine`) and one batch of the tensors a level reads from both networks, twice
    (`batch_bytes`: the tensors themselves, and what the stage computes beside them and the
    fit's copies). The frontiers share the rest, at most 1 / FRONTIER_SHARE each.
    """
    rest = budget - 2 * (budget // RUN_SHARE) - 2 * batch_bytes
    return max(0, min(budget // FRONTIER_SHARE, rest // 2))


def make_finish(
    ctx: Context, plan: Plan, *, mode: str = "ls", settings: Settings | None = None
) -> Reconstructor:
    """The finish step refitting the consumers of `plan`'s pruned channels (see module docstring)."""
    if ctx.calibration is None:
        raise ModelError("reconstruction needs calibration data")
    settings = settings or Settings.from_params(ctx.params, ctx.options.batch_size, ctx.options.seed, mode)
    nodes, notes = plan_consumers(ctx.trace, ctx.graph, plan)
    short = short_of_rows(ctx, plan, nodes, settings)
    note = rows_note(short, len(nodes))
    if note is not None:
        log.warning("%s", note)
        notes.append(note)
    return Reconstructor(ctx.model, ctx.trace, plan, ctx.calibration, tuple(nodes), settings, ctx.progress, tuple(notes))


def planned_rows(layer: Layer, x_shape: Sequence[int], samples: int, batch: int, positions: int | None) -> tuple[int, bool]:
    """(rows a refit of `layer` samples from `samples` calibration samples, more positions would add rows).

    `x_shape` is the traced input shape for a model batch of `batch` samples: a Conv adds
    ``min(positions, output positions)`` rows per image, a Gemm / MatMul every row but the
    channel axis.
    """
    per_batch = int(np.prod(x_shape[:-1])) if layer.kind != Kind.CONV else 0
    capped = False
    if layer.kind == Kind.CONV:
        spatial = tuple(int(d) for d in x_shape[2:])
        out = int(np.prod(conv_output_size(spatial, layer.kernel, layer.strides, layer.conv_pads(spatial), layer.dilations)))
        capped = positions is not None and positions < out
        per_batch = int(x_shape[0]) * (min(positions, out) if positions is not None else out)
    return samples * per_batch // max(batch, 1), capped


def layer_rows(ctx: Context, layer: Layer, positions: int | None) -> tuple[int, bool] | None:
    """`planned_rows` of `layer` over the calibration set of `ctx` (None: no data or no traced shape)."""
    x_shape = ctx.trace.shapes.get(layer.x)
    if ctx.calibration is None or not x_shape:
        return None
    batch = next((int(shape[0]) for shape in ctx.input_shapes.values() if len(shape) and int(shape[0]) > 0), 1)
    return planned_rows(layer, x_shape, int(ctx.calibration.num_samples), batch, positions)


def short_of_rows(ctx: Context, plan: Plan, nodes: Sequence[str], settings: Settings) -> list[tuple[str, int, int, bool]]:
    """``(node, rows, unknowns, more positions would help)`` of the refits with fewer rows than unknowns."""
    by_name = ir.node_by_name(ctx.graph)
    short = []
    for name in nodes:
        node, kind = by_name.get(name), ctx.trace.node_kind.get(name)
        layer = None if node is None else layer_of(node, kind)
        planned = None if layer is None else layer_rows(ctx, layer, settings.positions)
        if node is None or layer is None or planned is None:
            continue
        x_shape = ctx.trace.shapes[layer.x]
        kept = kept_positions(ctx.trace, plan, layer.x)
        channels = int(x_shape[1] if kind == Kind.CONV else x_shape[-1])
        dim = (channels if kept is None else kept.size) * layer.taps
        rows, capped = planned
        count = unknowns(dim, read_affine(node, layer.kind).b is not None)
        if rows < count:
            short.append((name, rows, count, capped))
    return short


def wants_reconstruction(ctx: Context) -> bool:
    """Calibration data is present and ``--no-reconstruct`` was not given."""
    return ctx.calibration is not None and ctx.params.reconstruct is not False


def with_reconstruction(ctx: Context, outcome: Outcome, *, mode: str = "ls") -> Outcome:
    """`outcome` with the reconstruction finish appended (unchanged if off or already there).

    Called by ``api.prune`` after the method, when calibration data is given and
    ``params["reconstruct"]`` is not False; a method's own finish runs first.
    """
    if not wants_reconstruction(ctx) or not outcome.plan.groups:
        return outcome
    if isinstance(outcome.finish, Reconstructor) or isinstance(getattr(outcome.finish, "then", None), Reconstructor):
        return outcome
    finisher = make_finish(ctx, outcome.plan, mode=mode)
    finish: Callable[[onnx.ModelProto], onnx.ModelProto] = finisher
    if outcome.finish is not None:
        finish = _Chain(outcome.finish, finisher)
    notes = tuple(outcome.notes) + finisher.notes
    return replace(outcome, finish=finish, notes=notes)


@dataclass(frozen=True, eq=False)
class _Chain:
    first: Callable[[onnx.ModelProto], onnx.ModelProto]
    then: Reconstructor

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return self.then(self.first(model))
