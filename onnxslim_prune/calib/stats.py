"""Streaming reducers with float64 accumulation; memory is bounded by the statistic size.

``ChannelMoments`` keeps, per channel ``c`` over every value ``v`` seen on that channel::

    mean = sum(v) / n      mean_abs = sum(|v|) / n      sq_mean = sum(v**2) / n
    apoz = #(v <= 0) / n   (Average Percentage of Zeros, as after a ReLU)

``GramAccumulator`` keeps ``XtX``, ``XtY``, ``YtY`` (diagonal or full), row count and column
sums of row matrices ``X [rows, dim_x]`` / ``Y [rows, dim_y]``; ``solve_ridge(alpha)`` solves::

    min_W ||X W - Y||^2 + alpha * count * ||W||^2   <=>   (XtX + alpha*count*I) W = XtY

Conv geometry helpers (``conv_patches`` and friends) live in ``patches`` and are re-exported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg

from .patches import conv_output_size, conv_patches, linear_rows, output_rows, sample_positions

__all__ = [
    "ChannelMoments",
    "GramAccumulator",
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


class GramAccumulator:
    """Streaming ``XtX``, ``XtY``, ``YtY`` and column sums for least-squares reconstruction."""

    def __init__(
        self, dim_x: int, dim_y: int | None = None, *, full_yty: bool = False, product_dtype: type = np.float64
    ) -> None:
        """``product_dtype=np.float32``: each batch's products in float32 (about twice as fast),
        the running totals still in float64; for statistics that rank, not for exact solves."""
        self.dim_x, self.dim_y, self.full_yty = dim_x, dim_y, full_yty
        self.product_dtype = np.dtype(product_dtype)
        self.count = 0
        self.xtx = np.zeros((dim_x, dim_x))
        self.sum_x = np.zeros(dim_x)
        self.xty = None if dim_y is None else np.zeros((dim_x, dim_y))
        self.sum_y = None if dim_y is None else np.zeros(dim_y)
        self.yty = None if dim_y is None else np.zeros((dim_y, dim_y) if full_yty else dim_y)

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Add rows ``x [rows, dim_x]`` and, if ``dim_y`` was given, ``y [rows, dim_y]``."""
        xd = np.asarray(x, dtype=self.product_dtype).reshape(-1, self.dim_x)
        self.xtx += xd.T @ xd
        self.sum_x += xd.sum(axis=0, dtype=np.float64)
        self.count += xd.shape[0]
        if self.dim_y is None:
            if y is not None:
                raise ValueError("GramAccumulator was built without dim_y")
            return
        if y is None:
            raise ValueError("GramAccumulator needs y rows")
        yd = np.asarray(y, dtype=self.product_dtype).reshape(-1, self.dim_y)
        if yd.shape[0] != xd.shape[0]:
            raise ValueError(f"x has {xd.shape[0]} rows, y has {yd.shape[0]}")
        assert self.xty is not None and self.sum_y is not None and self.yty is not None
        self.xty += xd.T @ yd
        self.sum_y += yd.sum(axis=0, dtype=np.float64)
        self.yty += yd.T @ yd if self.full_yty else np.einsum("ij,ij->j", yd, yd)

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
