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

Cross-validated ridge (`ridge_folds` > 1, `cv_fit`; by default on convolutional networks only): the rows of a dense refit are
accumulated in folds (calibration sample ``i`` in fold ``i mod k``, all its rows together), and ``alpha`` is the
one of a grid around the fixed rule (`CV_GRID`, and plain pruning) whose fit on all folds but one predicts the
left-out fold best, in closed form from the folds' moments; then it is fitted on every row. Folds of one
calibration set measure over-fitting to its samples, not to its sources: on EfficientNet-Lite1, whose eval images
come from other sources, see benchmarks/results/real_suite.md for what it gave.

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

Error correction (``--error-correction``, `downstream_layers`): the layers fitted are not only
the consumers of pruned channels but every linear layer downstream of a cut (a Conv with
``group=1``, a Gemm, a MatMul with a constant weight whose input is computed from a node
reading pruned channels), each refitted the same way, on the pruned network's own inputs
against the original's outputs (all its output channels, or those its group keeps), level by
level in topological order. A later layer thus absorbs what the refits before it could not
undo (a nonlinearity between two cuts, a cut the consumer could not explain), as in the
sequential layer-wise reconstruction of SparseGPT / SlimGPT / OSSCAR. A layer with nothing
pruned before it reproduces its own weights (the ridge pulls toward them and the residual is
zero), so only downstream layers are fitted. ``correction_horizon`` keeps those at most that many
weighted layers past a consumer (0: the consumers only, the refit without error correction).
LDRF's projection applies to the consumers only: a downstream layer keeps all its output
channels, and is fitted by plain least squares. A weight shared with another node (tied
embeddings) is left alone: a refit would copy it. A depthwise conv downstream of a cut (one
output per input channel) is refitted channel by channel (`ChannelGrams`): output channel ``c``
from the taps of its own input channel, ``k + 1`` unknowns each, the same ridge toward its
weights with ``dim = k``. With error correction a MatMul whose bias Add feeds a residual Add takes
the residual target too (post-LN transformers), as a Conv or Gemm with a bias always does, and a
LayerNorm / RMSNorm downstream of a cut gets its scale and bias refitted channel by channel
(`ChannelLines`: the line from its pruned normalised value to the original's output); the linear
layers after a norm absorb such a per-channel change anyway, so this matters where a norm's
output is a graph output (a sentence encoder's last hidden state).

Bias correction (``--bias-correction``, `MeanShift`, after FLAP, An et al. 2024, "Fluctuation-based
Adaptive Structured Pruning for Large Language Models"): a layer the refit cannot solve (a grouped
conv or a ConvTranspose losing input channels; with error correction also every grouped,
transposed or 3-D conv downstream of a cut) keeps its weights and gets
``b' = b + mean(Y_original - Y_pruned)`` per output channel, the mean over every calibration sample
and position, so its output mean on the calibration data is the original's. FLAP adds
``W_removed E[x_removed]``; that is this shift when nothing before the layer changed, and here the
shift also carries the error of the layers before it. A depthwise conv that only loses channels
loses no input of an output it keeps and is left as it is.

Token weights (``--token-weights``, on by default; `calib.statistic.RowWeights`): in a sequence model with a padding
mask input (`ir.token_mask_input`, ``attention_mask``) the rows of padding tokens are left out of every refit of a
layer whose rows are tokens (``[N, T, D]``): the model computes outputs there that nothing reads (all-MiniLM-L6-v2's
calibration sentences are 43% padding). A fit whose target is a residual sum read by a LayerNormalization (a post-LN
transformer's attention output and FFN down projections) weighs token ``t`` by ``1 / sigma_t^2``, the variance of the
original sum over its channels: the norm divides the error there by ``sigma_t``, and BERT-like models carry tokens
whose stream is 10x the others' (all-MiniLM-L6-v2: ``sigma_t`` from 0.6 to 11 after an FFN), whose errors the
unweighted least squares would otherwise favour. Least squares with row weights is the weighted moments of
`calib.GramAccumulator` (a row of weight ``w`` counts ``w`` times); the ridge's row count is the rows kept.

The OBS weight update of the kept weights when a channel is removed (``delta W_K = -[S^-1]_KJ
([S^-1]_JJ)^-1 W_J``) is the refit of a consumer on the original network's inputs: least squares of
the kept columns against ``X W`` is ``S_KK^-1 S_K. W``, which is ``W_K + delta W_K``. The refit here
(pruned inputs, original outputs, ridge toward plain pruning) contains it, and the ``obs`` method
(`methods.contribution`) scores each channel by the error that update leaves.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..channels import Kind, TransformerPart, Role, Trace, transformer_part
from ..calib import GramAccumulator, conv_output_size, conv_patches, expose_tensors, output_rows, sample_positions
from ..calib import stream_tensors
from ..calib.cache import human_bytes
from ..calib.collect import names_read
from ..calib.statistic import inverse_variances
from ..calib.engine import StagedPasses
from ..calib.memory import calibration_budget, frontier_budget, give_back, refit_batch
from ..calib.threads import blas_limited
from ..errors import ModelError
from ..graph import edit
from .base import CommonParams, Context, MethodOutcome, Refit
from .defaults import ModelKind, model_kind
from ..ops.registry import Affine, rule_of
from ..analysis.plan import Plan

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
#: folds of the cross-validation that chooses each dense refit's ridge (`cv_fit`; 0: the fixed rule above)
DEFAULT_RIDGE_FOLDS = 0
#: the same on a convolutional network (`ridge_folds`). Measured on EfficientNet-Lite1 at 75% of the MACs (default
#: thinet, damage allocation, error correction; benchmarks/results/real_suite.md): top-1 agreement on eval/, images
#: of other sources than the calibration's, 57.0% with the fixed rule, 63.2% with 5 folds (top-5 90.0 -> 90.2); the
#: folds chose 16 to 64 times the fixed alpha for most layers (plain pruning for two). A fixed base alpha of 0.05
#: gave 60.5%, c = 3 gave 60.0%. Not on MLPs (LeNet-300-100, ratio 0.8, 64 samples: thinet 74.6% -> 73.1%).
DEFAULT_CNN_RIDGE_FOLDS = 5
#: LDRF: fraction of the output variance the embedding keeps (``params["energy"]``)
DEFAULT_ENERGY = CommonParams.energy
#: most bytes of Gram matrices held at once while collecting selection statistics
DEFAULT_GRAM_BUDGET = 1 << 30
#: most bytes of one batch's exposed layer inputs in one selection statistics pass
DEFAULT_EXPOSED_BUDGET = 128 << 20
#: refit the linear layers downstream of the consumers too (``--error-correction``; module docstring)
DEFAULT_ERROR_CORRECTION = True
#: restore the output mean of layers the refit cannot solve through their bias (``--bias-correction``)
DEFAULT_BIAS_CORRECTION = True
#: error correction leaves a downstream layer with more outputs than this alone (a vocabulary projection:
#: its Gram products cost rows x inputs x outputs, and its targets are the widest tensors of the model)
MAX_CORRECTION_OUTPUTS = 16384
#: kinds whose output mean can be restored through a per-channel bias (axis 1) when they are not refitted
MEAN_KINDS = (Kind.CONV, Kind.DEPTHWISE, Kind.GROUPED, Kind.CONV_TRANSPOSE)

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
        return int(np.prod(self.kernel)) if self.spatial else 1

    @property
    def spatial(self) -> bool:
        """Rows are sampled positions of an image (a Conv, plain or depthwise)."""
        return self.kind in (Kind.CONV, Kind.DEPTHWISE)

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
        if not self.spatial:
            return None
        spatial = tuple(int(d) for d in x_shape[2:])
        out = conv_output_size(spatial, self.kernel, self.strides, self.conv_pads(spatial), self.dilations)
        return sample_positions(int(x_shape[0]), int(np.prod(out)), count, rng)

    def x_rows(self, x: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        if not self.spatial:
            return x.reshape(-1, x.shape[-1])
        pads = self.conv_pads(x.shape[2:])
        return conv_patches(x, self.kernel, self.strides, pads, self.dilations, positions=index)

    def y_rows(self, y: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        if not self.spatial:
            return y.reshape(-1, y.shape[-1])
        return output_rows(y, index)


def layer_of(node: gs.Node, kind: Kind | None) -> Layer | None:
    """The `Layer` of a traced Conv (group 1, 1-D or 2-D), Gemm or MatMul; None if unsupported.

    A depthwise Conv with one output per input channel (`depthwise_layer_of`) is a `Layer` too, for
    its per-channel refit, but not here: `layer_of` is the dense ``Y = X W + b`` the refit solves.
    """
    x, y = node.inputs[0], node.outputs[0]
    if kind == Kind.CONV:
        weight = ir.input_const(node, 1)
        if weight is None or weight.ndim not in (3, 4) or int(ir.attr(node, "group", 1)) != 1:
            return None
        return _conv_layer(node, kind, weight)
    if kind in (Kind.GEMM, Kind.MATMUL):
        return Layer(node.name, kind, x.name, y.name)
    return None


def _conv_layer(node: gs.Node, kind: Kind, weight: np.ndarray) -> Layer:
    rank = weight.ndim - 2
    return Layer(
        node.name, kind, node.inputs[0].name, node.outputs[0].name, tuple(int(k) for k in weight.shape[2:]),
        tuple(int(s) for s in ir.attr(node, "strides", [1] * rank)),
        tuple(int(p) for p in ir.attr(node, "pads", [0] * (2 * rank))),
        tuple(int(d) for d in ir.attr(node, "dilations", [1] * rank)),
        str(ir.attr(node, "auto_pad", "NOTSET") or "NOTSET"),
    )


def depthwise_layer_of(node: gs.Node, kind: Kind | None) -> Layer | None:
    """The `Layer` of a 1-D / 2-D depthwise Conv with one output per input channel (weight ``[C, 1, k...]``)."""
    weight = ir.input_const(node, 1)
    if kind != Kind.DEPTHWISE or weight is None or weight.ndim not in (3, 4) or int(weight.shape[1]) != 1:
        return None
    if int(ir.attr(node, "group", 1)) != int(weight.shape[0]):
        return None
    if ir.has_input(node, 2) and ir.input_const(node, 2) is None:
        return None
    return _conv_layer(node, kind, weight)


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


def ridge_alpha(ridge: float, dim: int, rows: float | None, per_row: float) -> float:
    """``alpha = ridge + per_row * dim / rows`` (just ``ridge`` when `rows` is None or `per_row` 0)."""
    if rows is None or per_row == 0.0:
        return ridge
    return ridge + per_row * dim / max(rows, 1)


def ridge_lambda(sxx: np.ndarray, ridge: float, rows: float | None = None, per_row: float = 0.0) -> float:
    """``lam = alpha * trace(S_xx) / dim`` with ``alpha`` = `ridge_alpha` (module docstring)."""
    dim = max(sxx.shape[0], 1)
    alpha = ridge_alpha(ridge, dim, rows, per_row)
    scale = float(np.trace(sxx)) / dim
    return alpha * scale if scale > 0 else alpha


def solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^-1 b`` for a symmetric positive (semi-)definite ``a``; least squares if singular."""
    import scipy.linalg  # on first use: importing scipy is a third of a second of every run, most never solve

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
    return ridge_solution(sxx, sxy, mx, my, ridge_lambda(sxx, ridge, acc.rows, per_row), prior, intercept)


def ridge_solution(
    sxx: np.ndarray, sxy: np.ndarray, mx: np.ndarray, my: np.ndarray, lam: float, prior: np.ndarray | None,
    intercept: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` from the per-row moments: ``W = (S_xx + lam I)^-1 (S_xy + lam prior)`` (`prior` None: zero), an
    infinite ``lam`` the prior itself; ``b = mean(Y) - mean(X) W`` (zero without intercept)."""
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
        self._w: list[np.ndarray] = []
        self._pending = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None, w: np.ndarray | None = None) -> None:
        self._x.append(np.asarray(x))
        if y is not None:
            self._y.append(np.asarray(y))
        if w is not None:
            self._w.append(np.asarray(w))
        self._pending += int(x.shape[0])
        if self._pending >= self.rows:
            self.flush()

    def flush(self) -> GramAccumulator:
        if self._pending:
            x = self._x[0] if len(self._x) == 1 else np.concatenate(self._x)
            y = None if not self._y else (self._y[0] if len(self._y) == 1 else np.concatenate(self._y))
            w = None if not self._w else np.concatenate(self._w)
            self.acc.update(x, y, w)
            self._x, self._y, self._w, self._pending = [], [], [], 0
        return self.acc



def subgraph_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` computing only `names` (as its graph outputs); inputs are kept (a graph input among
    `names` is read from the feed, `calib.stream_tensors`)."""
    cut = weightless_cut(model, names)
    if cut is not model:
        # only the weights the cut reads are copied into it (a copy of the whole model first would hold every
        # weight twice while the cut is made)
        used = names_read(cut.graph.node)
        cut.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    return cut


def weightless_cut(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """`subgraph_model` without the weights: its nodes read them from `model` (``stream_tensors(weights=model)``),
    so that no pass holds a copy of them beside the session made from them; `model` itself when every name is
    a graph input."""
    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n not in inputs]
    if not wanted:
        return model
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
    return exposed


def stream(
    model: onnx.ModelProto, calib: Any, names: Sequence[str], batch_size: int, progress: Progress | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """``calib.stream_tensors`` over the smallest subgraph that computes `names`."""
    return stream_tensors(weightless_cut(model, names), calib, list(names), batch_size=batch_size, progress=progress,
                          weights=model)


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
    refit, sliced = _consumers(trace, graph, plan)
    return refit, list(dict.fromkeys(note for _, note in sliced))


def _consumers(trace: Trace, graph: gs.Graph, plan: Plan) -> tuple[list[str], list[tuple[str, str]]]:
    """(consumers to refit in graph order, [(consumer sliced not refitted, why)])."""
    pruned_groups = {g.group for g in plan.groups if g.pruned}
    wanted: set[str] = set()
    sliced: list[tuple[str, str]] = []
    for group in trace.groups:
        if group.index not in pruned_groups:
            continue
        for m in group.members:
            kind = trace.node_kind.get(m.node)
            if m.role == Role.IN and kind in FITTED_KINDS:
                wanted.add(m.node)
            elif m.role in (Role.IN, Role.DEPTHWISE) and kind in (Kind.DEPTHWISE, Kind.GROUPED, Kind.CONV_TRANSPOSE):
                sliced.append((m.node, f"reconstruct: {kind} {m.op} {m.node} is sliced, not refitted"))
    nodes = ir.node_by_name(graph)
    order = [n.name for n in graph.nodes if n.name in wanted]
    refit = []
    for name in order:
        node = nodes[name]
        if layer_of(node, trace.node_kind[name]) is None:
            sliced.append((name, f"reconstruct: {node.op} {name} (not a 1-D/2-D group-1 conv) is sliced, not refitted"))
        else:
            refit.append(name)
    return refit, sliced


@dataclass(frozen=True)
class Targets:
    """What one reconstruction changes, each list in graph order."""

    refit: tuple[str, ...]  # least-squares refits
    consumers: frozenset[str]  # the refits that read pruned channels (the rest: error correction)
    mean: tuple[str, ...] = ()  # bias-only: the output mean restored (`MeanShift`)
    notes: tuple[str, ...] = ()
    depthwise: tuple[str, ...] = ()  # depthwise convs refitted channel by channel (`ChannelGrams`)
    norms: tuple[str, ...] = ()  # normalisations refitted channel by channel (`ChannelLines`)


def _shared_weight(node: gs.Node) -> bool:
    """The weight constant feeds another node too (a tied embedding): a refit would copy it."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return isinstance(weight, gs.Constant) and len(weight.outputs) > 1


def _affine_or_none(node: gs.Node, kind: Kind) -> Affine | None:
    rule = rule_of(node)
    return None if rule is None else rule.read_affine(node, kind)


def _can_shift_mean(node: gs.Node, kind: Kind | None) -> bool:
    """A Conv-family node with a constant weight: its output channels on axis 1, an optional bias input 2."""
    if kind not in MEAN_KINDS or ir.input_const(node, 1) is None:
        return False
    return not ir.has_input(node, 2) or ir.input_const(node, 2) is not None


def downstream_layers(
    trace: Trace, graph: gs.Graph, plan: Plan, consumers: Sequence[str], horizon: int | None = None
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(linear layers to refit, depthwise convs to refit per channel, other Conv-family layers to mean-correct,
    normalisations to refit per channel) downstream of the pruned channels, each in graph order.

    A tensor is *changed* when it is computed from a node that reads pruned channels (any
    member of a pruned group but its sources: consumers, normalisations, elementwise ops);
    a weighted node whose input is changed is downstream. Its depth is the number of weighted
    layers from a consumer (0) along the shortest path; `horizon` keeps depths up to it.
    Consumers themselves are not repeated; layers whose weight is shared (tied) or with more than
    `MAX_CORRECTION_OUTPUTS` outputs are left alone.
    """
    pruned_groups = {g.group for g in plan.groups if g.pruned}
    seeds = {m.node for g in trace.groups if g.index in pruned_groups for m in g.members if m.role != Role.OUT}
    fitted = set(consumers)
    distance: dict[str, int] = {}  # changed tensor -> weighted layers between it and the nearest cut
    refit: list[str] = []
    depthwise: list[str] = []
    mean: list[str] = []
    norms: list[str] = []
    for node in graph.nodes:
        reach = [distance[t.name] for t in node.inputs if t.name in distance]
        kind = trace.node_kind.get(node.name)
        if reach and norm_parameters(node, kind) is not None and (horizon is None or min(reach) < horizon):
            norms.append(node.name)
        weighted = kind in FITTED_KINDS or kind in MEAN_KINDS
        depth = min(reach) + 1 if reach and weighted else None  # this layer's own depth past the cuts
        if node.name in fitted or node.name in seeds:
            out: int | None = 0  # a cut: what it computes differs from the original's
        else:
            out = depth if depth is not None else (min(reach) if reach else None)
        if out is not None:
            for t in node.outputs:
                distance[t.name] = out
        if node.name in fitted or depth is None or (horizon is not None and depth > horizon):
            continue
        if _shared_weight(node):
            continue
        assert kind is not None
        affine = _affine_or_none(node, kind) if layer_of(node, kind) is not None else None
        if affine is not None:
            if affine.w.shape[1] <= MAX_CORRECTION_OUTPUTS:
                refit.append(node.name)
        elif depthwise_layer_of(node, kind) is not None:
            depthwise.append(node.name)
        elif _can_shift_mean(node, kind):
            mean.append(node.name)
    return refit, depthwise, mean, norms


def reconstruction_targets(trace: Trace, graph: gs.Graph, plan: Plan, settings: Settings) -> Targets:
    """The consumers to refit, with error correction the layers downstream, with bias correction the rest."""
    refit, sliced = _consumers(trace, graph, plan)
    consumers = frozenset(refit)
    nodes = ir.node_by_name(graph)
    mean: list[str] = []
    notes: list[str] = []
    for name, note in sliced:
        node, kind = nodes.get(name), trace.node_kind.get(name)
        # a depthwise conv loses no input of an output it keeps: nothing to restore
        if settings.bias_correction and node is not None and kind != Kind.DEPTHWISE and _can_shift_mean(node, kind):
            mean.append(name)
            notes.append(f"reconstruct: {kind} {node.op} {name} is sliced, not refitted; its output mean is restored by its bias")
        else:
            notes.append(note)
    depthwise: list[str] = []
    norms: list[str] = []
    if settings.error_correction:
        extra, depthwise, extra_mean, norms = downstream_layers(trace, graph, plan, refit, settings.horizon)
        refit += extra
        mean += [n for n in extra_mean if n not in mean] if settings.bias_correction else []
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return Targets(
        tuple(sorted(set(refit), key=order.__getitem__)), consumers,
        tuple(sorted(set(mean), key=order.__getitem__)), tuple(dict.fromkeys(notes)),
        tuple(sorted(set(depthwise), key=order.__getitem__)), tuple(sorted(set(norms), key=order.__getitem__)),
    )


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
    #: also refit the linear layers downstream of the consumers (`downstream_layers`)
    error_correction: bool = False
    #: most linear layers past a consumer that error correction refits (None: all downstream)
    horizon: int | None = None
    #: layers that cannot be refitted get their output mean restored through the bias (`MeanShift`)
    bias_correction: bool = False
    #: ``--refit mean``: the bias only (``lam = inf``: plain pruning with the output mean restored)
    mean_only: bool = False
    #: a graph input ``[N, T]`` whose zeros mark padding tokens: their rows are left out of the refits
    token_mask: str | None = None
    #: a fit whose target is a residual sum read by a LayerNormalization weighs row ``t`` by ``1 / var_t`` of the sum
    norm_weights: bool = False
    #: the ridge of each dense refit chosen by this many-fold cross-validation on its own rows (0: the fixed rule)
    ridge_folds: int = 0

    @classmethod
    def from_params(cls, params: CommonParams, batch_size: int, seed: int, mode: str = "ls",
                    folds: int | None = None, kind: ModelKind = ModelKind.OTHER) -> Settings:
        """`folds`: of the cross-validated ridge, in place of `DEFAULT_RIDGE_FOLDS` (`ridge_folds`); `kind`: of the
        model refitted (`default_error_correction`)."""
        positions = params.calib_positions
        correction = params.error_correction
        return cls(
            positions=DEFAULT_POSITIONS if positions is None else int(positions),
            ridge=float(params.ridge),
            ridge_rows=DEFAULT_RIDGE_ROWS,
            mode=mode,
            energy=float(params.energy),
            residual_targets=bool(params.residual_targets),
            batch_size=batch_size,
            seed=seed,
            error_correction=default_error_correction(params, kind) if correction is None else bool(correction),
            horizon=None if params.correction_horizon is None else int(params.correction_horizon),
            bias_correction=DEFAULT_BIAS_CORRECTION if params.bias_correction is None else bool(params.bias_correction),
            mean_only=params.refit is Refit.MEAN,
            norm_weights=params.token_weights is not False,
            ridge_folds=DEFAULT_RIDGE_FOLDS if folds is None else folds,
        )


def default_error_correction(params: CommonParams, kind: ModelKind) -> bool:
    """Error correction, except on a transformer that ``--recover`` follows: the downstream refits absorb the
    closed-form errors upstream of them, so a block recovered toward the original's outputs undoes what they
    learned to correct. all-MiniLM-L6-v2 at 60% of the MACs with ``--recover``: with error correction every
    block improved its own guard error by 1-5% and the network's rose (0.119 -> 0.127, all put back: cosine
    0.922, NN 50.4%); with the consumers' refit only, the network's fell (0.191 -> 0.161, kept: cosine 0.936,
    NN 51.6%); SmolLM2-135M at 80%: perplexity 1.41x with the consumers' refit and recovery, 1.53x closed-form
    with error correction. On EfficientNet-Lite1 at 75% the consumers' refit with recovery reached 61.3% top-1
    agreement, below error correction alone (63.2%; 63.3% with recovery)."""
    return DEFAULT_ERROR_CORRECTION and not (params.recover and kind is ModelKind.TRANSFORMER)


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
    project: bool = True  # LDRF's projection applies (a consumer; error-correction refits are plain least squares)
    shift: bool = False  # bias only: the output mean restored (`shift_bias`), no rows are fitted
    depthwise: bool = False  # a depthwise conv refitted channel by channel (`ChannelGrams`)
    norm: bool = False  # a normalisation's scale and bias refitted channel by channel (`ChannelLines`)

    @property
    def reads(self) -> str:
        """The pruned network's tensor this fit reads: the layer input, or its output (mean shift, normalisation)."""
        return self.layer.y if self.shift or self.norm else self.layer.x


class Schedule(str, Enum):
    """How the passes over data of a sequential refit are organised (same maths, same rows)."""

    FRONTIER = "frontier"  # calib.engine: each node of each network runs once over the data
    PREFIX = "prefix"  # every level re-runs both networks from the input (the reference)


DEFAULT_SCHEDULE = Schedule.FRONTIER


@dataclass(frozen=True, eq=False)
class Reconstructor:
    """``finish`` step: refits every consumer of pruned channels, level by level (module docstring).

    A pruned model held as a view of a file (a large one, `ir.ScratchFile.hold`) is refitted file-backed
    (`graph.filebacked`): a level loads the weights it reads and writes the ones it refits to a scratch file.
    """

    original: onnx.ModelProto
    trace: Trace
    plan: Plan
    calibration: Any
    nodes: tuple[str, ...]
    settings: Settings
    progress: Progress | None = None
    notes: tuple[str, ...] = field(default=())
    schedule: Schedule = field(default_factory=lambda: DEFAULT_SCHEDULE)
    #: the refits that read pruned channels (LDRF's projection applies to them); None: every node in `nodes`
    consumers: frozenset[str] | None = None
    #: layers whose output mean is restored through their bias (not refitted)
    mean: tuple[str, ...] = ()
    #: depthwise convs refitted channel by channel
    depthwise: tuple[str, ...] = ()
    #: normalisations whose scale and bias are refitted channel by channel
    norms: tuple[str, ...] = ()

    def __call__(self, pruned: onnx.ModelProto) -> onnx.ModelProto:
        if not self.nodes and not self.mean and not self.depthwise and not self.norms:
            return pruned
        # a large model's weights stay in its file while the levels read and rewrite a few at a time (`filebacked`)
        in_files = ir.is_file_view(pruned)
        with ir.ScratchFile() as refitted:
            graph = ir.to_graph(pruned, lazy_views=in_files)
            settled = partial(ir.settle, graph, refitted) if in_files else None
            fits = self._schedule(graph)
            if not fits:
                return pruned
            out = self._refit(graph, fits, pruned, settled)
            # the refitted weights are read back before their file goes
            return ir.materialized(out) if in_files else out

    def _refit(self, graph: gs.Graph, fits: list[_Fit], pruned: onnx.ModelProto,
               settled: Callable[[], int] | None) -> onnx.ModelProto:
        if settled is not None:
            settled()  # the schedule read every layer's weights
        levels = sorted({f.level for f in fits})
        by_level = [[f for f in fits if f.level == level] for level in levels]
        s = self.settings
        per_level = self.calibration.num_batches(s.batch_size)
        step = progress_steps(self.progress, per_level * len(levels))
        # per level: the pruned network's layer inputs (and residual operands), the original's targets
        left_names = [list(dict.fromkeys([f.reads for f in todo] + [f.minus for f in todo if f.minus]
                                         + ([s.token_mask] if s.token_mask else []))) for todo in by_level]
        right_names = [list(dict.fromkeys(f.target for f in todo)) for todo in by_level]
        engines: tuple[StagedPasses, StagedPasses] | None = None
        limit = blas_limited()  # sessions stay alive between levels: BLAS must not fight them (calib.threads)
        limit.__enter__()
        try:
            large = ir.takes_scratch_file(pruned.graph.initializer) or ir.is_file_view(pruned)
            for i, (level, todo) in enumerate(zip(levels, by_level)):
                weights: dict[str, np.ndarray] | None = None
                if engines is not None and large:
                    # a stage takes only its own weights: the level's export leaves the large ones in the graph
                    current, weights = ir.export_weightless(graph, pruned)
                else:
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
                        per_sample = max(engines[0].sample_bytes(left) + engines[1].sample_bytes(right)
                                         for left, right in zip(left_names, right_names))
                        size = refit_batch(s.batch_size, per_sample)  # a fixed default: the same bytes anywhere
                        if size < engines[0].size:
                            log.info("reconstruct: batches of %d samples, not %d: a level's tensors take %s a sample",
                                     size, s.batch_size, human_bytes(per_sample))
                            for engine in engines:
                                engine.rebatch(size)
                            step = progress_steps(self.progress, engines[0].batches * len(levels))
                        batch = engines[0].size * per_sample
                        frontier = frontier_budget(calibration_budget(), batch)
                        log.debug("reconstruct: one batch of a level's tensors %d MB, each frontier %d MB",
                                  batch >> 20, frontier >> 20)
                        for engine in engines:
                            engine.store.budget = frontier
                    left, right = engines[0].advance(left_names[i], current, weights), engines[1].advance(right_names[i])
                self._fit_level(graph, todo, level, left, right, step)
                if settled is not None:
                    settled()
                del current, weights, left, right
                give_back()  # this level's export and stage sessions
                log.debug("reconstruct: level %d of %d refitted (%d layers)", i + 1, len(levels), len(todo))
        finally:
            for engine in engines or ():
                engine.close()
            limit.__exit__(None, None, None)
        out = ir.to_model(graph, like=pruned)
        shifted, channelwise, norms = sum(f.shift for f in fits), sum(f.depthwise for f in fits), sum(f.norm for f in fits)
        log.info("reconstruct: refitted %d layers%s%s%s in %d sequential levels", len(fits) - shifted - channelwise - norms,
                 f", {channelwise} depthwise channel by channel" if channelwise else "",
                 f", {norms} normalisations" if norms else "",
                 f", restored the output mean of {shifted}" if shifted else "", len(levels))
        return out

    # -- scheduling -------------------------------------------------------------

    def _schedule(self, graph: gs.Graph) -> list[_Fit]:
        nodes = ir.node_by_name(graph)
        names = [n for n in (*self.nodes, *self.mean, *self.depthwise, *self.norms) if n in nodes]
        fit_set = set(names)
        shifts, depthwise, norms = set(self.mean), set(self.depthwise), set(self.norms)
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
            if name in shifts:
                x, y = node.inputs[0].name, node.outputs[0].name
                level[name] = 1 + max((level[d] for d in above.get(x, frozenset()) if d in level), default=-1)
                fits.append(_Fit(Layer(name, kind, x, y), kept_positions(self.trace, self.plan, y), 1, y, None, True,
                                 level[name], project=False, shift=True))
                continue
            if name in norms:
                x, y = node.inputs[0].name, node.outputs[0].name
                level[name] = 1 + max((level[d] for d in above.get(x, frozenset()) if d in level), default=-1)
                fits.append(_Fit(Layer(name, kind, x, y), kept_positions(self.trace, self.plan, y), -1, y, None, True,
                                 level[name], project=False, norm=True))
                continue
            if name in depthwise:
                dw = depthwise_layer_of(node, kind)
                if dw is None:
                    continue
                level[name] = 1 + max((level[d] for d in above.get(dw.x, frozenset()) if d in level), default=-1)
                fits.append(_Fit(dw, kept_positions(self.trace, self.plan, dw.y), 1, dw.y, None, True, level[name],
                                 project=False, depthwise=True))
                continue
            layer = layer_of(node, kind)
            if layer is None:
                continue
            affine = read_affine(node, kind)
            target, minus = layer.y, None
            if kind == Kind.MATMUL and affine.bias_at is not None:
                target = nodes[affine.bias_at[0]].outputs[0].name  # the bias Add: the target includes the bias
                if self.settings.error_correction and self.settings.horizon != 0 and self.settings.residual_targets:
                    # the bias Add feeds a residual Add: the branch also absorbs the error of the stream
                    through, other = self._residual(nodes[affine.bias_at[0]], outputs)
                    if other is not None:
                        target, minus = through, other
            elif self.settings.residual_targets and affine.b is not None:
                target, minus = self._residual(node, outputs)
            deps = set(above.get(layer.x, frozenset()))
            if minus is not None:
                deps |= above.get(minus, frozenset())
            level[name] = 1 + max((level[d] for d in deps if d in level), default=-1)
            cmap = self.trace.maps.get(layer.y)
            axis = cmap.axis if cmap is not None else (1 if kind != Kind.MATMUL else -1)
            fits.append(_Fit(layer, kept_positions(self.trace, self.plan, layer.y), axis, target, minus,
                             affine.b is not None, level[name], project=self.consumers is None or name in self.consumers))
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
        ln_inputs = {n.inputs[0].name for n in graph.nodes if n.op == "LayerNormalization"}
        accs: list[RowBuffer | FoldedGrams | MeanShift | ChannelGrams | ChannelLines] = []
        priors: list[np.ndarray | None] = []  # W0: the layer as plain pruning left it (the ridge's prior)
        for f in fits:
            if f.shift:
                accs.append(MeanShift(f.axis))
                priors.append(None)
                continue
            if f.norm:
                params = norm_parameters(nodes[f.layer.node], f.layer.kind)
                assert params is not None
                accs.append(ChannelLines(*params))
                priors.append(None)
                continue
            if f.depthwise:
                weight = ir.input_const(nodes[f.layer.node], 1)
                assert weight is not None
                taps = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
                accs.append(ChannelGrams(taps.shape[0], taps.shape[1]))
                priors.append(taps)
                continue
            affine = read_affine(nodes[f.layer.node], f.layer.kind)
            priors.append(affine.w)
            ldrf = s.mode == "ldrf" and f.project
            if s.ridge_folds > 1 and not ldrf and not s.mean_only:
                accs.append(FoldedGrams(affine.w.shape[0], affine.w.shape[1], s.ridge_folds))
            else:
                accs.append(RowBuffer(GramAccumulator(affine.w.shape[0], affine.w.shape[1], full_yty=ldrf)))
        for batch, (p, o) in enumerate(zip(left, right, strict=True)):
            rng = np.random.default_rng([s.seed, level, batch])
            mask = None if s.token_mask is None else np.asarray(p[s.token_mask])
            mask = None if mask is None or mask.all() else mask  # no padding in this batch: nothing to leave out
            for f, acc in zip(fits, accs):
                x = p[f.reads]
                y = o[f.target]
                # into a LayerNorm: token t weighs 1 / sigma_t^2 of the original sum (module docstring, token weights)
                norm = s.norm_weights and f.minus is not None and f.target in ln_inputs and not f.layer.spatial
                weights = inverse_variances(y) if norm else None
                if f.out_keep is not None:
                    y = np.take(y, f.out_keep, axis=f.axis)
                if f.minus is not None:
                    y = np.subtract(y, p[f.minus], dtype=np.float64)  # one float64 copy, not two
                if mask is not None and not f.layer.spatial and not f.shift and x.ndim == 3 and x.shape[:2] == mask.shape:
                    keep = mask.reshape(-1) != 0  # padding tokens: outputs nothing reads
                    x, y = x.reshape(-1, x.shape[-1])[keep], y.reshape(-1, y.shape[-1])[keep]
                    weights = None if weights is None else weights[keep]
                if isinstance(acc, (MeanShift, ChannelLines)):
                    acc.add(y, x)
                    continue
                index = f.layer.positions(x.shape, s.positions, rng)
                if isinstance(acc, FoldedGrams):
                    acc.add(f.layer.x_rows(x, index), f.layer.y_rows(y, index), int(x.shape[0]) if x.ndim > 1 else 1)
                elif weights is not None and isinstance(acc, RowBuffer):
                    acc.add(f.layer.x_rows(x, index), f.layer.y_rows(y, index), weights)
                else:
                    acc.add(f.layer.x_rows(x, index), f.layer.y_rows(y, index))
            del p, o, x, y  # this batch's tensors go before the engines compute the next
            step()
        for f, acc, w0 in zip(fits, accs, priors):
            node = nodes[f.layer.node]
            if isinstance(acc, MeanShift):
                if acc.count:
                    shift_bias(node, acc.shift())
                continue
            if isinstance(acc, ChannelLines):
                if acc.count:
                    write_norm(node, *acc.fit(np.inf if s.mean_only else s.ridge, s.ridge_rows))
                continue
            if isinstance(acc, ChannelGrams):
                if acc.count:
                    assert w0 is not None
                    ridge = np.inf if s.mean_only else s.ridge
                    write_depthwise(node, *acc.fit(w0, ridge, s.ridge_rows))
                continue
            if isinstance(acc, FoldedGrams):
                folds = acc.moments()
                if sum(m.count for m in folds) == 0:
                    continue
                assert w0 is not None
                w, b, alpha = cv_fit(folds, f.intercept, s.ridge, s.ridge_rows, w0)
                log.debug("reconstruct: %s ridge alpha %.4g by %d-fold cross-validation", f.layer.node, alpha, len(folds))
                write_affine(graph, node, f.layer.kind, w, b if f.intercept else None)
                continue
            gram = acc.flush()
            if gram.count == 0:
                continue
            energy = s.energy if s.mode == "ldrf" and f.project else None
            ridge = np.inf if s.mean_only else s.ridge  # an infinite ridge keeps W0 and moves the bias only
            w, b = fit(gram, f.intercept, ridge, energy, prior=w0, per_row=s.ridge_rows)  # rows: gram.count
            write_affine(graph, node, f.layer.kind, w, b if f.intercept else None)


@dataclass(frozen=True)
class Moments:
    """Raw moments of a refit's rows: ``n``, ``sum x``, ``sum y``, ``X^T X``, ``X^T Y`` (float64; they add)."""

    count: float  # rows (a weighted accumulator counts their weights)
    sum_x: np.ndarray
    sum_y: np.ndarray
    xtx: np.ndarray
    xty: np.ndarray

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sum_x + other.sum_x, self.sum_y + other.sum_y,
                       self.xtx + other.xtx, self.xty + other.xty)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.count - other.count, self.sum_x - other.sum_x, self.sum_y - other.sum_y,
                       self.xtx - other.xtx, self.xty - other.xty)

    def centred(self, intercept: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(S_xx, S_xy, mean x, mean y)`` per row; without an intercept uncentred, with zero means."""
        n = max(self.count, 1)
        if not intercept:
            return self.xtx / n, self.xty / n, np.zeros(self.sum_x.size), np.zeros(self.sum_y.size)
        mx, my = self.sum_x / n, self.sum_y / n
        return self.xtx / n - np.outer(mx, mx), self.xty / n - np.outer(mx, my), mx, my


class FoldedGrams:
    """A refit's rows in `folds` Gram accumulators: calibration sample ``i`` in fold ``i mod folds`` (the rows of one
    sample, its sampled positions or tokens, stay in one fold)."""

    def __init__(self, dim_x: int, dim_y: int, folds: int) -> None:
        self.buffers = [RowBuffer(GramAccumulator(dim_x, dim_y)) for _ in range(folds)]
        self.seen = 0  # samples added so far

    def add(self, x: np.ndarray, y: np.ndarray, samples: int) -> None:
        """Rows of `samples` consecutive samples, each sample's rows contiguous and equal in number."""
        k = len(self.buffers)
        if samples <= 0 or x.shape[0] % samples:
            self.buffers[self.seen % k].add(x, y)
        else:
            per = x.shape[0] // samples
            fold = (self.seen + np.arange(samples)) % k
            for j in range(k):
                rows = (np.flatnonzero(fold == j)[:, None] * per + np.arange(per)).ravel()
                if rows.size:
                    self.buffers[j].add(x[rows], y[rows])
        self.seen += max(samples, 1)

    def moments(self) -> list[Moments]:
        out = []
        for buffer in self.buffers:
            acc = buffer.flush()
            if acc.count:
                assert acc.sum_y is not None and acc.xty is not None
                out.append(Moments(acc.count, acc.sum_x.copy(), acc.sum_y.copy(), acc.xtx.copy(), acc.xty.copy()))
        return out


#: the ridge alphas `cv_fit` tries, as multiples of the fixed rule's ``ridge + c * dim / rows`` (and plain pruning)
CV_GRID = 4.0 ** np.arange(-3, 6)


def cv_fit(
    folds: Sequence[Moments], intercept: bool, ridge: float, per_row: float, prior: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(W, b, alpha)``: the ridge refit toward `prior` of the module docstring, with ``alpha`` the one of
    `CV_GRID` times the fixed rule (or infinity: plain pruning with its mean corrected) whose fits on all folds but
    one predict the left-out fold best, summed over the folds; then fitted on every row.

    Each fold's error is closed form from its moments: with ``S_xx = Q diag(e) Q^T`` of the other folds, the
    ridge solution is ``W = Q V``, ``V = (Q^T S_xy + lam Q^T W0) / (e + lam)``, and the left-out squared error
    ``tr(V^T Q^T X_f^T X_f Q V) - 2 tr(V^T Q^T X_f^T Y_f) + 2 b^T V^T Q^T sum x_f - 2 b^T sum y_f + n_f |b|^2``
    (up to ``tr(Y_f^T Y_f)``, equal for every alpha): one eigendecomposition per fold serves every alpha.
    """
    prior = np.asarray(prior, dtype=np.float64)
    total = folds[0]
    for m in folds[1:]:
        total = total + m
    dim = prior.shape[0]
    base = ridge_alpha(ridge, dim, total.count, per_row)
    alphas = [float(a) for a in base * CV_GRID] + [np.inf]
    errors = np.zeros(len(alphas))
    if len(folds) > 1 and base > 0:
        for held in folds:
            sxx, sxy, mx, my = (total - held).centred(intercept)
            e, q = np.linalg.eigh((sxx + sxx.T) / 2)
            e = e.clip(min=0.0)
            a, p0, qmx = q.T @ sxy, q.T @ prior, q.T @ mx
            g, h, sx = q.T @ held.xtx @ q, q.T @ held.xty, q.T @ held.sum_x
            for j, alpha in enumerate(alphas):
                if np.isfinite(alpha):
                    lam = ridge_lambda(sxx, alpha)
                    v = (a + lam * p0) / (e + lam)[:, None]
                else:
                    v = p0
                b = my - qmx @ v if intercept else np.zeros(v.shape[1])
                errors[j] += (np.einsum("ij,ij->", g @ v, v) - 2.0 * np.einsum("ij,ij->", v, h)
                              + 2.0 * float(b @ (v.T @ sx)) - 2.0 * float(b @ held.sum_y) + held.count * float(b @ b))
        alpha = alphas[int(np.argmin(errors))]
    else:
        alpha = base
    sxx, sxy, mx, my = total.centred(intercept)
    w, b = ridge_solution(sxx, sxy, mx, my, ridge_lambda(sxx, alpha), prior, intercept)
    return w, b, alpha


class ChannelGrams:
    """Per-channel moments of a depthwise layer: output channel ``c`` is fitted from the taps of input channel ``c``.

    Rows are shifted by the first batch's means before their products (float64), as in
    ``calib.GramAccumulator``, so a small variance under a large mean survives the centring.
    """

    def __init__(self, channels: int, taps: int) -> None:
        self.channels, self.taps, self.count = channels, taps, 0
        self.shift_x = np.zeros((channels, taps))
        self.shift_y = np.zeros(channels)
        self.sum_x = np.zeros((channels, taps))
        self.sum_y = np.zeros(channels)
        self.xtx = np.zeros((channels, taps, taps))
        self.xty = np.zeros((channels, taps))

    def add(self, x_rows: np.ndarray, y_rows: np.ndarray) -> None:
        x = np.asarray(x_rows, dtype=np.float64).reshape(-1, self.channels, self.taps)
        y = np.asarray(y_rows, dtype=np.float64).reshape(-1, self.channels)
        if not x.shape[0]:
            return
        if self.count == 0:
            self.shift_x, self.shift_y = x.mean(axis=0), y.mean(axis=0)
        x, y = x - self.shift_x, y - self.shift_y
        self.count += x.shape[0]
        self.sum_x += x.sum(axis=0)
        self.sum_y += y.sum(axis=0)
        self.xtx += np.einsum("rck,rcl->ckl", x, x, optimize=True)
        self.xty += np.einsum("rck,rc->ck", x, y, optimize=True)

    def fit(self, prior: np.ndarray, ridge: float, per_row: float) -> tuple[np.ndarray, np.ndarray]:
        """``(W [C, taps], b [C])``: per channel, the ridge refit toward `prior` of the module docstring."""
        n = max(self.count, 1)
        mx, my = self.sum_x / n, self.sum_y / n
        sxx = self.xtx / n - np.einsum("ck,cl->ckl", mx, mx)
        sxy = self.xty / n - mx * my[:, None]
        alpha = ridge_alpha(ridge, self.taps, self.count, per_row)
        scale = np.einsum("ckk->c", sxx) / self.taps
        lam = np.where(scale > 0, alpha * scale, alpha)
        if not np.isfinite(alpha):
            w = np.array(prior, dtype=np.float64)
        else:
            eye = np.eye(self.taps)[None] * lam[:, None, None]
            w = np.linalg.solve(sxx + eye, (sxy + lam[:, None] * prior)[..., None])[..., 0]
        b = (my + self.shift_y) - np.einsum("ck,ck->c", mx + self.shift_x, w)
        return w, b


def write_depthwise(node: gs.Node, w: np.ndarray, b: np.ndarray) -> None:
    """Store a depthwise refit: weight ``[C, 1, k...]`` from ``W [C, taps]``, and the bias (added if absent)."""
    weight = ir.input_const(node, 1)
    assert weight is not None
    edit.set_input_const(node, 1, w.reshape(weight.shape))
    if ir.has_input(node, 2):
        bias = ir.input_const(node, 2)
        assert bias is not None
        edit.set_input_const(node, 2, b.reshape(bias.shape))
    else:
        edit.append_input(node, edit.make_constant(f"{node.name}__bias", b.astype(weight.dtype)), 2)


class ChannelLines:
    """Per channel of a normalisation's output, the line from the pruned normalised value to the original output.

    The pruned output is ``y'_c = gamma_c z'_c + beta_c``; ``z'_c`` is recovered from it (channels with
    ``gamma_c = 0`` keep their parameters) and ``y_c ~ a_c z'_c + b_c`` is fitted by least squares with
    the refit's ridge toward ``(gamma_c, beta_c)`` (``dim = 1``). Without an intercept (RMSNorm) the
    line goes through the origin and only the scale is fitted.
    """

    def __init__(self, gamma: np.ndarray, beta: np.ndarray | None) -> None:
        self.gamma, self.beta = np.asarray(gamma, dtype=np.float64), None if beta is None else np.asarray(beta, dtype=np.float64)
        self.live = np.abs(self.gamma) > 1e-12
        size = self.gamma.size
        self.count = 0
        self.sz, self.sy, self.szz, self.szy = np.zeros(size), np.zeros(size), np.zeros(size), np.zeros(size)

    def add(self, target: np.ndarray, output: np.ndarray) -> None:
        size = self.gamma.size
        y = np.asarray(target, dtype=np.float64).reshape(-1, size)
        z = np.asarray(output, dtype=np.float64).reshape(-1, size) - (0.0 if self.beta is None else self.beta)
        z = np.divide(z, self.gamma, out=np.zeros_like(z), where=self.live)
        self.count += y.shape[0]
        self.sz += z.sum(axis=0)
        self.sy += y.sum(axis=0)
        self.szz += np.einsum("rc,rc->c", z, z)
        self.szy += np.einsum("rc,rc->c", z, y)

    def fit(self, ridge: float, per_row: float) -> tuple[np.ndarray, np.ndarray | None]:
        """``(gamma', beta')`` (beta' None without an intercept)."""
        n = max(self.count, 1)
        intercept = self.beta is not None
        mz, my = (self.sz / n, self.sy / n) if intercept else (np.zeros_like(self.sz), np.zeros_like(self.sy))
        var = self.szz / n - mz * mz
        cov = self.szy / n - mz * my
        alpha = ridge_alpha(ridge, 1, self.count, per_row)
        if not np.isfinite(alpha):
            a = self.gamma.copy()
        else:
            lam = np.where(var > 0, alpha * var, alpha)
            a = (cov + lam * self.gamma) / (var + lam)
        a = np.where(self.live, a, self.gamma)
        if not intercept:
            return a, None
        assert self.beta is not None
        return a, np.where(self.live, my - a * mz, self.beta)


def norm_parameters(node: gs.Node, kind: Kind | None) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(gamma, beta)`` of a normalisation over the last axis with per-channel constants (beta None: RMSNorm),
    or None when it cannot be refitted channel by channel."""
    if kind != Kind.LAYER_NORM or int(ir.attr(node, "axis", -1)) != -1:
        return None
    gamma = ir.input_const(node, 1) if ir.has_input(node, 1) else None
    if gamma is None or gamma.ndim != 1 or gamma.size < 2:
        return None
    if node.op != "LayerNormalization":
        return (gamma, None) if not ir.has_input(node, 2) else None
    beta = ir.input_const(node, 2) if ir.has_input(node, 2) else np.zeros(gamma.shape, dtype=gamma.dtype)
    if beta is None or beta.shape != gamma.shape:
        return None
    return gamma, beta


def write_norm(node: gs.Node, gamma: np.ndarray, beta: np.ndarray | None) -> None:
    """Store a normalisation's refitted scale and bias (a LayerNormalization without a bias gains one)."""
    old = ir.input_const(node, 1)
    assert old is not None
    edit.set_input_const(node, 1, gamma.reshape(old.shape))
    if beta is None:
        return
    if ir.has_input(node, 2):
        edit.set_input_const(node, 2, beta.reshape(old.shape))
    else:
        edit.append_input(node, edit.make_constant(f"{node.name}__bias", beta.astype(old.dtype).reshape(old.shape)), 2)


class MeanShift:
    """Per-channel mean of ``target - output`` over every other axis, streamed (float64 totals)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, target: np.ndarray, output: np.ndarray) -> None:
        diff = np.moveaxis(np.asarray(target, dtype=np.float64) - output, self.axis, 0)
        diff = diff.reshape(diff.shape[0], -1)
        total = diff.sum(axis=1)
        self.total = total if self.total is None else self.total + total
        self.count += diff.shape[1]

    def shift(self) -> np.ndarray:
        assert self.total is not None
        return self.total / max(self.count, 1)


def shift_bias(node: gs.Node, delta: np.ndarray) -> None:
    """Add `delta` (one value per output channel) to the bias of a Conv / ConvTranspose, adding a bias if it has none."""
    weight = ir.input_const(node, 1)
    assert weight is not None
    if ir.has_input(node, 2):
        bias = ir.input_const(node, 2)
        assert bias is not None
        edit.set_input_const(node, 2, (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
        return
    edit.append_input(node, edit.make_constant(f"{node.name}__bias", delta.astype(weight.dtype)), 2)


def make_finish(
    ctx: Context, plan: Plan, *, mode: str = "ls", settings: Settings | None = None
) -> Reconstructor:
    """The finish step refitting the consumers of `plan`'s pruned channels (see module docstring)."""
    if ctx.calibration is None:
        raise ModelError("reconstruction needs calibration data")
    settings = settings or Settings.from_params(ctx.params, ctx.options.batch_size, ctx.options.seed, mode, ridge_folds(ctx),
                                                model_kind(ctx.model))
    if ctx.params.token_weights is not False and settings.token_mask is None:
        settings = replace(settings, token_mask=ir.token_mask_input(ctx.model))
    targets = reconstruction_targets(ctx.trace, ctx.graph, plan, settings)
    nodes, notes = list(targets.refit), list(targets.notes)
    if settings.error_correction and len(nodes) > len(targets.consumers):
        log.info("reconstruct: error correction refits %d layers downstream of the %d consumers",
                 len(nodes) - len(targets.consumers), len(targets.consumers))
    short = short_of_rows(ctx, plan, nodes, settings)
    note = rows_note(short, len(nodes))
    if note is not None:
        log.warning("%s", note)
        notes.append(note)
    return Reconstructor(ctx.model, ctx.trace, plan, ctx.calibration, tuple(nodes), settings, ctx.progress, tuple(notes),
                         consumers=targets.consumers, mean=targets.mean, depthwise=targets.depthwise, norms=targets.norms)


def ridge_folds(ctx: Context) -> int:
    """Folds of the refit's cross-validated ridge: `DEFAULT_CNN_RIDGE_FOLDS` on a convolutional network (a Conv, no
    attention heads) whose run leaves ``params["ridge"]`` at its default, else `DEFAULT_RIDGE_FOLDS`."""
    if float(ctx.params.ridge) != DEFAULT_RIDGE:
        return DEFAULT_RIDGE_FOLDS
    kinds = ctx.trace.node_kind
    convolutional = any(kind in (Kind.CONV, Kind.DEPTHWISE) for kind in kinds.values())
    heads = any(not g.is_frozen and transformer_part(kinds, g) is TransformerPart.HEADS for g in ctx.trace.groups)
    return DEFAULT_CNN_RIDGE_FOLDS if convolutional and not heads else DEFAULT_RIDGE_FOLDS


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


def with_reconstruction(ctx: Context, outcome: MethodOutcome, *, mode: str = "ls") -> MethodOutcome:
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
