"""Block (layer) pruning: removing whole residual blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx

from .methods import Context, Options, Outcome, register
from .plan import Plan


def prune_blocks(
    model: onnx.ModelProto,
    fraction: float,
    calibration: Any,
    input_shapes: Mapping[str, tuple[int, ...]],
    options: Options,
) -> tuple[onnx.ModelProto, list[str]]:
    """Remove `fraction` of the removable residual blocks; returns the new model and notes."""
    raise NotImplementedError("block pruning is not implemented yet")


@register("layer")
def layer(ctx: Context) -> Outcome:
    """Block pruning happens before tracing (see `prune_blocks`); no channel is removed here."""
    return Outcome(Plan(()))
