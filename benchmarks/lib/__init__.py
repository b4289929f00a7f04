"""The benchmarks' small library: shared paths and loaders, the measurement of a fresh process, the one result
writer, plot helpers.

A benchmark is a script beside this folder, run as ``python benchmarks/NAME.py``: Python puts the script's
folder first on ``sys.path``, so ``from lib.data import load_split`` imports this package, with no ``sys.path``
edit. Scripts import nothing from each other; what two of them share lives here.

The library under test is whichever ``onnxslim_prune`` Python imports: the installed package, or this
checkout with ``PYTHONPATH=.`` (``run_all.py`` sets it for every step). Scripts use only its public API
(``onnxslim_prune/__init__.py`` and the ``onnx-prune`` CLI); the few benchmarks that measure internals take
the private names they need from `lib.internals`, the one place that names them.

- `lib.paths`: this checkout, ../shared (models, data, zoo), the real models, the results folder;
- `lib.data`: Fashion-MNIST arrays and calibration files, image folders, text .npz, zoo models;
- `lib.runtime`: onnxruntime sessions, accuracy, validity checks and timings written here, not the tool's;
- `lib.measure`: a command in a fresh process (wall time, its own peak RSS), the CLI measured that way;
- `lib.results`: the machine/onnxruntime/commit header and the one writer of ``NAME.json`` + ``NAME.md``;
- `lib.plots`: matplotlib on Agg, percent axes, model names;
- `lib.photos`, `lib.packaged`, `lib.quantized`: the real photos, the pip packages' models, quantized forms;
- `lib.glance`, `lib.published`: the README's headline figures, published figures set beside ours.
"""

from __future__ import annotations

import importlib.util
import logging

from .paths import ROOT


def library_origin() -> str | None:
    """The file ``import onnxslim_prune`` loads (None: not importable), found without importing it."""
    spec = importlib.util.find_spec("onnxslim_prune")
    return None if spec is None else spec.origin


def is_checkout_library() -> bool:
    """Whether ``import onnxslim_prune`` loads this checkout's package."""
    origin = library_origin()
    return origin is not None and origin.startswith(str(ROOT / "onnxslim_prune") + "/")


def require_checkout() -> None:
    """Stop (one line, exit 1) unless the library is this checkout's: for what must describe this very code."""
    if not is_checkout_library():
        raise SystemExit(f"refused: this must describe this checkout's onnxslim_prune ({ROOT}), not {library_origin()}; "
                         f"run with PYTHONPATH={ROOT}")


if not is_checkout_library():
    logging.getLogger(__name__).warning("onnxslim_prune is imported from %s, not this checkout (%s): run with "
                                        "PYTHONPATH=%s to measure it", library_origin(), ROOT, ROOT)
