"""A run as typed passes over a state (`core`): the passes before the runs (`prepare`), those of each run (`run`),
and what they share to judge a run (`judging`: sessions, the original's outputs, the verdict's run, the timing)."""

from .core import Pass, PassContractError, PassManager, PassResult, PassStatus

__all__ = ["Pass", "PassContractError", "PassManager", "PassResult", "PassStatus"]
