"""Published figures the benchmarks set beside their own (a script's table and the README's headline read them)."""

from __future__ import annotations

#: Neuron Merging, the authors' code on fmnist_lenet300_nm.onnx (../shared/README.md): ratio -> (prune, merge) accuracy %
AUTHORS_CODE: dict[float, tuple[float, float]] = {0.5: (88.05, 88.06), 0.6: (84.78, 84.51), 0.7: (80.68, 80.25), 0.8: (56.37, 57.53)}
#: Neuron Merging's Table 1 (their own checkpoint, baseline 89.80%): ratio -> (prune, merge) accuracy %
PAPER: dict[float, tuple[float, float]] = {0.5: (88.40, 88.69), 0.6: (85.17, 86.92), 0.7: (71.26, 82.75), 0.8: (66.76, 80.02)}
