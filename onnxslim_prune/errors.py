"""One exception hierarchy; the CLI turns each into a one-line message and an exit code.

Exit codes: 2 for a usage problem (bad flag value, bad path), 1 for a model or data problem,
3 for a pruned model that missed a quality gate, 130 for an interrupted run (the CLI's).
"""

from __future__ import annotations


class PruneError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code: int = 1


class UsageError(PruneError):
    """The request itself is wrong: bad ratio, unknown method, output equal to input, ..."""

    exit_code = 2


class ModelError(PruneError):
    """The model cannot be read, is not valid ONNX, or a transformation could not be validated."""


class CalibrationError(PruneError):
    """Calibration data is missing, unreadable, or does not match the model's inputs."""


class ValidationError(ModelError):
    """A pruned model failed validation; it is never written."""


class GateError(PruneError):
    """The pruned model is valid but missed a quality gate (``--min-cosine`` ...); its report is still written."""

    exit_code = 3
