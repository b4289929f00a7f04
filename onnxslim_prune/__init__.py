"""onnxslim-prune: framework-agnostic structured pruning for ONNX models."""

from ._version import __version__
from .api import Analysis, PreparedRun, PruneResult, analyze, prepare, prune
from .calib.cache import CacheInfo, CacheSettings, cache_info, clear_cache
from .catalog import MethodInfo, list_methods, model_stats
from .errors import CalibrationError, GateError, ModelError, PruneError, UsageError, ValidationError
from .planning.search import SearchSettings, find_smallest, sensitivity_profile
from .settings import RunSettings
from .judge.validate import ModelStats
from .judge.verdict import Gates

__all__ = [
    "__version__", "Analysis", "PruneResult", "analyze", "prune", "prepare", "PreparedRun", "RunSettings",
    "find_smallest", "sensitivity_profile", "SearchSettings", "Gates",
    "CacheSettings", "CacheInfo", "cache_info", "clear_cache",
    "MethodInfo", "list_methods", "ModelStats", "model_stats",
    "PruneError", "UsageError", "ModelError", "CalibrationError", "ValidationError", "GateError",
]
