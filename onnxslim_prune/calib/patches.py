"""im2col rows for Conv / Gemm least-squares statistics.

For a 2-D Conv with input ``x [N, C, H, W]``, weight ``W [Cout, C/g, kh, kw]``, strides ``s``,
pads ``(top, left, bottom, right)`` and dilations ``d``::

    Ho = (H + top + bottom - d_h*(kh-1) - 1) // s_h + 1      (same for Wo)
    y[n, :, i, j] = W.reshape(Cout, -1) @ patch(n, i, j)

where ``patch(n, i, j)`` is the (C, kh, kw)-ordered window of the zero-padded input. Output
positions are numbered ``i * Wo + j``; ``sample_positions`` draws a sorted subset per image with
a seeded generator and ``output_rows`` takes the matching rows ``[rows, Cout]`` of a Conv output.
1-D Convs (``x [N, C, L]``) are handled as height 1. 1x1 / Gemm inputs need only a transpose.

Cost: sampling is one vectorised draw per call (``PositionSampler`` shares it between the
layers of one batch that have the same output size); the padded input is never built: each
window element is read at its clamped input coordinate and set to zero where the window
leaves the input, so rows equal those of the zero-padded input exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Positions = int | np.ndarray | None


def conv_output_size(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
    dilations: Sequence[int],
) -> tuple[int, ...]:
    """Output spatial size of a Conv (pads in ONNX order: all begins, then all ends)."""
    rank = len(spatial)
    return tuple(
        (spatial[i] + pads[i] + pads[i + rank] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(rank)
    )


def _draw(rng: np.random.Generator, batch: int, n: int, k: int) -> np.ndarray:
    """``[batch, k]`` sorted uniform k-subsets of ``range(n)``, ``0 < k < n``, one vectorised draw.

    Few positions (``4k <= n``): ``k + max(k, 8)`` integers per row, the first ``k`` distinct
    values in draw order kept (sequential sampling that skips repeats: uniform without
    replacement); a row with too many repeats is drawn again by the dense rule. Otherwise the
    ``k`` smallest of ``n`` uniform keys per row (``argpartition``).
    """
    out = np.empty((batch, k), dtype=np.int64)
    redo = np.ones(batch, dtype=bool)
    if 4 * k <= n:
        draws = rng.integers(0, n, size=(batch, k + max(k, 8)))
        order = np.argsort(draws, axis=1, kind="stable")
        ordered = np.take_along_axis(draws, order, axis=1)
        first_sorted = np.ones(draws.shape, dtype=bool)
        first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # stable: a value's first draw comes first
        fresh = np.empty_like(first_sorted)
        np.put_along_axis(fresh, order, first_sorted, axis=1)
        take = fresh & (np.cumsum(fresh, axis=1) <= k)
        redo = take.sum(axis=1) < k
        good = ~redo
        out[good] = draws[good][take[good]].reshape(-1, k)
    if redo.any():
        keys = rng.random((int(redo.sum()), n))
        out[redo] = np.argpartition(keys, k - 1, axis=1)[:, :k]
    out.sort(axis=1)
    return out


def sample_positions(
    batch: int, out_positions: int, positions: int | None, rng: np.random.Generator | PositionSampler | None = None
) -> np.ndarray:
    """``[batch, P]`` sorted flat output indices, ``P = min(positions, out_positions)`` per image.

    Each row is a uniform sample without replacement, drawn for the whole batch at once from
    ``rng`` (seed 0 if None). ``rng`` may be a ``PositionSampler``: then layers of one batch
    asking for the same ``(batch, out_positions, positions)`` share one draw. ``positions``
    None or ``>= out_positions``: every position (a read-only broadcast of ``arange``).
    """
    if isinstance(rng, PositionSampler):
        return rng(batch, out_positions, positions)
    if positions is None or positions >= out_positions:
        return np.broadcast_to(np.arange(out_positions), (batch, out_positions))
    if positions < 0:
        raise ValueError(f"positions must be >= 0, got {positions}")
    if batch == 0 or positions == 0:
        return np.zeros((batch, positions), dtype=np.int64)
    return _draw(np.random.default_rng(0) if rng is None else rng, batch, out_positions, positions)


class PositionSampler:
    """Position draws of one batch, shared by every layer with the same output size.

    ::

        sampler = PositionSampler(np.random.default_rng([seed, batch_index]))
        index = sample_positions(n, ho * wo, P, sampler)      # or sampler(n, ho * wo, P)
        rows = conv_patches(x, kernel, ..., positions=index)  # and output_rows(y, index)

    The first request for a ``(batch, out_positions, positions)`` draws from ``rng``; later
    ones return the same read-only array, so the draws depend on the order of first requests
    only (deterministic for a fixed layer order). Make one sampler per batch.
    """

    def __init__(self, rng: np.random.Generator | int | None = None) -> None:
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
        self._drawn: dict[tuple[int, int, int | None], np.ndarray] = {}

    def __call__(self, batch: int, out_positions: int, positions: int | None) -> np.ndarray:
        key = (int(batch), int(out_positions), None if positions is None or positions >= out_positions else int(positions))
        index = self._drawn.get(key)
        if index is None:
            index = sample_positions(key[0], key[1], key[2], self.rng)
            if index.flags.writeable:
                index.setflags(write=False)
            self._drawn[key] = index
        return index


def _as_2d(
    x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int]
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
    if x.ndim == 3:
        return x[:, :, None, :], (1, kernel[0]), (1, strides[0]), (0, pads[0], 0, pads[1]), (1, dilations[0])
    if x.ndim != 4:
        raise ValueError(f"conv_patches supports 1-D and 2-D convs, got input of rank {x.ndim}")
    return (
        x, (kernel[0], kernel[1]), (strides[0], strides[1]),
        (pads[0], pads[1], pads[2], pads[3]), (dilations[0], dilations[1]),
    )


def _gather(windows: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    """Rows from ``windows [N, C, Ho, Wo, ...]`` at flat positions ``index [N, P]`` (None = all)."""
    n, c, ho, wo = windows.shape[:4]
    if index is None:
        order = (0, 2, 3, 1, *range(4, windows.ndim))
        return windows.transpose(order).reshape(n * ho * wo, -1)
    images = np.repeat(np.arange(n), index.shape[1])
    rows, cols = np.divmod(index.reshape(-1), wo)
    return windows[images, :, rows, cols].reshape(images.size, -1)


def _tap_range(out: int, size: int, stride: int, start: int) -> tuple[int, int]:
    """Output indices ``[lo, hi)`` whose input coordinate ``i * stride + start`` lies in ``[0, size)``."""
    lo = max(0, -(start // stride)) if start < 0 else 0
    hi = min(out, (size - 1 - start) // stride + 1) if size - 1 - start >= 0 else 0
    return lo, max(lo, hi)


def _dense_patches(
    x4: np.ndarray, ho: int, wo: int, kernel: tuple[int, int], strides: tuple[int, int], begins: tuple[int, int],
    dilations: tuple[int, int],
) -> np.ndarray:
    """Every window ``[N*Ho*Wo, C*kh*kw]``: one strided copy per tap, zeros where it leaves the input."""
    n, c, h, w = x4.shape
    (kh, kw), (sh, sw), (pt, pl), (dh, dw) = kernel, strides, begins, dilations
    out = np.zeros((n, ho, wo, c, kh, kw), dtype=x4.dtype)
    for a in range(kh):
        i0, i1 = _tap_range(ho, h, sh, a * dh - pt)
        if i0 >= i1:
            continue
        r0 = i0 * sh + a * dh - pt
        for b in range(kw):
            j0, j1 = _tap_range(wo, w, sw, b * dw - pl)
            if j0 >= j1:
                continue
            c0 = j0 * sw + b * dw - pl
            src = x4[:, :, r0 : r0 + (i1 - i0 - 1) * sh + 1 : sh, c0 : c0 + (j1 - j0 - 1) * sw + 1 : sw]
            out[:, i0:i1, j0:j1, :, a, b] = src.transpose(0, 2, 3, 1)
    return out.reshape(n * ho * wo, c * kh * kw)


#: sampled windows per input element above which the batch is first laid out as a row table
TABLE_DENSITY = 0.1


def _sampled_patches(
    x4: np.ndarray, index: np.ndarray, wo: int, kernel: tuple[int, int], strides: tuple[int, int],
    begins: tuple[int, int], dilations: tuple[int, int], padded: bool,
) -> np.ndarray:
    """Windows at ``index [N, P]``: one gather at clamped input coordinates, zero outside the input.

    Many windows per input element (``rows * taps >= TABLE_DENSITY * N*H*W``): the batch is
    copied once to a ``[N*H*W + 1, C]`` row table whose last row is zero, and every window
    element is one row ``take`` (outside the input: the zero row). Few: a fancy-index gather
    straight from NCHW at clamped coordinates, then zeros written where the window left the
    input. Both are exact copies of the zero-padded input's windows.
    """
    n, c, h, w = x4.shape
    (kh, kw), (sh, sw), (pt, pl), (dh, dw) = kernel, strides, begins, dilations
    images = np.repeat(np.arange(n), index.shape[1])
    oi, oj = np.divmod(index.reshape(-1).astype(np.intp, copy=False), wo)
    rows = (oi * sh - pt)[:, None, None] + (np.arange(kh) * dh)[None, :, None]  # [R, kh, 1]
    cols = (oj * sw - pl)[:, None, None] + (np.arange(kw) * dw)[None, None, :]  # [R, 1, kw]
    r, taps = images.size, kh * kw
    inside = (((rows >= 0) & (rows < h)) & ((cols >= 0) & (cols < w))) if padded else None  # [R, kh, kw]
    if r * taps >= TABLE_DENSITY * n * h * w:
        flat = (images[:, None, None] * h + rows) * w + cols
        if inside is not None:
            flat = np.where(inside, flat, n * h * w)
        table = np.empty((n * h * w + 1, c), dtype=x4.dtype)
        table[:-1].reshape(n, h, w, c)[...] = x4.transpose(0, 2, 3, 1)
        table[-1] = 0
        got = table.take(flat.reshape(-1), axis=0).reshape(r, taps, c)
    else:
        if inside is not None:
            rows, cols = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
        got = x4.reshape(n, c, h * w)[images[:, None], :, (rows * w + cols).reshape(r, taps)]  # [R, taps, C]
        if inside is not None and not inside.all():
            got[~inside.reshape(r, taps)] = 0
    return got.transpose(0, 2, 1).reshape(r, c * taps)


def conv_patches(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group_slice: slice | None = None,
    positions: Positions = None,
    rng: np.random.Generator | PositionSampler | None = None,
) -> np.ndarray:
    """im2col rows ``[rows, C*kh*kw]`` (columns ordered (C, kh, kw)) for an NCHW input.

    ``positions``: None = every output position; an int = that many per image drawn with ``rng``
    (seed 0 if None; a ``PositionSampler`` shares the draw); an ``[N, P]`` array from
    ``sample_positions`` = exactly those (use the same array with ``output_rows`` to get the
    matching Conv output rows). ``group_slice`` selects the input channels of one group. Rows
    are those of the zero-padded input, computed without padding the batch.
    """
    x4, (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = _as_2d(np.asarray(x), kernel, strides, pads, dilations)
    if group_slice is not None:
        x4 = x4[:, group_slice]
    n, c, h, w = x4.shape
    ho, wo = conv_output_size((h, w), (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw))
    if ho <= 0 or wo <= 0:
        raise ValueError(f"the conv window does not fit the input: output size {(ho, wo)} for input {(h, w)}")
    index = positions if isinstance(positions, np.ndarray) or positions is None else sample_positions(
        n, ho * wo, positions, rng
    )
    if index is not None and (
        index.ndim != 2 or index.shape[0] != n or (index.size and (index.max() >= ho * wo or index.min() < 0))
    ):
        raise ValueError(f"positions must be [{n}, P] indices in [0, {ho * wo}), got shape {index.shape}")
    if index is not None and index.shape[1] == ho * wo and bool((index == np.arange(ho * wo)).all()):
        index = None  # every position in order: a plain transpose is cheaper than a gather
    padded = any((pt, pl, pb, pr))
    if kh == kw == 1 and not padded:
        return _gather(x4[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw], index)
    if index is not None:
        return _sampled_patches(x4, index, wo, (kh, kw), (sh, sw), (pt, pl), (dh, dw), padded)
    if padded:
        return _dense_patches(x4, ho, wo, (kh, kw), (sh, sw), (pt, pl), (dh, dw))
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(x4, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    return _gather(windows[:, :, :ho, :wo], index)


def output_rows(y: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Rows ``[rows, Cout]`` of a Conv output ``y [N, Cout, ...]`` at ``sample_positions`` indices."""
    y = np.asarray(y)
    n, c = y.shape[:2]
    y4 = y.reshape(n, c, 1, -1)
    return _gather(y4, positions)


def linear_rows(x: np.ndarray) -> np.ndarray:
    """Rows ``[rows, K]`` of a Gemm/MatMul input ``[..., K]`` (a view when ``x`` is contiguous)."""
    x = np.asarray(x)
    return x.reshape(-1, x.shape[-1])
