"""Streaming reducers with float64 accumulation; memory is bounded by the statistic size.

``ChannelMoments`` keeps, per channel ``c`` over every value ``v`` seen on that channel::

    mean = sum(v) / n      mean_abs = sum(|v|) / n      sq_mean = sum(v**2) / n
    apoz = #(v <= 0) / n   (Average Percentage of Zeros, as after a ReLU)

``GramAccumulator`` keeps ``XtX``, ``XtY``, ``YtY`` (diagonal or full), row count and column
sums of row matrices ``X [rows, dim_x]`` / ``Y [rows, dim_y]``; ``solve_ridge(alpha)`` solves::

    min_W ||X W - Y||^2 + alpha * count * ||W||^2   <=>   (XtX + alpha*count*I) W = XtY

Conv geometry helpers (``conv_patches`` and friends) live in ``patches`` and are re-exported.
``GramAccumulator`` shifts rows before its products so that float32 products keep small
variances under large means (its docstring says where float64 is kept and why).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from .patches import PositionSampler, conv_output_size, conv_patches, linear_rows, output_rows, sample_positions

__all__ = [
    "ChannelMoments",
    "GramAccumulator",
    "PositionSampler",
    "conv_output_size",
    "conv_patches",
    "linear_rows",
    "output_rows",
    "sample_positions",
]


class ChannelMoments:
    """Per-channel count, mean, mean |x|, second moment and APoZ along ``channel_axis``."""

    _FIELDS = ("sum", "sum_abs", "sum_sq", "nonpos")

    def __init__(self, channel_axis: int = 1) -> None:
        self.channel_axis = channel_axis
        self._count = 0
        self._acc: dict[str, np.ndarray] | None = None

    def update(self, x: np.ndarray) -> None:
        """Add every value of ``x`` (any rank >= 1) to its channel's totals."""
        x = np.asarray(x)
        if not -x.ndim <= self.channel_axis < x.ndim:
            raise ValueError(f"channel axis {self.channel_axis} is out of range for a tensor of shape {x.shape}")
        axis = self.channel_axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != axis)
        xd = x.astype(np.float64, copy=False)
        batch = {
            "sum": xd.sum(axis=axes),
            "sum_abs": np.abs(xd).sum(axis=axes),
            "sum_sq": np.square(xd).sum(axis=axes),
            "nonpos": np.count_nonzero(xd <= 0, axis=axes).astype(np.float64),
        }
        if self._acc is None:
            self._acc = batch
        else:
            if batch["sum"].shape != self._acc["sum"].shape:
                raise ValueError(f"channel count changed: {self._acc['sum'].shape[0]} -> {batch['sum'].shape[0]}")
            for key, value in batch.items():
                self._acc[key] += value
        self._count += x.size // max(x.shape[axis], 1)

    def _ratio(self, key: str) -> np.ndarray:
        if self._acc is None or self._count == 0:
            raise ValueError("ChannelMoments has seen no data")
        return self._acc[key] / self._count

    @property
    def count(self) -> int:
        """Values seen per channel."""
        return self._count

    @property
    def channels(self) -> int:
        return 0 if self._acc is None else int(self._acc["sum"].shape[0])

    @property
    def mean(self) -> np.ndarray:
        return self._ratio("sum")

    @property
    def mean_abs(self) -> np.ndarray:
        return self._ratio("sum_abs")

    @property
    def sq_mean(self) -> np.ndarray:
        """Second moment E[x^2] per channel."""
        return self._ratio("sum_sq")

    @property
    def var(self) -> np.ndarray:
        """Population variance E[x^2] - E[x]^2, clipped at 0."""
        return np.asarray(np.maximum(self.sq_mean - np.square(self.mean), 0.0))

    @property
    def apoz(self) -> np.ndarray:
        """Fraction of values <= 0 per channel."""
        return self._ratio("nonpos")

    def state(self) -> dict[str, np.ndarray]:
        """Arrays for the on-disk cache; ``from_state`` restores them."""
        if self._acc is None:
            raise ValueError("ChannelMoments has seen no data")
        return {**self._acc, "count": np.array(self._count), "channel_axis": np.array(self.channel_axis)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ChannelMoments:
        moments = cls(int(state["channel_axis"]))
        moments._count = int(state["count"])
        moments._acc = {key: np.array(state[key], dtype=np.float64) for key in cls._FIELDS}
        return moments


def _plus_rank2(s: np.ndarray, a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """``s + a1 b1^T + a2 b2^T`` as one k=2 product and one add (two passes over a large ``s``)."""
    got = np.stack([a1, a2], axis=1) @ np.stack([b1, b2], axis=1).T
    got += s
    return got


#: most bytes of the shifted rows (`GramAccumulator.update`) one product takes; a larger batch goes in blocks of rows
ROW_BLOCK_BYTES = 64 << 20


class GramAccumulator:
    """Streaming ``XtX``, ``XtY``, ``YtY`` and column sums for least-squares reconstruction.

    Public state (float64): ``count``, ``sum_x``, ``sum_y`` and the raw moments ``xtx``,
    ``xty``, ``yty`` (diagonal, or full with ``full_yty``), exactly as if every row had been
    multiplied out; ``centred()`` / ``cov_y`` give the per-row centred moments directly.

    Precision. Each batch is shifted by a fixed vector before its products: ``Xs = X - shift_x``
    (``shift_x`` = the first batch's column means, rounded to ``product_dtype``; same for Y),
    and ``Xs^T Xs``, ``Xs^T Ys``, ``Ys^T Ys`` are computed in ``product_dtype`` and added to
    float64 totals. With ``product_dtype=np.float32`` (sgemm / ssyrk: about half the time of
    float64) a product's rounding is relative to the *shifted* values, so a small variance
    under a large mean survives: without the shift, float32 ``x^T x`` of data with mean 1e3
    and std 1e-2 keeps nothing of the variance (its rounding, ~6e-8 of mean^2, is 600x the
    variance); with it the centred covariance matches float64 to ~1e-6 (tests/test_calib_stats).
    Float64 is kept for what float32 cannot carry: the running totals (many batches), the
    column sums (summed in float64 from the rows), the shift bookkeeping and everything derived
    from them (raw moments, centring, solves), since ``xtx / n - mean mean^T`` cancels
    ``mean^2`` down to the variance. ``product_dtype`` stays float64 by default: refits solve
    ridge systems whose conditioning can amplify a 1e-6 covariance error; use float32 for
    statistics that rank or select (input covariances, energy scores), or for a refit
    whose ridge bounds the condition number. ``shift=False`` restores plain products.
    """

    def __init__(
        self, dim_x: int, dim_y: int | None = None, *, full_yty: bool = False, product_dtype: type = np.float64,
        shift: bool = True,
    ) -> None:
        """``product_dtype=np.float32``: each batch's products in float32, totals in float64 (class docstring)."""
        self.dim_x, self.dim_y, self.full_yty = dim_x, dim_y, full_yty
        self.product_dtype = np.dtype(product_dtype)
        self.shift = shift
        self.count: float = 0  # rows, or the sum of their weights (`update`)
        self.rows = 0  # rows of nonzero weight
        self.sum_x = np.zeros(dim_x)
        self.sum_y: np.ndarray | None = None if dim_y is None else np.zeros(dim_y)
        self.shift_x: np.ndarray | None = None  # float64 values representable in product_dtype; set by the first rows
        self.shift_y: np.ndarray | None = None
        self._sxx = np.zeros((dim_x, dim_x))  # product sums over shifted rows
        self._sxy = None if dim_y is None else np.zeros((dim_x, dim_y))
        self._syy = None if dim_y is None else np.zeros((dim_y, dim_y) if full_yty else dim_y)
        self._derived: dict[str, np.ndarray] = {}

    def _shift_of(self, rows: np.ndarray) -> np.ndarray:
        if not self.shift:
            return np.zeros(rows.shape[1])
        mean = rows.mean(axis=0, dtype=np.float64)
        return np.asarray(mean.astype(self.product_dtype).astype(np.float64))

    def _shifted(self, rows: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """``rows - shift`` in ``product_dtype``, rounded once (subtracted at the wider of the two types)."""
        if not self.shift:
            return rows.astype(self.product_dtype, copy=False)
        work = np.result_type(rows.dtype, self.product_dtype)
        return np.subtract(rows, shift.astype(work), dtype=work).astype(self.product_dtype, copy=False)

    def update(self, x: np.ndarray, y: np.ndarray | None = None, weights: np.ndarray | None = None) -> None:
        """Add rows ``x [rows, dim_x]`` and, if ``dim_y`` was given, ``y [rows, dim_y]``; `weights` (one per row,
        >= 0): each row counts that many times in every moment (``count`` is then their sum)."""
        xr = np.asarray(x).reshape(-1, self.dim_x)
        yr = None
        if self.dim_y is None:
            if y is not None:
                raise ValueError("GramAccumulator was built without dim_y")
        else:
            if y is None:
                raise ValueError("GramAccumulator needs y rows")
            yr = np.asarray(y).reshape(-1, self.dim_y)
            if yr.shape[0] != xr.shape[0]:
                raise ValueError(f"x has {xr.shape[0]} rows, y has {yr.shape[0]}")
        if xr.shape[0] == 0:
            return
        if self.shift_x is None:
            self.shift_x = self._shift_of(xr)
        if yr is not None and self.shift_y is None:
            self.shift_y = self._shift_of(yr)
        wr = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        # a block of rows at a time: its shifted copies (and their squares) stay within
        # `ROW_BLOCK_BYTES`, however many rows a batch brings (SmolLM2's logits: 4,096 rows of 49,152)
        step = max(1, ROW_BLOCK_BYTES // (8 * (self.dim_x + (self.dim_y or 0))))  # 8: the shift's float64 work type
        for at in range(0, xr.shape[0], step):
            self._update_block(xr[at:at + step], None if yr is None else yr[at:at + step],
                               None if wr is None else wr[at:at + step])
        self._derived.clear()

    def _update_block(self, xr: np.ndarray, yr: np.ndarray | None, wr: np.ndarray | None) -> None:
        assert self.shift_x is not None
        xs = self._shifted(xr, self.shift_x)
        if wr is None:
            self._sxx += xs.T @ xs
            self.sum_x += xr.sum(axis=0, dtype=np.float64)  # shifted sums follow: sum_x - count * shift_x
            self.count += xr.shape[0]
            self.rows += xr.shape[0]
        else:  # a weighted row counts as `weight` copies of itself
            self._sxx += xs.T @ (xs * wr.astype(xs.dtype)[:, None])
            self.sum_x += wr @ xr.astype(np.float64)
            self.count += float(wr.sum())
            self.rows += int(np.count_nonzero(wr))
        if yr is None:
            return
        assert self._sxy is not None and self._syy is not None and self.sum_y is not None and self.shift_y is not None
        ys = self._shifted(yr, self.shift_y)
        if wr is not None:
            wy = wr.astype(ys.dtype)[:, None]
            self._sxy += xs.T @ (ys * wy)
            self.sum_y += wr @ yr.astype(np.float64)
            self._syy += ys.T @ (ys * wy) if self.full_yty else (np.square(ys) * wy).sum(axis=0, dtype=np.float64)
            return
        self._sxy += xs.T @ ys
        self.sum_y += yr.sum(axis=0, dtype=np.float64)
        self._syy += ys.T @ ys if self.full_yty else np.square(ys).sum(axis=0, dtype=np.float64)

    def _shifted_sums(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Column sums of the shifted rows, ``sum - count * shift`` (float64; the shift is near the mean)."""
        sx = self.sum_x if self.shift_x is None else self.sum_x - self.count * self.shift_x
        if self.sum_y is None:
            return sx, None
        return sx, (self.sum_y if self.shift_y is None else self.sum_y - self.count * self.shift_y)

    def _raw(self, key: str) -> np.ndarray:
        """``sum (s + c)(t + d)^T`` from shifted sums: ``S + c st^T + ss d^T + n c d^T`` (cached until the next update)."""
        got = self._derived.get(key)
        if got is not None:
            return got
        n = self.count
        sx, sy = self._shifted_sums()
        cx = np.zeros(self.dim_x) if self.shift_x is None else self.shift_x
        if key == "xtx":
            got = _plus_rank2(self._sxx, cx, sx + 0.5 * n * cx, sx + 0.5 * n * cx, cx)
        else:
            assert sy is not None and self._sxy is not None and self._syy is not None and self.dim_y is not None
            cy = np.zeros(self.dim_y) if self.shift_y is None else self.shift_y
            if key == "xty":
                got = _plus_rank2(self._sxy, sx, cy, cx, sy + n * cy)
            elif self.full_yty:
                got = _plus_rank2(self._syy, cy, sy + 0.5 * n * cy, sy + 0.5 * n * cy, cy)
            else:
                got = self._syy + 2.0 * cy * sy + n * np.square(cy)
        self._derived[key] = got
        return got

    @property
    def xtx(self) -> np.ndarray:
        """``X^T X`` [dim_x, dim_x] (float64)."""
        return self._raw("xtx")

    @property
    def xty(self) -> np.ndarray | None:
        """``X^T Y`` [dim_x, dim_y] (float64), None without ``dim_y``."""
        return None if self.dim_y is None else self._raw("xty")

    @property
    def yty(self) -> np.ndarray | None:
        """``Y^T Y`` [dim_y, dim_y] with ``full_yty``, else its diagonal [dim_y]; None without ``dim_y``."""
        return None if self.dim_y is None else self._raw("yty")

    def centred(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(S_xx, S_xy)``: centred second moments per row (``S_xy`` None without ``dim_y``).

        ``S_xx = sum (x - mean)(x - mean)^T / n``, computed from the shifted sums (no ``mean^2``
        cancellation), so it keeps a small variance under a large mean.
        """
        n = max(self.count, 1)
        sx, sy = self._shifted_sums()
        mx = sx / n
        sxx = self._sxx / n - np.outer(mx, mx)
        if self._sxy is None or sy is None:
            return sxx, None
        return sxx, self._sxy / n - np.outer(mx, sy / n)

    @property
    def cov_y(self) -> np.ndarray:
        """Centred ``Y`` second moments per row: full [dim_y, dim_y] with ``full_yty``, else the variances."""
        _, sy = self._shifted_sums()
        if self._syy is None or sy is None:
            raise ValueError("GramAccumulator was built without dim_y")
        n = max(self.count, 1)
        my = sy / n
        return np.asarray(self._syy / n - (np.outer(my, my) if self.full_yty else np.square(my)))

    @property
    def mean_x(self) -> np.ndarray:
        return self.sum_x / max(self.count, 1)

    @property
    def mean_y(self) -> np.ndarray:
        if self.sum_y is None:
            raise ValueError("GramAccumulator was built without dim_y")
        return self.sum_y / max(self.count, 1)

    def _system(self, alpha: float, keep: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
        if self.xty is None:
            raise ValueError("solve_ridge needs y rows (dim_y)")
        idx = np.arange(self.dim_x) if keep is None else np.asarray(keep, dtype=np.intp)
        a = self.xtx[np.ix_(idx, idx)] + alpha * self.count * np.eye(idx.size)
        return a, self.xty[idx]

    def solve_ridge(self, alpha: float = 0.0, keep: Sequence[int] | None = None) -> np.ndarray:
        """``W [len(keep) or dim_x, dim_y]`` minimising ``||X[:, keep] W - Y||^2 + alpha*count*||W||^2``."""
        import scipy.linalg  # on first use (see `methods.reconstruct.solve_spd`)

        a, b = self._system(alpha, keep)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
                return np.asarray(scipy.linalg.solve(a, b, assume_a="pos"))
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
            return np.asarray(scipy.linalg.lstsq(a, b)[0])

    def sse(self, w: np.ndarray, keep: Sequence[int] | None = None) -> np.ndarray:
        """Per-column ``||X[:, keep] W - Y||^2`` from the accumulated moments (needs ``YtY``)."""
        a, b = self._system(0.0, keep)
        assert self.yty is not None
        yty = np.diag(self.yty) if self.full_yty else self.yty
        quadratic = np.einsum("ij,ik,kj->j", w, a, w)
        return np.asarray(quadratic - 2.0 * np.einsum("ij,ij->j", w, b) + yty)
