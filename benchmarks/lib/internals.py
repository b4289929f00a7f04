"""Every private name of onnxslim_prune a benchmark uses, in one place.

The benchmarks use the public API (``onnxslim_prune/__init__.py``, the ``onnx-prune`` CLI). The few that
measure the library's internals (the calibration engine's passes, the ridge of the refit, the round-to
rule, the speed gate's tolerance, the LayerNorm refit, the image loader's exact formula), and the generator
of the reference pages (the method and op-rule registries), take what they need from here, so that a change
of the library's layout is one edit in this file, not a hunt through scripts. Each name says who needs it
and why it is not public.
"""

from __future__ import annotations

# bench_calibration.py, bench_engine.py, bench_ridge.py: the calibration engine's passes and the refit, timed and
# patched one by one (what a run does inside; no user calls them)
from onnxslim_prune.calib import conv_output_size, input_specs, load_calibration
from onnxslim_prune.methods.base import Context, Options
from onnxslim_prune.methods import activation, datadriven, reconstruct

# bench_real_memory.py: the eval images exactly as the CLI's image-folder flags preprocess them
from onnxslim_prune.calib.preprocess import Preprocess

# bench_never_slower.py: the not-slower gate's tolerance, and the round-to multiple chosen on this machine
from onnxslim_prune.judge.latency import SLOWER_TOLERANCE
from onnxslim_prune.roundto import auto

# bench_round_to.py: the round-to rule's CPU flags and the multiple they give
from onnxslim_prune.roundto import cpu_flags, isa_multiple

# bench_vit.py: refits the LayerNorms of a pruned ViT between two runs (an experiment, not a method)
from onnxslim_prune.methods.lnrefit import refit_layernorms

# lib/docs.py (update_docs.py): the reference pages are generated from the registries themselves
from onnxslim_prune.methods import builtin  # noqa: F401  (fills the method registry)
from onnxslim_prune.methods.base import METHODS, CommonParams, settings_of
from onnxslim_prune.methods.defaults import DATA_DRIVEN_DEFAULTS
from onnxslim_prune.ops import registry
from onnxslim_prune.ops.registry import MAX_OPSET, OpRule

__all__ = [
    "conv_output_size", "input_specs", "load_calibration", "Preprocess", "SLOWER_TOLERANCE", "Context", "Options",
    "activation", "datadriven", "reconstruct", "refit_layernorms", "auto", "cpu_flags", "isa_multiple",
    "METHODS", "CommonParams", "settings_of", "DATA_DRIVEN_DEFAULTS", "registry", "MAX_OPSET", "OpRule",
]
