"""Peers on the same work: Torch-Pruning and onnxsim against onnxslim-prune, same weights, same ratios.

    python benchmarks/peers.py                      # 4 models x ratios 0.1-0.8, + the anchors (about 50 min)
    python benchmarks/peers.py --quick              # LeNet-300-100 only, ratios 0.5,0.8 (seconds)
    python benchmarks/peers.py --append --no-anchors --models fmnist_resnet56 --tools onnxsim  # redo some rows
    python benchmarks/peers.py --rebuild            # rewrite the markdown from peers.json

Needs the `bench` extra plus a CPU torch (`pip install torch==2.13.0 torch-pruning==1.6.1
onnxsim==0.8.1`); a tool that is not installed is skipped with a note. Nothing is downloaded:
the models are ../shared/models, the data ../shared/data/fashion-mnist.

What runs, for every model and ratio (uniform ratio per channel group, no fine-tuning):

* ``torch-pruning``: the PyTorch definitions of ../shared/models/train_fmnist.py (copied below),
  weights loaded back from the ONNX initializers (Conv/Gemm/BatchNormalization nodes mapped to
  modules through their export scopes, every tensor loaded once, logits checked against
  onnxruntime), then ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=1)`` (its
  defaults: output filters, consumers' input columns and BN gammas of the group, mean-reduced),
  ``global_pruning=False``, the classifier ignored; the result is exported with
  ``torch.onnx.export(..., dynamo=False)`` and measured like the others.
* ``torch-pruning (filter L1)``: the same pruner with an importance restricted to the output
  filters' L1 norms summed over the group -- the criterion of this tool's ``l1`` -- as a
  parity check of the two implementations.
* ``onnxsim``: ``onnxsim.apply_structured_pruning(model, sparsity=r, importance_norm="l1")``
  on the same ONNX file (onnxsim 0.8.x has this Python API; its CLI does not expose it).
* ``onnxslim-prune``: ``onnxslim_prune.prune(model, "l1", r)`` on the same ONNX file; on ResNet-56 also
  ``onnxslim-prune (inner only)``, the stem and shortcut convs excluded so that only the channels inside
  the residual blocks are pruned (onnxsim's choice on that model).

Ratios 0.3/0.5/0.7/0.8 as asked, plus 0.1 and 0.2: without fine-tuning ResNet-56 and VGG fall to chance
from about 0.3 on, whatever the tool.

Parameters and MACs of every result are counted by ``onnxslim_prune.model_stats`` on
the ONNX model at batch 1; accuracy is onnxruntime on the full 10,000-image test split. Prune
time is wall time of the pruning call only (from an in-memory model; Torch-Pruning: dependency
graph + step; onnxslim-prune: load, trace, apply and its built-in validation; export and
accuracy not counted).

Models: LeNet-300-100; ResNet-56 whose ONNX has BN folded into the convs, so its PyTorch twin
has biased convs and identity BN; VGG-slim with BN kept (``fmnist_vgg_slim_bn_unfused.onnx``,
PyTorch with BatchNorm2d, exported back with BN kept); VGG-slim BN-folded
(``fmnist_vgg_slim_bn.onnx``, PyTorch with biased convs and identity BN).

Also (``--anchors``): the Neuron Merging paper's LeNet-300-100 Table 1 (Fashion-MNIST, no
fine-tuning) next to this tool's ``l1`` and ``merge`` at 0.5/0.6/0.7/0.8, measured here.

Results: benchmarks/results/peers.{json,md} and anchors.md (``--out`` to move them).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

from lib.data import load_split
from lib.paths import RESULTS, SHARED_MODELS
from lib.peers import onnxsim_prune
from lib.results import write_json, write_text
from onnxslim_prune import model_stats, prune

log = logging.getLogger("peers")

MODELS_DIR = SHARED_MODELS
MODELS = ("fmnist_lenet300", "fmnist_resnet56", "fmnist_vgg_slim_bn_unfused", "fmnist_vgg_slim_bn")
RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8)  # 0.3-0.8 asked; 0.1 and 0.2 added: ResNet-56 collapses from 0.3 on
TOOLS = ("torch-pruning", "torch-pruning (filter L1)", "onnxsim", "onnxslim-prune", "onnxslim-prune (inner only)")
# "onnxslim-prune (inner only)": the residual-stream groups protected with --exclude (their stem and shortcut
# convs), so that only the channels inside the blocks are pruned -- what onnxsim does on ResNet-56.
INNER_ONLY = {"fmnist_resnet56": ["/c/Conv", "*/sc.0/Conv"]}
SHAPES = {"input": (1, 1, 28, 28)}
LOGITS_TOL = 1e-4
CHANCE = 0.12  # accuracies below this (10 classes) count as collapsed

# Neuron Merging (Kim et al., NeurIPS 2020), Table 1: LeNet-300-100 on Fashion-MNIST, no fine-tuning.
PAPER_BASELINE = 0.8980
PAPER = {
    "l1": {0.5: 0.8840, 0.6: 0.8517, 0.7: 0.7126, 0.8: 0.6676},
    "merge": {0.5: 0.8869, 0.6: 0.8692, 0.7: 0.8275, 0.8: 0.8002},
}
ANCHOR_RATIOS = (0.5, 0.6, 0.7, 0.8)
ONNXSLIM_CHECKED = "0.1.98"  # the onnxslim release whose --help and source were read for pruning (none)


# --------------------------------------------------------------------------------------------
# PyTorch twins of ../shared/models/train_fmnist.py (same module names, so the export scopes of
# the ONNX files name them). `bn=False`: BatchNorm replaced by Identity and the convs biased, for
# the ONNX files whose BN was folded into the convs at export.
# --------------------------------------------------------------------------------------------

def torch_models() -> dict[str, Callable[[], Any]]:
    import torch.nn as nn
    import torch.nn.functional as F

    class Norm(nn.Module):
        def forward(self, x):
            return (x - 0.2860) / 0.3530

    def bn_or_id(c: int, bn: bool) -> nn.Module:
        return nn.BatchNorm2d(c) if bn else nn.Identity()

    class LeNet300(nn.Module):
        def __init__(s):
            super().__init__()
            s.n = Norm()
            s.f1 = nn.Linear(784, 300)
            s.f2 = nn.Linear(300, 100)
            s.f3 = nn.Linear(100, 10)

        def forward(s, x):
            x = s.n(x).flatten(1)
            return s.f3(F.relu(s.f2(F.relu(s.f1(x)))))

    class Block(nn.Module):
        def __init__(s, cin, cout, stride, bn):
            super().__init__()
            s.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
            s.b1 = bn_or_id(cout, bn)
            s.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
            s.b2 = bn_or_id(cout, bn)
            s.sc = None
            if stride != 1 or cin != cout:
                s.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not bn), bn_or_id(cout, bn))

        def forward(s, x):
            o = F.relu(s.b1(s.c1(x)))
            o = s.b2(s.c2(o))
            return F.relu(o + (x if s.sc is None else s.sc(x)))

    class ResNet56(nn.Module):
        def __init__(s, n=9, bn=True):
            super().__init__()
            s.n = Norm()
            s.c = nn.Conv2d(1, 16, 3, 1, 1, bias=not bn)
            s.b = bn_or_id(16, bn)
            layers, cin = [], 16
            for cout, st in ((16, 1), (32, 2), (64, 2)):
                for i in range(n):
                    layers.append(Block(cin, cout, st if i == 0 else 1, bn))
                    cin = cout
            s.layers = nn.Sequential(*layers)
            s.fc = nn.Linear(64, 10)

        def forward(s, x):
            x = F.relu(s.b(s.c(s.n(x))))
            x = s.layers(x)
            return s.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    class VGGSlim(nn.Module):
        cfg = [32, 32, "M", 64, 64, "M", 128, 128, 128, "M", 256, 256, 256, 256, 256, 256]

        def __init__(s, bn=True):
            super().__init__()
            s.n = Norm()
            L, cin = [], 1
            for v in s.cfg:
                if v == "M":
                    L.append(nn.MaxPool2d(2))
                else:
                    L += [nn.Conv2d(cin, v, 3, 1, 1, bias=not bn), bn_or_id(v, bn), nn.ReLU(inplace=True)]
                    cin = v
            s.features = nn.Sequential(*L)
            s.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256 * 3 * 3, 256), nn.ReLU(inplace=True), nn.Linear(256, 10))

        def forward(s, x):
            return s.classifier(s.features(s.n(x)))

    return {
        "fmnist_lenet300": LeNet300,
        "fmnist_resnet56": lambda: ResNet56(bn=False),
        "fmnist_vgg_slim_bn_unfused": lambda: VGGSlim(bn=True),
        "fmnist_vgg_slim_bn": lambda: VGGSlim(bn=False),
    }


CLASSIFIER = {"fmnist_lenet300": "f3", "fmnist_resnet56": "fc",
              "fmnist_vgg_slim_bn_unfused": "classifier.3", "fmnist_vgg_slim_bn": "classifier.3"}
KEEP_BN = {"fmnist_vgg_slim_bn_unfused"}
HOW_LOADED = {
    "fmnist_lenet300": "Linear f1/f2/f3 from the three Gemm nodes",
    "fmnist_resnet56": "BN folded in the ONNX: PyTorch ResNet-56 with biased convs and BatchNorm -> Identity; "
                       "57 Conv + 1 Gemm nodes mapped by export scope",
    "fmnist_vgg_slim_bn_unfused": "PyTorch VGG-slim with BatchNorm2d; 13 Conv + 13 BatchNormalization "
                                  "(gamma, beta, running mean/var, eps checked) + 2 Gemm nodes",
    "fmnist_vgg_slim_bn": "BN folded in the ONNX: PyTorch VGG-slim with biased convs and BatchNorm -> Identity; "
                          "13 Conv + 2 Gemm nodes",
}


def scope_module(node_name: str) -> str:
    """'/layers/layers.9/sc/sc.0/Conv' -> 'layers.9.sc.0' (the exporter's scope names)."""
    parts = node_name.strip("/").split("/")[:-1]
    path, prev = "", None
    for part in parts:
        if prev is not None and part.startswith(prev + "."):
            path += part[len(prev):]
        else:
            path = f"{path}.{part}" if path else part
        prev = part
    return path


def load_from_onnx(module: Any, model: onnx.ModelProto) -> list[str]:
    """Copy every Conv/Gemm/BatchNormalization initializer into `module`; return the names loaded."""
    import torch

    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    modules = dict(module.named_modules())
    state: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "BatchNormalization"):
            continue
        name = scope_module(node.name)
        if name not in modules:
            raise KeyError(f"{node.op_type} {node.name}: no module {name!r} in the PyTorch model")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0
                                       or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            raise ValueError(f"{node.name}: Gemm attributes {attrs} are not nn.Linear's")
        if node.op_type == "BatchNormalization":
            eps = float(attrs.get("epsilon", 1e-5))
            if abs(eps - modules[name].eps) > 1e-9:
                raise ValueError(f"{node.name}: epsilon {eps} != {modules[name].eps}")
            keys = ("weight", "bias", "running_mean", "running_var")
        else:
            keys = ("weight", "bias")
        for key, tensor in zip(keys, node.input[1:]):
            if tensor not in inits:
                raise KeyError(f"{node.name}: input {tensor} is not an initializer")
            state[f"{name}.{key}"] = inits[tensor]
    expected = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise KeyError(f"unmapped tensors: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            target = module.state_dict()[key]
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{key}: ONNX {value.shape} vs PyTorch {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return sorted(state)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_logits(model: onnx.ModelProto, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def torch_logits(module: Any, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    import torch

    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def export_onnx(module: Any, keep_bn: bool) -> onnx.ModelProto:
    """The same export settings as train_fmnist.py (opset 17, dynamic batch, legacy exporter)."""
    import torch

    module.eval()
    kw: dict[str, Any] = dict(opset_version=17, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    if keep_bn:
        kw["training"] = torch.onnx.TrainingMode.PRESERVE
        kw["do_constant_folding"] = False
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 28, 28),), buf, **kw)
    return onnx.load_from_string(buf.getvalue())


def filter_l1_importance() -> Any:
    """Output filters' L1 norms summed over the group: the criterion of onnxslim-prune's l1."""
    import torch
    import torch_pruning as tp
    from torch_pruning.pruner import function

    class FilterL1(tp.importance.Importance):
        @torch.no_grad()
        def __call__(self, group):
            total = None
            for i, (dep, idxs) in enumerate(group):
                if dep.pruning_fn not in (function.prune_conv_out_channels, function.prune_linear_out_channels):
                    continue
                w = dep.layer.weight.data[idxs].flatten(1).abs().sum(1).double()
                root = torch.tensor(group[i].root_idxs)
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64) if total is None else total
                total.scatter_add_(0, root, w)
            return total

    return FilterL1()


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def measured(row: dict[str, Any], pruned: onnx.ModelProto, before: Any, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    stats = model_stats(pruned, SHAPES)
    logits = ort_logits(pruned, images)
    row.update(params_before=before.params, params=stats.params, macs_before=before.macs, macs=stats.macs,
               params_kept=stats.params / before.params, macs_kept=stats.macs / before.macs,
               accuracy=accuracy_of(logits, labels))
    return row


def run_torch_pruning(name: str, original: onnx.ModelProto, ratio: float, filter_only: bool, before: Any,
                      images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    tool = "torch-pruning (filter L1)" if filter_only else "torch-pruning"
    module = torch_models()[name]()
    load_from_onnx(module, original)
    module.eval()
    classifier = dict(module.named_modules())[CLASSIFIER[name]]
    importance = filter_l1_importance() if filter_only else tp.importance.GroupMagnitudeImportance(p=1)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(module, torch.zeros(1, 1, 28, 28), importance=importance, pruning_ratio=ratio,
                                      global_pruning=False, ignored_layers=[classifier])
        pruner.step()
    seconds = time.perf_counter() - started
    module.eval()
    exported = export_onnx(module, name in KEEP_BN)
    row: dict[str, Any] = {"model": name, "tool": tool, "ratio": ratio, "seconds": seconds}
    row = measured(row, exported, before, images, labels)
    # the export is what was measured: check it is the pruned PyTorch model
    row["export_max_abs"] = float(np.abs(torch_logits(module, images[:1000]) - ort_logits(exported, images[:1000])).max())
    return row


def run_onnxsim(name: str, original: onnx.ModelProto, ratio: float, before: Any, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    pruned, seconds = onnxsim_prune(original, ratio)
    return measured({"model": name, "tool": "onnxsim", "ratio": ratio, "seconds": seconds}, pruned, before, images, labels)


def run_ours(name: str, original: onnx.ModelProto, ratio: float, before: Any, images: np.ndarray, labels: np.ndarray,
             inner_only: bool = False) -> dict[str, Any]:
    model = onnx.ModelProto()
    model.CopyFrom(original)
    exclude = INNER_ONLY[name] if inner_only else []
    started = time.perf_counter()
    result = prune(model, "l1", ratio, exclude=exclude)
    seconds = time.perf_counter() - started
    tool = "onnxslim-prune (inner only)" if inner_only else "onnxslim-prune"
    row = {"model": name, "tool": tool, "ratio": ratio, "seconds": seconds}
    if exclude:
        row["exclude"] = exclude
    return measured(row, result.model, before, images, labels)


def verify_twin(name: str, original: onnx.ModelProto, images: np.ndarray) -> dict[str, Any]:
    """Load the PyTorch twin from the ONNX initializers; its logits must match onnxruntime's."""
    module = torch_models()[name]()
    loaded = load_from_onnx(module, original)
    batch = images[:1000]
    diff = float(np.abs(torch_logits(module, batch) - ort_logits(original, batch)).max())
    if not diff <= LOGITS_TOL:
        raise SystemExit(f"{name}: PyTorch twin differs from the ONNX model by {diff:.2e} > {LOGITS_TOL:g}")
    return {"tensors_loaded": len(loaded), "logits_max_abs": diff, "batch": len(batch), "how": HOW_LOADED[name]}


def available(tool: str) -> str | None:
    """None if the tool can run here, else why not."""
    need = {"torch-pruning": ("torch", "torch_pruning"), "torch-pruning (filter L1)": ("torch", "torch_pruning"),
            "onnxsim": ("onnxsim",), "onnxslim-prune": (), "onnxslim-prune (inner only)": ()}[tool]
    for mod in need:
        try:
            __import__(mod)
        except Exception as exc:  # noqa: BLE001 - an absent or broken install is a note, not a crash
            return f"{mod} not importable ({type(exc).__name__})"
    return None


def versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "torch-pruning", "onnxsim", "onnxslim", "onnxslim-prune", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def anchors(images: np.ndarray, labels: np.ndarray, models_dir: Path) -> dict[str, Any]:
    path = models_dir / "fmnist_lenet300.onnx"
    original = onnx.load(str(path))
    rows = []
    for method in ("l1", "merge"):
        for ratio in ANCHOR_RATIOS:
            result = prune(original, method, ratio)
            rows.append({"method": method, "ratio": ratio, "accuracy": accuracy_of(ort_logits(result.model, images), labels),
                         "paper": PAPER[method][ratio]})
    return {"baseline": accuracy_of(ort_logits(original, images), labels), "paper_baseline": PAPER_BASELINE, "rows": rows}


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------

def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(state: dict[str, Any]) -> str:
    v = state["versions"]
    lines = [
        "# Peers on the same work",
        "",
        f"Torch-Pruning {v['torch-pruning']} (PyTorch {v['torch']}), onnxsim {v['onnxsim']} and onnxslim-prune "
        f"{v['onnxslim-prune']} on the same Fashion-MNIST models and weights, at the same uniform ratio per channel "
        "group, classifier output kept, no fine-tuning. Parameters and MACs of every result are counted the same "
        "way (`onnxslim_prune.model_stats` on the ONNX model at batch 1; Torch-Pruning's result is "
        "exported with `torch.onnx.export(..., dynamo=False)` first); accuracy is onnxruntime on the full 10,000-image "
        "test split. Seconds: wall time of the pruning call only, on a 2-core machine where other benchmarks were "
        "running at the same time, so they are indicative only (Torch-Pruning: "
        "dependency graph + step, export not counted; onnxsim: `apply_structured_pruning`; onnxslim-prune: load, "
        "trace, apply and its built-in validation: checker, strict shape inference, an onnxruntime run). "
        "Generated by `benchmarks/peers.py`.",
        "",
        "- **torch-pruning**: `MetaPruner` + `GroupMagnitudeImportance(p=1)` (defaults: the L1 norms of the group's "
        "output filters, of its consumers' input columns and of its BN gammas, mean-reduced), `global_pruning=False`, "
        "the final classifier in `ignored_layers`.",
        "- **torch-pruning (filter L1)**: the same pruner with an importance that sums the L1 norms of the group's "
        "output filters only: the criterion of onnxslim-prune's `l1` (Li et al. 2017), as a parity check.",
        "- **onnxsim**: `onnxsim.apply_structured_pruning(model, sparsity=r, importance_norm=\"l1\")` (Python API; "
        "not on its command line).",
        "- **onnxslim-prune**: `prune(model, \"l1\", r)`.",
        "- **onnxslim-prune (inner only)**, ResNet-56 only: the same with `exclude=[\"/c/Conv\", \"*/sc.0/Conv\"]`, "
        "which freezes the three residual-stream groups (stem and shortcut convs are their members), so only the "
        "channels inside the blocks are pruned: what onnxsim does on this model.",
        "",
        "## PyTorch twins (weights loaded back from the ONNX initializers)",
        "",
        "| model | how | tensors loaded | max abs logits difference vs onnxruntime (1,000 test images) |",
        "|---|---|---:|---:|",
    ]
    for name, twin in state["twins"].items():
        lines.append(f"| {name} | {twin['how']} | {twin['tensors_loaded']} | {twin['logits_max_abs']:.1e} |")
    lines += ["", f"Every twin is checked to {LOGITS_TOL:g} before it is pruned; every Torch-Pruning export is checked "
              "against the pruned PyTorch model (largest difference: "
              f"{max((r.get('export_max_abs', 0.0) for r in state['rows']), default=0.0):.1e}).", ""]
    for model in dict.fromkeys(r["model"] for r in state["rows"]):
        order = {t: i for i, t in enumerate(TOOLS)}
        mine = sorted((r for r in state["rows"] if r["model"] == model), key=lambda r: (r["ratio"], order.get(r["tool"], 99)))
        base = state["baselines"][model]
        lines += [f"## {model} (original {pct(base)}%, {mine[0]['params_before']:,} params, "
                  f"{mine[0]['macs_before']:,} MACs)", "",
                  "| ratio | tool | params | params kept | MACs | MACs kept | test accuracy | s |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in mine:
            if "error" in r:
                lines.append(f"| {r['ratio']:g} | {r['tool']} | error: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['ratio']:g} | {r['tool']} | {r['params']:,} | {r['params_kept']:.1%} | {r['macs']:,} | "
                         f"{r['macs_kept']:.1%} | {pct(r['accuracy'])}% | {r['seconds']:.2f} |")
        lines.append("")
    lines += comparison(state)
    lines += [
        "## Why the figures differ",
        "",
        "- Channel counts: onnxslim-prune removes `floor(r * n)` channels of a group of `n`; Torch-Pruning keeps "
        "`int(n * (1 - r))`, computed in floating point, so it removes one more wherever `r * n` is not an integer "
        "(32 channels at 0.1: 4, not 3) or `n * (1 - r)` lands just below one (300 at 0.8: 300 * 0.19999999999999996 "
        "= 59.99...). That is why it is 'smaller at the same ratio' on ResNet-56 and VGG: same ratio, not the same "
        "work. onnxsim keeps onnxslim-prune's counts on the chains it prunes.",
        "- torch-pruning vs torch-pruning (filter L1): the default `GroupMagnitudeImportance` also scores the "
        "consumers' input columns and BN gammas of a group; the filter-only variant is onnxslim-prune's criterion "
        "(see the parity check above).",
        "- onnxsim prunes only the chains it can prove safe. ResNet-56: only each block's inner conv (c1), none of "
        "the residual-stream channels (stem, c2, shortcuts). VGG with BN kept: no Conv at all (BatchNormalization "
        "between two Convs is not a hop it takes), only the hidden classifier layer. VGG BN-folded: every Conv but "
        "the last (whose output reaches the Gemm through Flatten). So at the same ratio it removes less; compare it "
        "at the same MACs. On ResNet-56 its advantage is that choice of channels: `onnxslim-prune (inner only)` makes "
        "the same choice with `--exclude` and comes out close to onnxsim (the same model at 0.5; see the rows).",
        "- onnxsim ranks each layer after the previous layer's cut: on LeNet-300-100 at 0.8 it keeps the same f1 "
        "neurons as onnxslim-prune, then ranks f2's neurons by the L1 norm of their rows over the 60 surviving "
        "inputs only, where onnxslim-prune and Torch-Pruning score every group on the original weights.",
        "",
    ]
    lines += [
        "## onnxslim and onnxsim",
        "",
        f"- onnxslim ({ONNXSLIM_CHECKED} read; installed here: {v['onnxslim']}): a graph optimiser (constant folding, fusions such as Conv+BN, dead-node and "
        "common-subexpression elimination, fp16 conversion, shape inference). Its `--help` lists no pruning option "
        "and its package source has no pruning code (no occurrence of 'prun'): nothing to compare.",
        f"- onnxsim {v['onnxsim']}: besides simplification, ships `apply_structured_pruning` (Python API only; the "
        "`onnxsim --help` options have no pruning flag). Its docstring limits it to unambiguous producer-consumer "
        "chains (activations and per-channel constants in between; BatchNormalization is expected to be fused "
        "already) plus a bounded residual-Add case, and it does no compensation or validation. It is measured in the "
        "tables above; where its parameter count barely moves (VGG with BN kept), it declined the chains.",
        "",
    ]
    if state.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {t}: {why}" for t, why in state["skipped"].items()] + [""]
    return "\n".join(lines) + "\n"


def our_accuracy_at(state: dict[str, Any], model: str, macs_kept: float) -> float | None:
    """onnxslim-prune's accuracy at `macs_kept`, linear between its measured points (None outside them)."""
    pts = sorted((r["macs_kept"], r["accuracy"]) for r in state["rows"]
                 if r["tool"] == "onnxslim-prune" and r["model"] == model and "error" not in r)
    if not pts:
        return None
    if not pts[0][0] - 0.005 <= macs_kept <= pts[-1][0] + 0.005:
        return None  # outside the range we measured: no extrapolation
    return float(np.interp(macs_kept, [p[0] for p in pts], [p[1] for p in pts]))


def comparison(state: dict[str, Any]) -> list[str]:
    """Where each peer beats onnxslim-prune, read off the rows (no hand-written claims)."""
    rows = [r for r in state["rows"] if "error" not in r]
    out = ["## Where a peer is better", "",
           "Read off the rows above against onnxslim-prune `l1`. Accuracy is compared at the same MACs kept "
           "(onnxslim-prune's accuracy interpolated linearly between its own measured points; a peer point outside "
           "that range is not compared), since the tools do not remove the same amount at the same ratio; 'more "
           f"accurate' means by more than 0.1 point; points where both are below {CHANCE:.0%} (chance is 10%) are "
           "counted apart. Smaller: fewer MACs kept at the same ratio by more than 0.5 point of the original.", ""]
    found = False
    for tool in [t for t in TOOLS if not t.startswith("onnxslim-prune")]:
        acc, worse, smaller, faster, n, chance, outside = [], [], [], [], 0, 0, 0
        for r in rows:
            if r["tool"] != tool:
                continue
            ours = next((o for o in rows if o["tool"] == "onnxslim-prune" and o["model"] == r["model"] and o["ratio"] == r["ratio"]), None)
            if ours is None:
                continue
            n += 1
            tag = f"{r['model'].removeprefix('fmnist_')} {r['ratio']:g}"
            at = our_accuracy_at(state, r["model"], r["macs_kept"])
            if at is None:
                outside += 1
            elif max(at, r["accuracy"]) < CHANCE:
                chance += 1
            elif r["accuracy"] > at + 0.001:
                acc.append(f"{tag} ({pct(r['accuracy'])} vs {pct(at)} at {r['macs_kept']:.1%} MACs)")
            elif r["accuracy"] < at - 0.001:
                worse.append(tag)
            if r["macs_kept"] < ours["macs_kept"] - 0.005:
                smaller.append(f"{tag} ({r['macs_kept']:.1%} vs {ours['macs_kept']:.1%})")
            if r["seconds"] < ours["seconds"]:
                faster.append(tag)
        if not n:
            continue
        found = True
        out.append(f"- **{tool}** ({n} points): more accurate at the same MACs at {len(acc)}"
                   + (f": {'; '.join(acc)}" if acc else "") + f"; less accurate at {len(worse)}; both collapsed at "
                   + f"{chance}; outside our measured range at {outside}"
                   + f". Smaller at the same ratio at {len(smaller)}" + (f": {'; '.join(smaller)}" if smaller else "")
                   + f". Faster to prune at {len(faster)} of {n}.")
    if not found:
        out.append("- no peer ran")
    same = [(r, o) for r in rows if r["tool"] == "torch-pruning (filter L1)"
            for o in rows if o["tool"] == "onnxslim-prune" and o["model"] == r["model"] and o["ratio"] == r["ratio"]
            and o["params"] == r["params"] and o["macs"] == r["macs"]]
    if same:
        equal = [(r, o) for r, o in same if abs(r["accuracy"] - o["accuracy"]) < 5e-5]
        differ = [f"{r['model'].removeprefix('fmnist_')} {r['ratio']:g} ({pct(r['accuracy'])} vs {pct(o['accuracy'])})"
                  for r, o in same if (r, o) not in equal]
        informative = [r for r, _ in equal if r["accuracy"] >= CHANCE]
        out += ["", f"Parity check: at the {len(same)} points where torch-pruning (filter L1) and onnxslim-prune keep "
                f"exactly the same parameters and MACs, the test accuracy is identical at {len(equal)} "
                f"({len(informative)} of them above chance)" + (f"; it differs at: {'; '.join(differ)}" if differ else "")
                + "."]
    return out + [""]


def anchors_markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Neuron Merging anchors: LeNet-300-100 on Fashion-MNIST, no fine-tuning",
        "",
        f"Paper: Kim et al., *Neuron Merging*, NeurIPS 2020, Table 1 (their own LeNet-300-100, baseline "
        f"{pct(data['paper_baseline'])}%). Ours: `../shared/models/fmnist_lenet300.onnx` (baseline {pct(data['baseline'])}%), "
        "`onnxslim_prune.prune(model, method, ratio)` on the full 10,000-image test split, measured by "
        "`benchmarks/peers.py`. The two networks were trained separately, so compare the drops as well as the figures.",
        "",
        "| pruned | paper l1 | ours l1 | paper merge | ours merge | paper gain of merge | our gain of merge |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["method"], r["ratio"]): r for r in data["rows"]}
    for ratio in ANCHOR_RATIOS:
        l1, mg = by[("l1", ratio)], by[("merge", ratio)]
        lines.append(f"| {ratio:.0%} | {pct(l1['paper'])} | {pct(l1['accuracy'])} | {pct(mg['paper'])} | {pct(mg['accuracy'])} | "
                     f"{100 * (mg['paper'] - l1['paper']):+.2f} | {100 * (mg['accuracy'] - l1['accuracy']):+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the Neuron Merging anchors (anchors.md)")
    ap.add_argument("--quick", action="store_true", help="LeNet-300-100 only, ratios 0.5 and 0.8")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for peers.{json,md} and anchors.md")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of an existing peers.json, replacing only the (model, tool, ratio) measured now")
    ap.add_argument("--rebuild", action="store_true", help="rewrite peers.md and anchors.md from peers.json and stop")
    a = ap.parse_args()
    if a.rebuild:
        state = json.loads((a.out / "peers.json").read_text())
        write_text(a.out / "peers.md", markdown(state))
        if state.get("anchors"):
            write_text(a.out / "anchors.md", anchors_markdown(state["anchors"]))
        print((a.out / "peers.md").read_text())
        return 0
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    for noisy in ("onnxslim_prune", "onnxsim", "torch_pruning"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    models = ["fmnist_lenet300"] if a.quick else a.models.split(",")
    ratios = [0.5, 0.8] if a.quick else [float(r) for r in a.ratios.split(",")]
    tools = a.tools.split(",")
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tools {unknown}; known: {', '.join(TOOLS)}")

    images, labels = load_split("test")
    state: dict[str, Any] = {"versions": versions(), "twins": {}, "baselines": {}, "rows": [], "skipped": {}}
    if a.append and (a.out / "peers.json").exists():
        old = json.loads((a.out / "peers.json").read_text())
        redo = {(m, t, r) for m in models for t in tools for r in ratios}
        state.update({k: old.get(k, state[k]) for k in ("twins", "baselines", "skipped")})
        state["rows"] = [r for r in old["rows"] if (r["model"], r["tool"], r["ratio"]) not in redo]
        if "anchors" in old:
            state["anchors"] = old["anchors"]
    for tool in tools:
        why = available(tool)
        if why:
            state["skipped"][tool] = why
            log.warning("skipping %s: %s", tool, why)
    tools = [t for t in tools if t not in state["skipped"]]
    a.out.mkdir(parents=True, exist_ok=True)
    for name in models:
        original = onnx.load(str(a.models_dir / f"{name}.onnx"))
        before = model_stats(original, SHAPES)
        state["baselines"][name] = accuracy_of(ort_logits(original, images), labels)
        if any(t.startswith("torch-pruning") for t in tools):
            state["twins"][name] = verify_twin(name, original, images)
            log.info("%s: PyTorch twin matches onnxruntime to %.1e", name, state["twins"][name]["logits_max_abs"])
        for ratio in ratios:
            for tool in tools:
                try:
                    if tool.startswith("torch-pruning"):
                        row = run_torch_pruning(name, original, ratio, tool.endswith("(filter L1)"), before, images, labels)
                    elif tool == "onnxsim":
                        row = run_onnxsim(name, original, ratio, before, images, labels)
                    elif tool == "onnxslim-prune (inner only)":
                        if name not in INNER_ONLY:
                            continue
                        row = run_ours(name, original, ratio, before, images, labels, inner_only=True)
                    else:
                        row = run_ours(name, original, ratio, before, images, labels)
                except Exception as exc:  # noqa: BLE001 - a failing tool is a row
                    row = {"model": name, "tool": tool, "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"[:240]}
                state["rows"].append(row)
                log.info("%s %s %g: %s", name, tool, ratio,
                         row.get("error") or f"{100 * row['accuracy']:.2f}% params {row['params_kept']:.1%} "
                                             f"MACs {row['macs_kept']:.1%} {row['seconds']:.2f}s")
                write_json(a.out / "peers.json", state)
    if a.anchors:
        state["anchors"] = anchors(images, labels, a.models_dir)
        write_text(a.out / "anchors.md", anchors_markdown(state["anchors"]))
    write_json(a.out / "peers.json", state)
    write_text(a.out / "peers.md", markdown(state))
    print((a.out / "peers.md").read_text())
    if a.anchors:
        print((a.out / "anchors.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
