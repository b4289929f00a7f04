"""onnxslim-prune: framework-agnostic structured pruning for ONNX models."""

from .api import Analysis, PruneResult, analyze, prune
from .errors import CalibrationError, ModelError, PruneError, UsageError, ValidationError

__all__ = [
    "Analysis", "PruneResult", "analyze", "prune",
    "PruneError", "UsageError", "ModelError", "CalibrationError", "ValidationError",
]
__version__ = "0.1.0"
