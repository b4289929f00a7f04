"""Calibration data, activation collection, streaming statistics and their on-disk cache."""

from __future__ import annotations

from .cache import CacheInfo, CacheSettings, cache_info, cache_path, cached, clear_cache, model_digest, resolve_cache_dir
from .collect import expose_tensors, exposed_session, stream_tensors
from .patches import conv_output_size, conv_patches, linear_rows, output_rows, sample_positions
from .preprocess import Preprocess
from .sources import DEFAULT_RANDOM_SAMPLES, CalibrationSet, load_calibration
from .specs import InputSpec, input_specs, parse_input_shape
from .accumulators import ChannelMoments, GramAccumulator

__all__ = [
    "DEFAULT_RANDOM_SAMPLES",
    "CacheInfo",
    "CacheSettings",
    "CalibrationSet",
    "ChannelMoments",
    "GramAccumulator",
    "InputSpec",
    "Preprocess",
    "cache_info",
    "cache_path",
    "cached",
    "clear_cache",
    "conv_output_size",
    "conv_patches",
    "expose_tensors",
    "exposed_session",
    "input_specs",
    "linear_rows",
    "load_calibration",
    "model_digest",
    "output_rows",
    "parse_input_shape",
    "resolve_cache_dir",
    "sample_positions",
    "stream_tensors",
]
