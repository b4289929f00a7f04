"""The pipeline of a run as typed passes over a state (`core`), its passes (`run`), analysis and judging."""

from .core import Pass, PassContractError, PassManager, PassResult, PassStatus

__all__ = ["Pass", "PassContractError", "PassManager", "PassResult", "PassStatus"]
