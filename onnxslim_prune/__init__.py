"""onnxslim-prune: framework-agnostic structured pruning for ONNX models."""

from ._version import __version__
from .api import Analysis, PruneResult, analyze, prune
from .errors import CalibrationError, GateError, ModelError, PruneError, UsageError, ValidationError

__all__ = [
    "__version__", "Analysis", "PruneResult", "analyze", "prune",
    "PruneError", "UsageError", "ModelError", "CalibrationError", "ValidationError", "GateError",
]
