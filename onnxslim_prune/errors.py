"""One exception hierarchy; the CLI turns each into a one-line message and an exit code.

Exit codes: 2 for a usage problem (bad flag value, bad path), 1 for a model or data problem.
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
