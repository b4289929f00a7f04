"""im2col rows for Conv / Gemm least-squares statistics.

For a 2-D Conv with input ``x [N, C, H, W]``, weight ``W [Cout, C/g, kh, kw]``, strides ``s``,
pads ``(top, left, bottom, right)`` and dilations ``d``::

    Ho = (H + top + bottom - d_h*(kh-1) - 1) // s_h + 1      (same for Wo)
    y[n, :, i, j] = W.reshape(Cout, -1) @ patch(n, i, j)

where ``patch(n, i, j)`` is the (C, kh, kw)-ordered window of the zero-padded input. Output
positions are numbered ``i * Wo + j``; ``sample_positions`` draws a sorted subset per image with
a seeded generator and ``output_rows`` takes the matching rows ``[rows, Cout]`` of a Conv output.
1-D Convs (``x [N, C, L]``) are handled as height 1. 1x1 / Gemm inputs need only a transpose.
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


def sample_positions(batch: int, out_positions: int, positions: int | None, rng: np.random.Generator | None = None) -> np.ndarray:
    """``[batch, P]`` sorted flat output indices, ``P = min(positions, out_positions)`` per image."""
    if positions is None or positions >= out_positions:
        return np.broadcast_to(np.arange(out_positions), (batch, out_positions))
    rng = np.random.default_rng(0) if rng is None else rng
    picks = [np.sort(rng.choice(out_positions, size=positions, replace=False)) for _ in range(batch)]
    return np.stack(picks) if picks else np.zeros((0, positions), dtype=np.int64)


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


def conv_patches(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group_slice: slice | None = None,
    positions: Positions = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """im2col rows ``[rows, C*kh*kw]`` (columns ordered (C, kh, kw)) for an NCHW input.

    ``positions``: None = every output position; an int = that many per image drawn with ``rng``
    (seed 0 if None); an ``[N, P]`` array from ``sample_positions`` = exactly those (use the same
    array with ``output_rows`` to get the matching Conv output rows). ``group_slice`` selects the
    input channels of one group.
    """
    x4, (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = _as_2d(np.asarray(x), kernel, strides, pads, dilations)
    if group_slice is not None:
        x4 = x4[:, group_slice]
    n, _, h, w = x4.shape
    ho, wo = conv_output_size((h, w), (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw))
    index = positions if isinstance(positions, np.ndarray) or positions is None else sample_positions(
        n, ho * wo, positions, rng
    )
    if index is not None and (index.ndim != 2 or index.shape[0] != n or (index.size and index.max() >= ho * wo)):
        raise ValueError(f"positions must be [{n}, P] indices below {ho * wo}, got shape {index.shape}")
    if index is not None and index.shape[1] == ho * wo and bool((index == np.arange(ho * wo)).all()):
        index = None  # every position in order: a plain transpose is cheaper than a gather
    if kh == kw == 1 and not any((pt, pl, pb, pr)):
        return _gather(x4[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw], index)
    if any((pt, pl, pb, pr)):
        x4 = np.pad(x4, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
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
