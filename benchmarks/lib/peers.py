"""Peer tools run the same way by every benchmark that compares with them.

    from lib.peers import onnxsim_prune
    pruned, seconds = onnxsim_prune(model, 0.5)     # onnxsim 0.8.1's structured pruning of a copy
"""

from __future__ import annotations

import time
import warnings
from typing import Any


def onnxsim_prune(original: Any, ratio: float) -> tuple[Any, float]:
    """onnxsim's structured pruning of a copy of `original` (an onnx.ModelProto), and its seconds."""
    import onnx
    import onnxsim

    model = onnx.ModelProto()
    model.CopyFrom(original)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = onnxsim.apply_structured_pruning(model, sparsity=ratio, importance_norm="l1", global_sparsity=False)
    return pruned, time.perf_counter() - started

