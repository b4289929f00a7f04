"""Label-free recovery (``--recover``): gradient block reconstruction of the pruned model against the original.

Closed-form compensation refits one linear layer at a time; past a few percent of the MACs a trained network
loses function no single-layer solve brings back. Recovery runs after it: for each block between two cut points
(`blocks.find_blocks`: a residual block, an MBConv block, a transformer sub-layer), it takes gradient steps (Adam,
cosine-decayed learning rate) on that block's own weights so that, on the pruned network's own activations at the
block's input, the block's output follows the original network's output at the same cut::

    min_W  sum_t ||f_W(x_pruned) - y_original,t||^2 / ||y_original,t - mean||^2     (t: the block's compared outputs)

Blocks are recovered in order and each reads the inputs the already recovered blocks produce, so errors do not
accumulate. No labels and no training code: only initializers change, the graph's nodes are the same, and the
model then goes through the same validation and verdict as any other. In a sequence model with a padding mask
input (`ir.token_mask_input`) the positions of padding tokens count in no loss and no guard, as in the refit and
the verdict: nothing reads the outputs there (all-MiniLM-L6-v2's calibration sentences are 43% padding).

Guarded: the steps see only the fit part of the calibration data, split again (seeded) into the samples the
steps fit and a *guard* part; a block keeps its recovered weights only if its error on the guard samples is
below the closed-form weights' (the best of a few checkpoints); a block rejected so tries again from its
closed-form weights at a tenth of the learning rate (`RecoverSettings.retries`), and once a retry is kept after
a first try the clock did not cut, the blocks after it start at its rate. Then the whole network is judged
on the guard samples: the recovered weights stay in the first blocks, as many as bring its outputs closest to the
original's (`fit._network_guard`, as many prefixes as ``--recover-time`` pays for), and the closed-form ones go
back in the rest. The verdict's held-out samples are never read.
Deterministic: seeded sampling, `torch.use_deterministic_algorithms`, a fixed thread count. Memory: block
activations come from the calibration engine's frontier (`calib.engine.StagedPasses`), and the samples held for
one block stay within a share of ``--calib-memory``.

The gradient engine is PyTorch's CPU build, an optional extra (``pip install 'onnxslim-prune[recover]'``); this
module imports without it, and `require_torch` turns its absence into one usage error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..channels import Trace
from ..errors import UsageError
from ..analysis.plan import Plan

#: what to install for --recover
INSTALL_HINT = "pip install 'onnxslim-prune[recover]'"

#: Adam steps per block (``--recover-steps``)
DEFAULT_STEPS = 200
#: Adam's learning rate at the first step (``--recover-lr``; cosine-decayed to zero)
DEFAULT_LR = 1e-2
#: seconds the recovery may take (``--recover-time``), the network guard's passes included; each block gets its share
#: of what is left after them
DEFAULT_SECONDS = 1800.0
#: samples per gradient step
DEFAULT_BATCH = 16


@dataclass(frozen=True)
class RecoverSettings:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    seconds: float = DEFAULT_SECONDS
    batch: int = DEFAULT_BATCH
    seed: int = 0
    #: tries a block the guard rejects gets again, each from its closed-form weights at a tenth of the last rate
    retries: int = 1
    batch_size: int = 32  # the calibration passes' batch (``--batch-size``)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.steps < 1 or self.batch < 1 or not self.lr > 0 or not self.seconds > 0:
            raise ValueError(f"recover settings out of range: {self}")


def torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) raises ValueError
        return False


def require_torch() -> None:
    """Raise the one usage error of --recover without the extra (before any work)."""
    if not torch_available():
        raise UsageError(f"--recover needs PyTorch (CPU build): {INSTALL_HINT}")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--recover needs PyTorch (CPU build), which did not import ({exc}): {INSTALL_HINT}") from None


def requested(params: Any, *, calib: str | None, seed: int, batch_size: int) -> RecoverSettings | None:
    """The run's `RecoverSettings` when ``--recover`` is on (`params`: a `CommonParams`), else None.

    Checked before any work: recovery needs real calibration samples and the ``[recover]`` extra.
    """
    if not getattr(params, "recover", None):
        return None
    if calib is None or calib == "random":
        raise UsageError("--recover needs real calibration data (--calib PATH): it fits each block to the original's "
                         "outputs on those samples")
    require_torch()
    return RecoverSettings(steps=int(params.recover_steps), lr=float(params.recover_lr), seconds=float(params.recover_time),
                           seed=seed, batch_size=batch_size)


#: tensor name -> (channel axis, the original's positions the pruned tensor keeps)
Kept = Mapping[str, tuple[int, np.ndarray]]


def kept_channels(trace: Trace, plan: Plan) -> Kept:
    """Where a traced tensor lost channels, which of the original's it keeps (the original's block outputs are
    compared on those: a pruned residual stream is matched channel for channel)."""
    keep = plan.atom_keep(trace)
    out: dict[str, tuple[int, np.ndarray]] = {}
    for name, cmap in trace.maps.items():
        mask = keep[cmap.atoms]
        if not mask.all():
            out[name] = (cmap.axis, np.flatnonzero(mask))
    return out


def run(original: onnx.ModelProto, pruned: onnx.ModelProto, fit: Any, settings: RecoverSettings,
        progress: Callable[[int, int], None] | None = None, kept: Kept | None = None,
        ) -> tuple[onnx.ModelProto, tuple[str, ...], dict[str, Any]]:
    """Recover `pruned`'s blocks (`fit.recover`): the model (its initializers changed), the report's notes and its
    ``extra`` entry (``{"recover": {"seconds": ..., "blocks": [...]}}``)."""
    from .fit import recover

    result = recover(original, pruned, fit, settings, progress, kept or {})
    return result.model, result.notes, {"recover": result.record()}


__all__ = ["Kept", "kept_channels", "DEFAULT_LR", "DEFAULT_SECONDS", "DEFAULT_STEPS", "INSTALL_HINT", "RecoverSettings", "require_torch",
           "requested", "run", "torch_available"]
