"""onnxslim-prune: framework-agnostic structured pruning for ONNX models."""

from ._version import __version__
from .api import Analysis, PruneResult, analyze, prune
from .calib.cache import CacheInfo, CacheSettings, cache_info, clear_cache
from .errors import CalibrationError, GateError, ModelError, PruneError, UsageError, ValidationError

__all__ = [
    "__version__", "Analysis", "PruneResult", "analyze", "prune",
    "CacheSettings", "CacheInfo", "cache_info", "clear_cache",
    "PruneError", "UsageError", "ModelError", "CalibrationError", "ValidationError", "GateError",
]
