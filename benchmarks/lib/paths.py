"""Where the benchmarks' material lives: this checkout, ../shared, the real models, the results.

Every path a benchmark reads by default, in one place (the command-line flags still override them).
"""

from __future__ import annotations

from pathlib import Path

#: benchmarks/
BENCH = Path(__file__).resolve().parents[1]
#: the repository's root (the checkout holding onnxslim_prune/)
ROOT = BENCH.parent
#: the committed results (benchmarks/results/NAME.{md,json} and plots)
RESULTS = BENCH / "results"
#: scratch space of the benchmarks that keep work between runs (git-ignored)
WORK = BENCH / "work"
#: the material shared by the engineers (../shared: README.md describes it)
SHARED = ROOT.parent / "shared"
#: the trained models (Fashion-MNIST nets, EfficientNet-Lite1)
SHARED_MODELS = SHARED / "models"
FASHION_MNIST = SHARED / "data" / "fashion-mnist"
#: the ImageNet-like image folders (calib/, eval/)
IMAGES = SHARED / "data" / "imagenetlike"
#: tokenised text for the transformer models (*_calib.npz, *_eval.npz)
TEXT = SHARED / "data" / "text"
#: the zoo's graphs without weights and their fill.py
ZOO = SHARED / "zoo"
#: where zoo models filled with seeded random weights are kept (fill.py writes them)
FILLED = Path("/tmp/zoo")
#: the real transformer models (all_minilm_l6_v2.onnx, smollm2_135m.onnx)
REAL_MODELS = ROOT.parent / "real-models"
