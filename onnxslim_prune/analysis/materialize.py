"""Build a candidate pruned model cheaply, without touching the caller's graph.

Search methods (layer-compensated ranking, budgets, block ranking, reconstruction)
evaluate many plans; each candidate is a copy of the normalised graph with the plan
applied, exported without the final validation (the chosen plan is validated by `api`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from .apply import apply_plan
from .plan import Plan
from ..channels import Trace


def materialize(
    graph: gs.Graph,
    like: onnx.ModelProto,
    trace: Trace,
    plan: Plan,
    opset: int,
    overrides: Mapping[tuple[str, int], np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The model `plan` produces, from a copy of `graph` (left unchanged)."""
    work = ir.copy_graph(graph)
    apply_plan(work, trace, plan, opset, overrides)
    return ir.export_fast(work, like)
