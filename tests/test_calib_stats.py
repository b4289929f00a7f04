"""Calibration statistics internals: position sampling, pad-free im2col, the BLAS thread policy
while streaming, and the precision of float32 Gram products (``calib.patches``, ``calib.threads``,
``calib.collect.stream_tensors``, ``calib.accumulators.GramAccumulator``)."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_info, threadpool_limits

from onnxslim_prune.calib import input_specs, load_calibration, stream_tensors
from onnxslim_prune.calib import patches
from onnxslim_prune.calib.patches import PositionSampler, conv_output_size, conv_patches, output_rows, sample_positions
from onnxslim_prune.calib.accumulators import GramAccumulator
from onnxslim_prune.calib.threads import ENV, blas_limited, blas_threads, stream_blas_threads

# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("out_positions", "positions"), [(784, 16), (49, 16), (10, 9), (5000, 3), (64, 16)])
def test_sampling_is_seeded_sorted_and_without_replacement(out_positions: int, positions: int) -> None:
    a = sample_positions(37, out_positions, positions, np.random.default_rng(11))
    b = sample_positions(37, out_positions, positions, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)  # same seed, same draw
    assert a.shape == (37, positions) and a.dtype.kind == "i"
    assert np.all(np.diff(a, axis=1) > 0)  # sorted and no repeats within an image
    assert a.min() >= 0 and a.max() < out_positions
    c = sample_positions(37, out_positions, positions, np.random.default_rng(12))
    assert not np.array_equal(a, c)  # another seed, another draw
    np.testing.assert_array_equal(sample_positions(2, 5, 0), np.zeros((2, 0), np.int64))
    np.testing.assert_array_equal(sample_positions(2, 5, None), [list(range(5))] * 2)
    np.testing.assert_array_equal(sample_positions(2, 5, 9), [list(range(5))] * 2)
    with pytest.raises(ValueError, match="positions"):
        sample_positions(2, 5, -1)


@pytest.mark.parametrize(("out_positions", "positions"), [(196, 16), (40, 25)])  # the sparse and the dense rule
def test_sampling_covers_positions_uniformly(out_positions: int, positions: int) -> None:
    """Every position is drawn ``batch * P / n`` times on average; each count within 5 sigma.

    A position's count over ``B`` independent rows is Binomial(B, P/n); 5 sigma over all ``n``
    positions is a false alarm rate below 1e-4 for a fair sampler, while a sampler biased
    toward low indices (e.g. the first P distinct values of a sorted draw) fails by far.
    """
    batch = 20000
    index = sample_positions(batch, out_positions, positions, np.random.default_rng(3))
    counts = np.bincount(index.ravel(), minlength=out_positions)
    p = positions / out_positions
    mean, sigma = batch * p, np.sqrt(batch * p * (1 - p))
    assert counts.sum() == batch * positions
    assert np.abs(counts - mean).max() <= 5 * sigma, (counts.min(), counts.max(), mean, sigma)
    # the smallest pick of a uniform P-subset of range(n) has mean (n - P) / (P + 1): no edge bias
    expected_min = (out_positions - positions) / (positions + 1)
    assert abs(index[:, 0].mean() - expected_min) < 0.03 * expected_min + 0.05


def test_position_sampler_shares_one_draw_per_size() -> None:
    sampler = PositionSampler(np.random.default_rng([7, 0]))
    first = sample_positions(8, 196, 16, sampler)
    assert sample_positions(8, 196, 16, sampler) is first  # a second layer of the same size: the same rows
    assert not first.flags.writeable
    other = sampler(8, 49, 16)
    assert other.shape == (8, 16) and other.max() < 49
    # the draws are those of the generator in first-request order
    rng = np.random.default_rng([7, 0])
    np.testing.assert_array_equal(first, sample_positions(8, 196, 16, rng))
    np.testing.assert_array_equal(other, sample_positions(8, 49, 16, rng))
    np.testing.assert_array_equal(sampler(8, 49, None), np.broadcast_to(np.arange(49), (8, 49)))
    # conv_patches with an int count and a sampler uses the shared rows
    x = np.random.default_rng(1).standard_normal((8, 3, 14, 14)).astype(np.float32)
    np.testing.assert_array_equal(
        conv_patches(x, (3, 3), pads=(1, 1, 1, 1), positions=16, rng=sampler),
        conv_patches(x, (3, 3), pads=(1, 1, 1, 1), positions=first),
    )


# ----------------------------------------------------------------------------- pad-free im2col


def padded_reference(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
                     dilations: tuple[int, ...]) -> np.ndarray:
    """Naive im2col of ``np.pad``-ed input: ``[N, Ho*Wo, C*kh*kw]`` (1-D as height 1)."""
    if x.ndim == 3:
        x, kernel, strides = x[:, :, None, :], (1, kernel[0]), (1, strides[0])
        pads, dilations = (0, pads[0], 0, pads[1]), (1, dilations[0])
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho, wo = conv_output_size((h, w), kernel, strides, pads, dilations)
    out = np.empty((n, ho * wo, c * kh * kw), x.dtype)
    for i, j in itertools.product(range(ho), range(wo)):
        window = xp[:, :, i * sh : i * sh + (kh - 1) * dh + 1 : dh, j * sw : j * sw + (kw - 1) * dw + 1 : dw]
        out[:, i * wo + j] = window.reshape(n, -1)
    return out


GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((5, 3), (2, 1), (2, 0, 1, 3), (1, 2)),
    ((3, 3), (1, 2), (0, 2, 1, 0), (2, 1)),
    ((1, 1), (1, 1), (1, 0, 0, 1), (1, 1)),  # a padded pointwise conv
    ((2, 2), (3, 3), (4, 4, 4, 4), (1, 1)),  # pads wider than the kernel: whole rows of zeros
    ((7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
    ((3, 3), (1, 1), (0, 0, 0, 0), (3, 3)),
]


@pytest.mark.parametrize("density", [0.0, float("inf")])  # the row-table gather, the direct gather
@pytest.mark.parametrize(("kernel", "strides", "pads", "dilations"), GEOMETRIES)
def test_clamped_patches_equal_the_padded_reference(
    kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, ...], dilations: tuple[int, int], density: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(patches, "TABLE_DENSITY", density)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 4, 11, 9)).astype(np.float32)
    x[0, 0] = np.inf  # a value that must not leak into a zero (0 * inf would be nan)
    ref = padded_reference(x, kernel, strides, pads, dilations)
    n, rows, cols = ref.shape
    dense = conv_patches(x, kernel, strides, pads, dilations)
    np.testing.assert_array_equal(dense, ref.reshape(n * rows, cols))
    for count in (1, 5, rows):
        index = sample_positions(n, rows, count, np.random.default_rng(count))
        got = conv_patches(x, kernel, strides, pads, dilations, positions=index)
        np.testing.assert_array_equal(got, np.take_along_axis(ref, index[:, :, None], axis=1).reshape(-1, cols))
    index = sample_positions(n, rows, 3, np.random.default_rng(0))
    group = conv_patches(x, kernel, strides, pads, dilations, group_slice=slice(1, 3), positions=index)
    ref_group = padded_reference(x[:, 1:3], kernel, strides, pads, dilations)
    np.testing.assert_array_equal(group, np.take_along_axis(ref_group, index[:, :, None], axis=1).reshape(-1, cols // 2))


@pytest.mark.parametrize(("kernel", "stride", "pads", "dilation"), [(3, 1, (1, 1), 1), (3, 2, (1, 0), 1), (5, 1, (4, 2), 2)])
@pytest.mark.parametrize("density", [0.0, float("inf")])
def test_clamped_patches_of_1d_convs(kernel: int, stride: int, pads: tuple[int, int], dilation: int, density: float,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patches, "TABLE_DENSITY", density)
    x = np.random.default_rng(22).standard_normal((2, 3, 13)).astype(np.float32)
    ref = padded_reference(x, (kernel,), (stride,), pads, (dilation,))
    np.testing.assert_array_equal(conv_patches(x, (kernel,), (stride,), pads, (dilation,)), ref.reshape(-1, ref.shape[2]))
    index = sample_positions(2, ref.shape[1], 4, np.random.default_rng(0))
    got = conv_patches(x, (kernel,), (stride,), pads, (dilation,), positions=index)
    np.testing.assert_array_equal(got, np.take_along_axis(ref, index[:, :, None], axis=1).reshape(-1, ref.shape[2]))


def test_patch_errors() -> None:
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="positions"):
        conv_patches(x, (3, 3), pads=(1, 1, 1, 1), positions=np.full((2, 3), -1))
    with pytest.raises(ValueError, match="does not fit"):
        conv_patches(x, (5, 5))
    y = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(output_rows(y, np.array([[0, 3], [1, 2]])), [[0, 4, 8], [3, 7, 11], [13, 17, 21], [14, 18, 22]])


# ----------------------------------------------------------------------------- BLAS threads while streaming


def _threads() -> set[int]:
    return {int(info["num_threads"]) for info in threadpool_info() if info["user_api"] == "blas"}


@contextlib.contextmanager
def two_blas_threads():  # type: ignore[no-untyped-def]
    """Start from 2 BLAS threads so that a limit to 1 can be seen (skip where BLAS cannot have 2)."""
    if not _threads():
        pytest.skip("no BLAS library is loaded")
    with threadpool_limits(limits=2, user_api="blas"):
        if _threads() != {2}:
            pytest.skip("BLAS here cannot run 2 threads")
        yield


def tiny_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 8, 8])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_calib(tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tiny_model()
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((10, 3, 8, 8)).astype(np.float32))
    return model, load_calibration(tmp_path / "x.npy", input_specs(model))


def test_stream_tensors_holds_one_blas_thread_over_its_loop_and_releases_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    model, calib = tiny_calib(tmp_path)
    with two_blas_threads():
        seen = []
        for batch in stream_tensors(model, calib, ["c"], batch_size=4):
            seen.append(_threads())  # the caller's reduction of each batch runs under the limit
            _ = batch["c"].reshape(-1, 8) @ batch["c"].reshape(-1, 8).T
        assert seen == [{1}] * 3
        assert _threads() == {2}  # exhausted: released

        stream = stream_tensors(model, calib, ["c"], batch_size=4)
        assert _threads() == {2}  # a generator does nothing until its first next()
        next(stream)
        assert _threads() == {1}
        stream.close()  # abandoned early: released at close
        assert _threads() == {2}

        with contextlib.closing(stream_tensors(model, calib, ["c"], batch_size=4)) as closing:
            for _ in closing:
                break
        assert _threads() == {2}

        # two interleaved streams that finish in the other order: the originals come back only after both
        a, b = (stream_tensors(model, calib, ["c"], batch_size=4) for _ in range(2))
        next(a)
        next(b)
        a.close()
        assert _threads() == {1}
        b.close()
        assert _threads() == {2}

        # an error inside the loop releases the limit too
        with pytest.raises(RuntimeError, match="reducer"):
            for _ in stream_tensors(model, calib, ["c"], batch_size=4):
                raise RuntimeError("reducer failed")
        assert _threads() == {2}

        assert [_threads() for _ in stream_tensors(model, calib, ["c"], batch_size=4, blas_threads=None)] == [{2}] * 3
        monkeypatch.setenv(ENV, "off")
        assert [_threads() for _ in stream_tensors(model, calib, ["c"], batch_size=4)] == [{2}] * 3
    assert blas_threads()  # filepath -> threads, for reports


def test_blas_limited_policy() -> None:
    with two_blas_threads():
        with blas_limited():
            assert _threads() == {1}
            with blas_limited(2):  # the most restrictive request stays in force
                assert _threads() == {1}
            assert _threads() == {1}
        assert _threads() == {2}
        with blas_limited(None):
            assert _threads() == {2}
    with pytest.raises(ValueError, match="threads"):
        with blas_limited(0):
            pass


def test_stream_blas_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert stream_blas_threads() == 1
    for value, expected in (("2", 2), ("0", None), ("off", None), (" 1 ", 1)):
        monkeypatch.setenv(ENV, value)
        assert stream_blas_threads() == expected
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ValueError, match=ENV):
        stream_blas_threads()


# ----------------------------------------------------------------------------- float32 Gram products


def correlated(rows: int, dim: int, mean: float, std: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.eye(dim) + 0.3 * rng.standard_normal((dim, dim))
    return (mean + std * rng.standard_normal((rows, dim)) @ mixing).astype(np.float32)


def reference_cov(x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Two-pass float64 centred moments of the very float32 values the accumulator saw."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    if y is None:
        return xc.T @ xc / len(x), None
    yc = y.astype(np.float64) - y.astype(np.float64).mean(0)
    return xc.T @ xc / len(x), xc.T @ yc / len(x)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_float32_products_keep_a_small_variance_under_a_large_mean() -> None:
    """Mean 1e3, std 1e-2 (mean/std = 1e5): float32-product centred covariance within 1e-5 of float64.

    Measured here: 1.1e-6 with the shift (float64 products: 4e-15); without it
    (``shift=False``) the float32 products lose the variance entirely (error ~5e2).
    """
    x = correlated(6000, 24, 1e3, 1e-2, seed=0)
    y = correlated(6000, 5, -3e2, 1e-3, seed=1)
    want_xx, want_xy = reference_cov(x, y)
    acc = GramAccumulator(24, 5, full_yty=True, product_dtype=np.float32)
    for rows in np.array_split(np.arange(6000), 23):  # uneven batches; the shift is the first batch's mean
        acc.update(x[rows], y[rows])
    sxx, sxy = acc.centred()
    assert sxy is not None and want_xy is not None
    assert relative_error(sxx, want_xx) < 1e-5
    assert relative_error(sxy, want_xy) < 1e-5
    # element-wise, relative to the scale of each entry (sqrt(var_i var_j))
    scale = np.sqrt(np.outer(np.diag(want_xx), np.diag(want_xx)))
    assert (np.abs(sxx - want_xx) / scale).max() < 1e-5
    yc = y.astype(np.float64) - y.astype(np.float64).mean(0)
    assert relative_error(acc.cov_y, yc.T @ yc / 6000) < 1e-5
    np.testing.assert_allclose(acc.mean_x, x.astype(np.float64).mean(0), rtol=1e-12)
    # the raw moments are still there, in float64, for callers that centre themselves
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(acc.xtx, x64.T @ x64, rtol=1e-9)
    np.testing.assert_allclose(acc.xty, x64.T @ y.astype(np.float64), rtol=1e-9)

    plain = GramAccumulator(24, product_dtype=np.float32, shift=False)
    plain.update(x)
    assert relative_error(plain.centred()[0], want_xx) > 1.0  # why the shift is there


def test_float32_products_on_activation_like_data_match_float64() -> None:
    """ReLU-like rows (half zeros, mean ~0.4, std ~0.6): float32 and float64 products agree to 1e-6."""
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((4096, 64)) @ (np.eye(64) + 0.2 * rng.standard_normal((64, 64))), 0).astype(np.float32)
    f64, f32 = GramAccumulator(64), GramAccumulator(64, product_dtype=np.float32)
    for rows in np.array_split(x, 16):
        f64.update(rows)
        f32.update(rows)
    assert relative_error(f32.centred()[0], f64.centred()[0]) < 1e-6
    assert relative_error(f32.xtx, f64.xtx) < 1e-6
    np.testing.assert_array_equal(f32.sum_x, f64.sum_x)  # column sums are float64 sums of the rows either way


def test_gram_accumulator_shift_is_invisible_in_float64() -> None:
    """float64 products: shifted and plain accumulation give the same raw and centred moments."""
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((300, 7)) + 5.0, rng.standard_normal((300, 3)) - 2.0
    shifted, plain = GramAccumulator(7, 3), GramAccumulator(7, 3, shift=False)
    for rows in np.array_split(np.arange(300), 9):
        shifted.update(x[rows], y[rows])
        plain.update(x[rows], y[rows])
    for attr in ("xtx", "xty", "yty", "sum_x", "sum_y"):
        np.testing.assert_allclose(getattr(shifted, attr), getattr(plain, attr), rtol=1e-12)
    np.testing.assert_allclose(shifted.xtx, x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(shifted.yty, (y * y).sum(0), rtol=1e-12)
    np.testing.assert_allclose(shifted.centred()[0], np.cov(x.T, bias=True), rtol=1e-10, atol=1e-12)
    empty = GramAccumulator(7, 3)
    empty.update(np.zeros((0, 7)), np.zeros((0, 3)))
    assert empty.count == 0 and empty.shift_x is None
    with pytest.raises(ValueError, match="rows"):
        empty.update(np.zeros((2, 7)), np.zeros((3, 3)))
    assert empty.count == 0  # a rejected update changes nothing


@pytest.mark.parametrize("weighted", [False, True])
def test_a_wide_batch_is_accumulated_in_blocks_of_rows_within_their_bytes(
    monkeypatch: pytest.MonkeyPatch, weighted: bool,
) -> None:
    """A batch of 3,000 rows of 4,000 outputs (a language model's logits, scaled down) goes in blocks of at most
    1 MiB of shifted rows: numpy's traced peak stays within a few blocks (one float64 copy of the batch is 96 MB),
    and the moments equal one product's to 1e-12."""
    import tracemalloc

    from onnxslim_prune.calib import accumulators

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 4000)) + 0.1 * rng.standard_normal((3000, 4000)) + 2.0).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 3000) if weighted else None
    whole = GramAccumulator(6, 4000, full_yty=False)
    whole.update(x, y, w)
    monkeypatch.setattr(accumulators, "ROW_BLOCK_BYTES", 1 << 20)
    blocked = GramAccumulator(6, 4000, full_yty=False)
    tracemalloc.start()
    try:
        blocked.update(x, y, w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # the moments (6 x 4,000 float64: 0.2 MB) and a few 1 MiB blocks
    assert blocked.count == pytest.approx(whole.count, rel=1e-12) and blocked.rows == whole.rows == 3000
    for attr in ("xtx", "xty", "yty", "sum_x", "sum_y"):
        np.testing.assert_allclose(getattr(blocked, attr), getattr(whole, attr), rtol=1e-12)
    np.testing.assert_allclose(blocked.centred()[1], whole.centred()[1], rtol=1e-9, atol=1e-12)
