"""Peers on transformers: onnxsim 0.8.1's head pruning and Torch-Pruning 1.5.2 against onnxslim-prune.

    python benchmarks/peers_transformers.py                       # zoo + Fashion-MNIST ViT (about 30 min, 2 cores)
    python benchmarks/peers_transformers.py --parts vit           # the ViT only (vit-parity: only the same-parts rows)
    python benchmarks/peers_transformers.py --parts zoo --tools "onnxsim heads 0.5"   # redo some zoo rows
    python benchmarks/peers_transformers.py --torch-python /work/venv-tp/bin/python
    python benchmarks/peers_transformers.py --rebuild             # rewrite the markdown from the json

Part 1, the transformer zoo (``../shared/zoo`` hf_*, hfdyn_*, timm_deit_tiny_patch16_224, filled with
seeded random weights by the zoo's ``fill.py``): every tool in a fresh process on the same file;
each result is held to the same validation (``onnx.checker.check_model(full_check=True)``, strict
shape inference, an onnxruntime run, the original's output names and shapes), parameters and MACs are
counted by ``onnxslim_prune.model_stats`` for all, heads are counted the same way for all
(the head axis of every rank-4 Softmax output, read off an onnxruntime run), and the outputs are
compared with the original's on 16 seeded inputs (token ids drawn from the embedding table, masks all
ones, images standard normal). Random weights: this measures structure handled, not accuracy.

Part 2, the Fashion-MNIST ViT (``../shared/models/fmnist_vit.onnx``): Torch-Pruning runs in a
separate interpreter that has torch (``--torch-python``; default: /work/venv-tp/bin/python, else
the ``python`` beside this one if it imports torch). There the PyTorch module of
``../shared/models/train_fmnist_vit.py`` is rebuilt, loaded from the ONNX initializers (checked
against onnxruntime to 1e-4), pruned with ``MetaPruner`` (heads, MLP and, in one setting, the
hidden size) at a grid of ratios, and exported with ``torch.onnx.export(dynamo=False)``; the parent
measures every export on the 10,000-image test split, picks the points nearest 50% and 60% of the
MACs, and runs onnxslim-prune with ``--target-macs`` set to exactly the MACs kept there. onnxsim's
head pruning (and head + channel pruning) runs on the same ONNX file.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# light on purpose: the --torch-child runs this file in an interpreter that may have torch and nothing of this
# project's (the library and onnxruntime are imported inside the functions that need them)
from lib.paths import FILLED, RESULTS, SHARED_MODELS, ZOO

VIT = SHARED_MODELS / "fmnist_vit.onnx"
OUT = RESULTS / "peers_transformers"
ZOO_MODELS = (
    "hf_bert", "hf_distilbert", "hf_gpt2", "hf_llama_gqa", "hf_vit",
    "hfdyn_bert", "hfdyn_distilbert", "hfdyn_gpt2", "hfdyn_llama_gqa", "hfdyn_vit", "timm_deit_tiny_patch16_224",
)
SPARSITY = 0.5
AGREEMENT_SEEDS = tuple(range(16))
LOGITS_TOL = 1e-4
TORCH_PINS = ("torch==2.13.0", "torch-pruning==1.5.2")
DEFAULT_TORCH_PYTHON = Path("/work/venv-tp/bin/python")
# (label, onnx-prune arguments) on the zoo
ZOO_OURS = (
    ("onnxslim-prune l1 0.5", ["--method", "l1", "--ratio", "0.5"]),
    ("onnxslim-prune l1 heads 0.5 ffn 0.5 hidden 0", ["--method", "l1", "--ratio", "0.5", "--heads", "0.5",
                                                      "--ffn", "0.5", "--hidden", "0"]),
    # FFN neurons only: the part onnxsim's channel pruning takes, for a like-for-like comparison with it
    ("onnxslim-prune l1 ffn 0.5 (heads 0, hidden 0)", ["--method", "l1", "--ratio", "0.5", "--heads", "0",
                                                        "--ffn", "0.5", "--hidden", "0"]),
)
# (label, mode) of onnxsim on the zoo: heads on the file as exported; after its own simplify (whose
# fusion passes make the fused attention its head pruning matches first); then also its channel pruning
ZOO_ONNXSIM = (("onnxsim heads 0.5", "heads"), ("onnxsim simplify + heads 0.5", "simplify+heads"),
               ("onnxsim simplify + heads 0.5 + channels 0.5", "simplify+heads+channels"))
# Torch-Pruning on the ViT: settings x (pruning_ratio, head_pruning_ratio); 4 heads a layer, so head
# ratios 0.25 and 0.5 remove one or two heads of each layer
TP_SETTINGS = ("heads+mlp", "heads+mlp+hidden")
TP_GRID = {
    "heads+mlp": [(r, h) for h in (0.25, 0.5) for r in (0.25, 0.5, 0.75)],
    "heads+mlp+hidden": [(r, h) for h in (0.0, 0.25, 0.5) for r in (0.125, 0.25, 0.375)],
}
TP_IMPORTANCES = ("l2", "l1", "taylor")
MAC_TARGETS = (0.5, 0.6)

log = logging.getLogger("peers_transformers")


# ============================================================================================
# Torch side: runs under --torch-python (torch + torch_pruning + onnx + onnxruntime + numpy only)
# ============================================================================================

def torch_vit() -> Any:
    """The ViT of ../shared/models/train_fmnist_vit.py, rebuilt; one change: the attention output is
    reshaped to ``heads * head_dim`` instead of the input width, so that pruned heads or a pruned hidden
    size keep the forward consistent (the same computation on the unpruned model), as Torch-Pruning's
    ViT example does."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(s, dim: int, heads: int) -> None:
            super().__init__()
            s.h = heads
            s.d = dim // heads
            s.qkv = nn.Linear(dim, dim * 3)
            s.proj = nn.Linear(dim, dim)

        def forward(s, x: Any) -> Any:
            B, N, _ = x.shape
            qkv = s.qkv(x).reshape(B, N, 3, s.h, s.d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # the script indexes qkv[0..2]; unbind is the same tensors, and what
            # Torch-Pruning's ViT example writes (its dependency graph does not follow the indexing: IndexError)
            a = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(s.d))
            x = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, s.h * s.d)
            return s.proj(x)

    class Block(nn.Module):
        def __init__(s, dim: int, heads: int, mlp: int) -> None:
            super().__init__()
            s.n1 = nn.LayerNorm(dim)
            s.attn = Attention(dim, heads)
            s.n2 = nn.LayerNorm(dim)
            s.fc1 = nn.Linear(dim, mlp)
            s.fc2 = nn.Linear(mlp, dim)

        def forward(s, x: Any) -> Any:
            x = x + s.attn(s.n1(x))
            return x + s.fc2(F.gelu(s.fc1(s.n2(x))))

    class ViT(nn.Module):
        def __init__(s, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, patch: int = 4) -> None:
            super().__init__()
            s.patch = patch
            s.embed = nn.Conv2d(1, dim, patch, patch)
            n = (28 // patch) ** 2
            s.cls = nn.Parameter(torch.zeros(1, 1, dim))
            s.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
            s.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
            s.norm = nn.LayerNorm(dim)
            s.head = nn.Linear(dim, 10)

        def forward(s, x: Any) -> Any:
            x = (x - 0.2860) / 0.3530
            x = s.embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([s.cls.expand(x.shape[0], -1, -1), x], 1) + s.pos
            x = s.norm(s.blocks(x))
            return s.head(x[:, 0])

    return ViT()


def scope_module(node_name: str) -> str:
    """'/blocks/blocks.0/attn/qkv/MatMul' -> 'blocks.0.attn.qkv' (the legacy exporter's scope names)."""
    parts = node_name.strip("/").split("/")[:-1]
    path, prev = "", None
    for part in parts:
        if prev is not None and part.startswith(prev + "."):
            path += part[len(prev):]
        else:
            path = f"{path}.{part}" if path else part
        prev = part
    return path


def load_vit_from_onnx(module: Any, model: onnx.ModelProto) -> int:
    """Copy the ONNX initializers into `module`: named ones by name, MatMul weights (the exporter's
    ``onnx::MatMul_*``, transposed) by their node's scope. Every parameter must be set exactly once."""
    import torch

    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    state: dict[str, np.ndarray] = {k: v for k, v in inits.items() if not k.startswith("onnx::")}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].startswith("onnx::"):
            state[f"{scope_module(node.name)}.weight"] = inits[node.input[1]].T
    expected = set(module.state_dict())
    if set(state) != expected:
        raise KeyError(f"unmapped: missing {sorted(expected - set(state))[:5]}, extra {sorted(set(state) - expected)[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            target = module.state_dict()[key]
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{key}: ONNX {value.shape} vs PyTorch {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return len(state)


def ort_run(model: onnx.ModelProto | str, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def torch_run(module: Any, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    import torch

    module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def tp_prune(setting: str, importance: str, ratio: float, head_ratio: float, original: onnx.ModelProto,
             calib: tuple[np.ndarray, np.ndarray]) -> tuple[Any, float, dict[str, Any]]:
    """One Torch-Pruning run on a fresh twin: the pruned module, its seconds and what it kept."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    module = torch_vit()
    load_vit_from_onnx(module, original)
    module.eval()
    attn = [b.attn for b in module.blocks]
    num_heads = {a.qkv: a.h for a in attn}
    ignored = [module.head] + ([module.embed] if setting == "heads+mlp" else [])
    imp: Any = {"l2": tp.importance.GroupMagnitudeImportance(p=2), "l1": tp.importance.GroupMagnitudeImportance(p=1),
                "taylor": tp.importance.GroupTaylorImportance()}[importance]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            module, torch.zeros(1, 1, 28, 28), importance=imp, pruning_ratio=ratio, global_pruning=False,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=False,
            head_pruning_ratio=head_ratio)  # cls and pos: unwrapped, pruned on their last axis (its default)
        if importance == "taylor":  # gradients of the cross-entropy on the calibration images (train[:2000])
            module.zero_grad()
            images, labels = calib
            for i in range(0, len(images), 250):
                loss = F.cross_entropy(module(torch.from_numpy(images[i:i + 250])), torch.from_numpy(labels[i:i + 250]))
                loss.backward()
        pruner.step()
    for a in attn:  # as Torch-Pruning's ViT example: the heads left, then the head width
        a.h = pruner.num_heads[a.qkv]
        a.d = a.qkv.out_features // (3 * a.h)
    seconds = time.perf_counter() - started
    module.zero_grad(set_to_none=True)
    kept = {"heads": sum(a.h for a in attn), "ffn": sum(b.fc1.out_features for b in module.blocks),
            "hidden": int(module.embed.out_channels)}
    return module, seconds, kept


def export(module: Any) -> onnx.ModelProto:
    """The export settings of train_fmnist_vit.py (opset 17, dynamic batch, legacy exporter)."""
    import torch

    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 28, 28),), buf, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def torch_child(work: Path) -> None:
    """Under --torch-python: verify the twin, prune on the grid, export; write work/torch.json."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    original = onnx.load(str(VIT))
    test = np.load(work / "test1000.npz")["input"]
    calib = np.load(work / "calib.npz")
    twin = torch_vit()
    loaded = load_vit_from_onnx(twin, original)
    diff = float(np.abs(torch_run(twin, test) - ort_run(original, test)).max())
    if not diff <= LOGITS_TOL:
        raise SystemExit(f"the PyTorch ViT differs from the ONNX model by {diff:.2e} > {LOGITS_TOL:g}")
    out: dict[str, Any] = {"twin": {"tensors_loaded": loaded, "logits_max_abs": diff, "batch": len(test)},
                           "versions": {d: metadata.version(d) for d in ("torch", "torch-pruning")}, "runs": []}
    for importance in TP_IMPORTANCES:
        for setting in TP_SETTINGS:
            for ratio, head_ratio in TP_GRID[setting]:
                tag = f"tp_{importance}_{setting}_{ratio:g}_{head_ratio:g}".replace("+", "-")
                run: dict[str, Any] = {"importance": importance, "setting": setting, "ratio": ratio,
                                       "head_ratio": head_ratio}
                try:
                    module, seconds, kept = tp_prune(setting, importance, ratio, head_ratio, original,
                                                     (calib["input"], calib["labels"]))
                    exported = export(module)
                    path = work / f"{tag}.onnx"
                    onnx.save(exported, str(path))
                    run.update(file=path.name, seconds=seconds, kept=kept,
                               export_max_abs=float(np.abs(torch_run(module, test) - ort_run(exported, test)).max()))
                except Exception as exc:  # noqa: BLE001 - a failing setting is a row
                    run["error"] = f"{type(exc).__name__}: {exc}"[:240]
                out["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    (work / "torch.json").write_text(json.dumps(out, indent=1) + "\n")


# ============================================================================================
# onnxsim side: a fresh process per model (a crash costs one row)
# ============================================================================================

def onnxsim_child(src: Path, dst: Path, mode: str, sparsity: float) -> None:
    import onnxsim

    model = onnx.load(str(src))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode.startswith("simplify+"):
            model, _ = onnxsim.simplify(model)
        pruned = onnxsim.apply_attention_head_pruning(model, sparsity=sparsity, importance_norm="l1")
        if mode.endswith("+channels"):
            pruned = onnxsim.apply_structured_pruning(pruned, sparsity=sparsity, importance_norm="l1",
                                                      global_sparsity=False)
    seconds = time.perf_counter() - started
    onnx.save(pruned, str(dst))
    print(json.dumps({"prune_seconds": round(seconds, 3)}), file=sys.stderr)


def run_onnxsim(src: Path, dst: Path, mode: str, sparsity: float, timeout: float) -> dict[str, Any]:
    from lib.measure import failure, run_measured_isolated

    dst.unlink(missing_ok=True)
    run = run_measured_isolated([sys.executable, __file__, "--onnxsim-child", str(src), str(dst), mode, str(sparsity)],
                                timeout=timeout)
    row: dict[str, Any] = {"seconds": run.seconds, "peak_mib": run.peak_mib}
    if run.timed_out or run.returncode != 0 or not dst.exists():
        row["error"] = failure(run)
        return row
    line = next((x for x in reversed(run.stderr.strip().splitlines()) if x.startswith("{")), "{}")
    row.update(json.loads(line))
    return row


def run_ours(src: Path, out_dir: Path, args: list[str], timeout: float) -> tuple[dict[str, Any], Path | None]:
    from lib.measure import failure, prune_cli_keep

    run, data, out = prune_cli_keep(src, args, out_dir, timeout)
    row: dict[str, Any] = {"seconds": run.seconds, "peak_mib": run.peak_mib}
    if data is None or out is None:
        row["error"] = failure(run)
        return row, None
    row["prune_seconds"] = round(float(data.get("seconds", run.seconds)), 3)
    return row, out


# ============================================================================================
# the one measurement every result gets
# ============================================================================================

def seeded_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Token ids uniform over the embedding table that reads them, masks all ones, floats standard normal."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    vocab: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in inits:
            vocab.setdefault(node.input[1], int(inits[node.input[0]].dims[0]))
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif vi.name in vocab:
            feeds[vi.name] = rng.integers(0, vocab[vi.name], size=shape).astype(dtype)
        else:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
    return feeds


def run_with_softmax(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[list[list[np.ndarray]], int]:
    """The graph outputs for each feed, and the heads: the sum of axis -3 of every rank-4 Softmax output."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = [o.name for o in model.graph.output]
    soft = [n.output[0] for n in probe.graph.node if n.op_type == "Softmax"]
    have = set(outputs)
    for name in soft:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = outputs + [s for s in soft if s not in have]
    results, heads = [], 0
    for i, feed in enumerate(feeds):
        got = dict(zip(names, sess.run(names, feed)))
        results.append([got[n] for n in outputs])
        if i == 0:
            heads = sum(int(got[s].shape[-3]) for s in soft if got[s].ndim == 4)
    return results, heads


def measure_model(original: onnx.ModelProto, pruned: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                  reference: tuple[list[list[np.ndarray]], int] | None = None) -> dict[str, Any]:
    """Validity, parameters and MACs kept, heads kept, agreement with the original on seeded inputs."""
    from lib.runtime import check_valid
    from onnxslim_prune import model_stats

    feeds = [seeded_feeds(original, shapes, s) for s in AGREEMENT_SEEDS]
    ref_out, ref_heads = reference or run_with_softmax(original, feeds)
    before, after = model_stats(original, shapes), model_stats(pruned, shapes)
    row: dict[str, Any] = {"params_kept": after.params / before.params, "macs_kept": after.macs / max(before.macs, 1),
                           "params": after.params, "macs": after.macs, "heads_before": ref_heads}
    try:
        check_valid(pruned)  # the full checker, strict shape inference
        outs, heads = run_with_softmax(pruned, feeds)
        if [o.name for o in pruned.graph.output] != [o.name for o in original.graph.output]:
            raise ValueError("output names changed")
        if [a.shape for a in ref_out[0]] != [b.shape for b in outs[0]]:
            raise ValueError("output shapes changed")
        if not all(np.isfinite(o).all() for out in outs for o in out):
            raise ValueError("non-finite outputs")
        row.update(valid=True, heads=heads)
        a = np.concatenate([r[0].ravel() for r in ref_out]).astype(np.float64)
        b = np.concatenate([o[0].ravel() for o in outs]).astype(np.float64)
        row["cosine"] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        row["rel_l2"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        top_ref = np.concatenate([r[0].reshape(-1, r[0].shape[-1]).argmax(-1) for r in ref_out])
        top = np.concatenate([o[0].reshape(-1, o[0].shape[-1]).argmax(-1) for o in outs])
        row["top1_agreement"] = float(np.mean(top_ref == top))
    except Exception as exc:  # noqa: BLE001 - an invalid model is the finding
        row.update(valid=False, invalid=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return row


# ============================================================================================
# part 1: the zoo
# ============================================================================================

def zoo(filled: Path, work: Path, timeout: float, only: list[str] | None, tools: list[str] | None = None) -> list[dict[str, Any]]:
    """Every zoo model through every tool (`tools`: only these labels)."""
    from lib.runtime import static_shapes

    rows: list[dict[str, Any]] = []
    for name in ZOO_MODELS:
        if only and name not in only:
            continue
        src = fill_model(name, filled)
        original = onnx.load(str(src))
        shapes = static_shapes(original)
        reference = run_with_softmax(original, [seeded_feeds(original, shapes, s) for s in AGREEMENT_SEEDS])
        for label, mode in ZOO_ONNXSIM:
            if tools and label not in tools:
                continue
            dst = work / f"{name}.onnxsim.onnx"
            row = {"model": name, "tool": label, **run_onnxsim(src, dst, mode, SPARSITY, timeout)}
            if "error" not in row:
                row.update(measure_model(original, onnx.load(str(dst)), shapes, reference))
            rows.append(row)
            log.info("%s", json.dumps(row))
        for label, args in ZOO_OURS:
            if tools and label not in tools:
                continue
            ours, out = run_ours(src, work / f"{name}.ours", args, timeout)
            row = {"model": name, "tool": label, **ours}
            if out is not None:
                row.update(measure_model(original, onnx.load(str(out)), shapes, reference))
            rows.append(row)
            log.info("%s", json.dumps(row))
    return rows


def fill_model(name: str, filled: Path) -> Path:
    from lib.data import zoo_model

    return zoo_model(name, ZOO, filled)


# ============================================================================================
# part 2: the Fashion-MNIST ViT
# ============================================================================================

def find_torch_python(given: Path | None) -> Path | None:
    for cand in ([given] if given else []) + [DEFAULT_TORCH_PYTHON, Path(sys.executable)]:
        if cand and cand.exists():
            ok = subprocess.run([str(cand), "-c", "import torch, torch_pruning"], capture_output=True).returncode == 0
            if ok:
                return cand
    return None


def accuracy(model: onnx.ModelProto | str, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(ort_run(model, images).argmax(1) == labels))


def vit_measure(model: onnx.ModelProto, before: Any, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    from lib.runtime import check_valid
    from onnxslim_prune import model_stats

    stats = model_stats(model, {"input": (1, 1, 28, 28)})
    row: dict[str, Any] = {"params_kept": stats.params / before.params, "macs_kept": stats.macs / before.macs,
                           "params": stats.params, "macs": stats.macs, "accuracy": accuracy(model, images, labels)}
    try:
        check_valid(model)  # the full checker, strict shape inference
        row["valid"] = True
    except Exception as exc:  # noqa: BLE001
        row.update(valid=False, invalid=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return row


def vit(work: Path, torch_python: Path | None, timeout: float) -> dict[str, Any]:
    from lib.data import load_split
    from onnxslim_prune import model_stats

    images, labels = load_split("test")
    calib_x, calib_y = load_split("train", 2000)
    calib = work / "calib.npz"
    np.savez(calib, input=calib_x, labels=calib_y)  # train[:2000]: the only data any fitting or ranking sees
    np.savez(work / "test1000.npz", input=images[:1000])  # the twin's and the exports' equality checks only
    original = onnx.load(str(VIT))
    before = model_stats(original, {"input": (1, 1, 28, 28)})
    state: dict[str, Any] = {"baseline": accuracy(original, images, labels), "params": before.params,
                             "macs": before.macs, "rows": [], "skipped": {}}
    # Torch-Pruning, in its own interpreter
    targets: list[tuple[float, dict[str, Any]]] = []
    if torch_python is None:
        state["skipped"]["torch-pruning"] = "no interpreter with torch and torch_pruning (see --torch-python)"
    else:
        started = time.perf_counter()
        proc = subprocess.run([str(torch_python), __file__, "--torch-child", str(work)], capture_output=True, text=True,
                              timeout=timeout * 4, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0 or not (work / "torch.json").exists():
            state["skipped"]["torch-pruning"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:240]
        else:
            data = json.loads((work / "torch.json").read_text())
            state["twin"], state["torch_versions"] = data["twin"], data["versions"]
            state["torch_seconds"] = round(time.perf_counter() - started, 1)
            for run in data["runs"]:
                row = {"tool": "torch-pruning", "method": f"{run['importance']} {run['setting']}", **run,
                       "config": f"pruning_ratio {run['ratio']:g}, head_pruning_ratio {run['head_ratio']:g}",
                       "prune_seconds": run.get("seconds")}
                if "error" not in run:
                    row.update(vit_measure(onnx.load(str(work / run["file"])), before, images, labels))
                state["rows"].append(row)
            # the points nearest each MAC target, over every Torch-Pruning run: the targets of this tool
            ok = [r for r in state["rows"] if r["tool"] == "torch-pruning" and "error" not in r]
            for target in MAC_TARGETS:
                for imp in TP_IMPORTANCES:
                    for setting in TP_SETTINGS:
                        mine = [r for r in ok if r["importance"] == imp and r["setting"] == setting]
                        if mine:
                            best = min(mine, key=lambda r: abs(r["macs_kept"] - target))
                            best.setdefault("matched", []).append(target)
                            targets.append((target, best))
    # this tool at the same MACs
    macs_points = sorted({round(r["macs_kept"], 4) for _, r in targets} or set(MAC_TARGETS))
    for point in macs_points:
        for method, extra in (("l1", []), ("l1", ["--calib", str(calib)]), ("ldrf", ["--calib", str(calib)])):
            args = ["--method", method, "--target-macs", f"{point:.4f}", *extra]
            ours, out = run_ours(VIT, work / "vit.ours", args, timeout)
            row = {"tool": "onnxslim-prune", "method": method + (" --calib" if extra else ""),
                   "config": f"--target-macs {point:.4f}", "target": point, **ours}
            if out is not None:
                row.update(vit_measure(onnx.load(str(out)), before, images, labels))
            state["rows"].append(row)
            log.info("%s", json.dumps(row))
    # onnxsim's head pruning on the same file
    for mode in ("heads", "simplify+heads", "simplify+heads+channels"):
        for sparsity in (0.25, 0.5):
            dst = work / "vit.onnxsim.onnx"
            sim = run_onnxsim(VIT, dst, mode, sparsity, timeout)
            row = {"tool": "onnxsim", "method": mode, "config": f"sparsity {sparsity:g}", **sim}
            if "error" not in sim:
                row.update(vit_measure(onnx.load(str(dst)), before, images, labels))
            state["rows"].append(row)
            log.info("%s", json.dumps(row))
    return state


def vit_parity(work: Path, state: dict[str, Any], timeout: float) -> None:
    """onnxslim-prune at exactly the per-part ratios of each matched Torch-Pruning point (uniform per layer,
    no global ranking): the same structure, so the figures compare the choice of channels and the refit."""
    from lib.data import load_split
    from onnxslim_prune import model_stats

    images, labels = load_split("test")
    calib = work / "calib.npz"
    if not calib.exists():
        x, y = load_split("train", 2000)
        np.savez(calib, input=x, labels=y)
    original = onnx.load(str(VIT))
    before = model_stats(original, {"input": (1, 1, 28, 28)})
    state["rows"] = [r for r in state["rows"] if r["tool"] != "onnxslim-prune (same parts)"]
    points = {(r["setting"], r["ratio"], r["head_ratio"]) for r in state["rows"]
              if r["tool"] == "torch-pruning" and r.get("matched")}
    for setting, ratio, head_ratio in sorted(points):
        hidden = ratio if setting == "heads+mlp+hidden" else 0.0
        parts = ["--ratio", f"{ratio:g}", "--heads", f"{head_ratio:g}", "--ffn", f"{ratio:g}", "--hidden", f"{hidden:g}"]
        for method, extra in (("l1", []), ("l1", ["--calib", str(calib)]), ("ldrf", ["--calib", str(calib)])):
            ours, out = run_ours(VIT, work / "vit.ours", ["--method", method, *parts, *extra], timeout)
            row = {"tool": "onnxslim-prune (same parts)", "method": method + (" --calib" if extra else ""),
                   "config": " ".join(parts[2:]), "same_as": [setting, ratio, head_ratio], **ours}
            if out is not None:
                row.update(vit_measure(onnx.load(str(out)), before, images, labels))
            state["rows"].append(row)
            log.info("%s", json.dumps(row))


def kept_heads(original: onnx.ModelProto, pruned: onnx.ModelProto, block: int, head_dim: int = 16) -> list[int]:
    """The heads of `block` whose qkv weight columns survive in `pruned` (matched column by column)."""
    def weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
        inits = {t.name: t for t in model.graph.initializer}
        node = next(n for n in model.graph.node if n.name == node_name)
        return onnx.numpy_helper.to_array(inits[node.input[1]])

    name = f"/blocks/blocks.{block}/attn/qkv/MatMul"
    full, cut = weight(original, name), weight(pruned, name)
    width = full.shape[1] // 3
    cols = [int(np.argmin(np.abs(full - cut[:, [j]]).sum(0))) for j in range(cut.shape[1])]
    return sorted({c % width // head_dim for c in cols})


def vit_heads(work: Path, state: dict[str, Any], timeout: float) -> None:
    """Which two of each layer's four heads each tool keeps at heads 0.5, against every choice measured alone.

    This tool's l1 at ``--heads 0.5 --ffn 0 --hidden 0`` and Torch-Pruning's l1 export at head_pruning_ratio 0.5
    (its heads group holds qkv and proj only, so the MLP ratio does not change the head choice); each pair of
    heads kept in one layer, the others intact, is scored on train[10000:12000] (neither the calibration images
    nor the test split: a diagnosis, not an accuracy figure). Heads are removed by zeroing their rows of the
    output projection, which is exact."""
    from lib.data import load_split

    tp_file = work / "tp_l1_heads-mlp_0.5_0.5.onnx"
    if not tp_file.exists():
        log.warning("vit-heads: %s missing (run --parts vit with --keep)", tp_file)
        return
    x, y = load_split("train", 12000)
    x, y = x[10000:], y[10000:]
    original = onnx.load(str(VIT))
    ours, out = run_ours(VIT, work / "vit.heads", ["--method", "l1", "--heads", "0.5", "--ffn", "0", "--hidden", "0"],
                         timeout)
    if out is None:
        state["heads_diagnosis"] = {"error": ours.get("error")}
        return
    mine, theirs = onnx.load(str(out)), onnx.load(str(tp_file))
    inits = {t.name: t for t in original.graph.initializer}
    blocks = []
    for b in range(4):
        qkv = next(n for n in original.graph.node if n.name == f"/blocks/blocks.{b}/attn/qkv/MatMul")
        proj = next(n for n in original.graph.node if n.name == f"/blocks/blocks.{b}/attn/proj/MatMul")
        w_qkv, w_proj = (onnx.numpy_helper.to_array(inits[n.input[1]]) for n in (qkv, proj))
        producer = [float(sum(np.abs(w_qkv[:, i * 64 + h * 16:i * 64 + (h + 1) * 16]).sum() for i in range(3)))
                    for h in range(4)]
        consumer = [float(np.abs(w_proj[h * 16:(h + 1) * 16]).sum()) for h in range(4)]
        pairs = {}
        for keep in [(i, j) for i in range(4) for j in range(i + 1, 4)]:
            probe = onnx.ModelProto()
            probe.CopyFrom(original)
            w = w_proj.copy()
            for h in set(range(4)) - set(keep):
                w[h * 16:(h + 1) * 16] = 0.0
            target = next(t for t in probe.graph.initializer if t.name == proj.input[1])
            target.CopyFrom(onnx.numpy_helper.from_array(w, target.name))
            pairs[f"{keep[0]},{keep[1]}"] = accuracy(probe, x, y)
        blocks.append({"block": b, "ours": kept_heads(original, mine, b), "torch_pruning": kept_heads(original, theirs, b),
                       "l1_qkv": producer, "l1_proj": consumer, "pairs": pairs})
    state["heads_diagnosis"] = {"blocks": blocks, "ours_accuracy_test": accuracy(mine, *load_split("test")),
                                "original_heldout": accuracy(original, x, y)}
    log.info("%s", json.dumps(state["heads_diagnosis"]))


# ============================================================================================
# markdown
# ============================================================================================

def versions() -> dict[str, str]:
    out = {}
    for dist in ("onnxsim", "onnxslim-prune", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def fmt(x: Any, spec: str = ".1%") -> str:
    return "" if x is None else format(x, spec)


def zoo_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## The transformer zoo (seeded random weights: structure, not accuracy)", "",
             "| model | tool | valid | params kept | MACs kept | heads kept | output cosine | rel. L2 error | "
             "top-1 agreement | s (process) | s (prune call) |",
             "|---|---|:---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | error: {r['error']} | | | | | | | {r['seconds']:.1f} | |")
            continue
        valid = "yes" if r["valid"] else f"no: {r['invalid']}"
        heads = f"{r['heads']}/{r['heads_before']}" if r.get("valid") else ""
        lines.append(f"| {r['model']} | {r['tool']} | {valid} | {fmt(r['params_kept'])} | {fmt(r['macs_kept'])} | {heads} | "
                     f"{fmt(r.get('cosine'), '.4f')} | {fmt(r.get('rel_l2'), '.3f')} | {fmt(r.get('top1_agreement'))} | "
                     f"{r['seconds']:.1f} | {fmt(r.get('prune_seconds'), '.2f')} |")
    lines += ["", "Parameters kept below 100% at 100% of the MACs in the 'simplify +' rows are onnxsim.simplify's own "
              "constant folding (and above 100% on hfdyn_gpt2 its materialised constants), not pruning. Output "
              "cosine, relative L2 error and top-1 agreement (argmax over the last axis) are over the first output on "
              "16 seeded inputs; with random weights every channel is about as important as any other, so low figures "
              "say how much was removed, not how a trained model would fare.", ""]
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    n = len({r["model"] for r in rows})
    lines += ["| tool | valid | heads pruned (models) | median params kept | median MACs kept | median output cosine |",
              "|---|---:|---:|---:|---:|---:|"]
    for tool in tools:
        mine = [r for r in rows if r["tool"] == tool and r.get("valid")]
        pruned_heads = sum(1 for r in mine if r["heads"] < r["heads_before"])

        def med(key: str, mine: list[dict[str, Any]] = mine) -> float | None:
            return float(np.median([r[key] for r in mine])) if mine else None

        lines.append(f"| {tool} | {len(mine)}/{n} | {pruned_heads}/{n} | {fmt(med('params_kept'))} | "
                     f"{fmt(med('macs_kept'))} | {fmt(med('cosine'), '.4f')} |")
    return lines + [""]


def vit_markdown(state: dict[str, Any]) -> list[str]:
    lines = [f"## Fashion-MNIST ViT (original {state['baseline']:.2%}, {state['params']:,} params, "
             f"{state['macs']:,} MACs)", ""]
    if "twin" in state:
        t = state["twin"]
        lines += [f"PyTorch twin: {t['tensors_loaded']} tensors loaded from the ONNX initializers; largest logits "
                  f"difference from onnxruntime on {t['batch']} test images {t['logits_max_abs']:.1e} (checked to "
                  f"{LOGITS_TOL:g}); every Torch-Pruning export checked against the pruned PyTorch module (largest "
                  f"difference {max((r.get('export_max_abs', 0.0) for r in state['rows']), default=0.0):.1e}).", ""]
    for why in state.get("skipped", {}).items():
        lines += [f"Skipped {why[0]}: {why[1]}", ""]
    lines += ["### At matched MACs", "",
              ("Torch-Pruning's points nearest 50% and 60% of the MACs (per importance and setting); beside them "
               "onnxslim-prune with `--target-macs` set to exactly the MACs kept there (its global ranking decides "
               "which parts lose what), and `onnxslim-prune (same parts)`: the same per-part ratios as the "
               "Torch-Pruning point (`--heads`, `--ffn`, `--hidden`), so the same structure. `l1` uses no data; "
               "`--calib` adds the least-squares refit (l1) or is the method's own data (ldrf): train[:2000], no "
               "labels. Torch-Pruning's `taylor` uses those images with their labels."), "",
              "| MACs target | tool | method | setting | MACs kept | params kept | test accuracy | s (process) | s (prune call) |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    rows = [r for r in state["rows"] if "error" not in r]
    for target in MAC_TARGETS:
        theirs = [r for r in rows if target in r.get("matched", [])]
        points = sorted({round(r["macs_kept"], 4) for r in theirs})
        structs = {(r["setting"], r["ratio"], r["head_ratio"]) for r in theirs}
        ours = [r for r in rows if r["tool"] == "onnxslim-prune" and r.get("target") in points]
        same = [r for r in rows if r["tool"] == "onnxslim-prune (same parts)" and tuple(r["same_as"]) in structs]
        for r in sorted(theirs + ours + same, key=lambda r: (round(r["macs_kept"], 2), r["tool"], r["method"])):
            lines.append(f"| {target:.0%} | {r['tool']} | {r['method']} | {r['config']} | {r['macs_kept']:.1%} | "
                         f"{r['params_kept']:.1%} | {r['accuracy']:.2%} | {fmt(r.get('seconds') if r['tool'] != 'torch-pruning' else None, '.1f')} | "
                         f"{fmt(r.get('prune_seconds'), '.2f')} |")
    lines += ["", "### onnxsim on the same file", "",
              "| method | setting | valid | MACs kept | params kept | test accuracy | s (process) | s (prune call) |",
              "|---|---|:---:|---:|---:|---:|---:|---:|"]
    for r in state["rows"]:
        if r["tool"] != "onnxsim":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | {r['config']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['config']} | {'yes' if r['valid'] else 'no'} | {r['macs_kept']:.1%} | "
                     f"{r['params_kept']:.1%} | {r['accuracy']:.2%} | {r['seconds']:.1f} | {fmt(r.get('prune_seconds'), '.2f')} |")
    diag = state.get("heads_diagnosis", {})
    if diag.get("blocks"):
        lines += ["", "### Which heads: this tool's l1 against Torch-Pruning's l1 at heads 0.5", "",
                  ("Each layer has 4 heads and keeps 2. 'kept alone' is the accuracy with only that layer cut to those "
                   "two heads, on train[10000:12000] (not calibration, not test: a diagnosis). This tool's `l1` ranks a "
                   "head by the L1 norm of every weight it owns: its Q, K and V columns (the producers) and its rows of "
                   "the output projection (the consumer), as Torch-Pruning's `GroupMagnitudeImportance(p=1)` does "
                   "(before, Q, K and V alone: a worse pair in block 1). "
                   f"Original on these images: {diag['original_heldout']:.2%}."), "",
                  "| block | this tool keeps (kept alone) | Torch-Pruning keeps (kept alone) | best pair (kept alone) | "
                  "L1 of Q,K,V per head | L1 of proj rows per head |",
                  "|---:|---|---|---|---|---|"]
        for blk in diag["blocks"]:
            pairs = blk["pairs"]
            best = max(pairs, key=lambda k: pairs[k])
            o, t = ",".join(map(str, blk["ours"])), ",".join(map(str, blk["torch_pruning"]))
            lines.append(f"| {blk['block']} | {o} ({pairs.get(o, float('nan')):.2%}) | {t} ({pairs.get(t, float('nan')):.2%}) | "
                         f"{best} ({pairs[best]:.2%}) | {' / '.join(f'{v:.1f}' for v in blk['l1_qkv'])} | "
                         f"{' / '.join(f'{v:.1f}' for v in blk['l1_proj'])} |")
        lines.append("")
    tp = [r for r in state["rows"] if r["tool"] == "torch-pruning"]
    if tp:
        lines += ["", "### Every Torch-Pruning run", "",
                  "| importance | setting | pruning_ratio | head_pruning_ratio | heads kept | FFN kept | hidden kept | "
                  "MACs kept | params kept | test accuracy | s (prune call) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in tp:
            if "error" in r:
                lines.append(f"| {r['importance']} | {r['setting']} | {r['ratio']:g} | {r['head_ratio']:g} | error: {r['error']} | | | | | | |")
                continue
            k = r["kept"]
            lines.append(f"| {r['importance']} | {r['setting']} | {r['ratio']:g} | {r['head_ratio']:g} | {k['heads']}/16 | "
                         f"{k['ffn']}/512 | {k['hidden']}/64 | {r['macs_kept']:.1%} | {r['params_kept']:.1%} | "
                         f"{r['accuracy']:.2%} | {r['seconds']:.2f} |")
    return lines + [""]


def markdown(state: dict[str, Any]) -> str:
    v = state["versions"]
    tv = state.get("vit", {}).get("torch_versions", {})
    lines = [
        "# Peers on transformers: onnxsim and Torch-Pruning against onnxslim-prune",
        "",
        f"Generated by `{state['command']}`. onnxsim {v['onnxsim']} (the main venv's install): "
        "`onnxsim.apply_attention_head_pruning(model, sparsity, importance_norm=\"l1\")` (Python API; its CLI has no "
        "pruning flag); in the 'simplify +' rows after `onnxsim.simplify(model)` (its docstring names its own fusion passes "
        "as the source of the fused attention ops it matches, beside decomposed attention; on hf_bert, hfdyn_gpt2 and "
        "deit, checked by hand, simplify fused no attention; the prune call's seconds include it), and in the '+ channels' "
        "rows followed by `apply_structured_pruning(sparsity, importance_norm=\"l1\")`. "
        f"Torch-Pruning {tv.get('torch-pruning', 'not run')} on PyTorch {tv.get('torch', 'not run')} (CPU build, "
        f"pinned `{' '.join(TORCH_PINS)}` in a separate venv, found by `--torch-python`): `MetaPruner` with "
        "`num_heads={qkv: 4}`, `prune_num_heads=True`, `prune_head_dims=False`, `head_pruning_ratio` for the heads and "
        "`pruning_ratio` for the MLP (and the hidden size in the `+hidden` setting, with the class token and position "
        "embedding as unwrapped parameters; the hidden size is frozen in `heads+mlp` by ignoring the patch embedding), "
        "classifier ignored, as in its ViT example (`examples/transformers/prune_timm_vit.py`); importances "
        "`GroupMagnitudeImportance(p=1)` (that example's default), `p=2`, and `GroupTaylorImportance` from "
        "cross-entropy gradients on train[:2000] (its seconds include that gradient pass). The PyTorch ViT is the "
        "module of `../shared/models/train_fmnist_vit.py` with two edits that leave its outputs unchanged (checked "
        "below), both as in that example: `qkv.unbind(0)` for `qkv[0], qkv[1], qkv[2]` (with the indexing its "
        "dependency graph fails: IndexError) and the attention output reshaped to heads x head_dim. "
        f"onnxslim-prune {v['onnxslim-prune']}: `onnx-prune` in a fresh process. No fine-tuning anywhere. Parameters and "
        "MACs: `onnxslim_prune.model_stats` on every ONNX result at batch 1. Seconds: 'process' is the whole "
        "child process (load, prune, save; onnx-prune also validates and reports), 'prune call' the pruning call alone; "
        "2 shared cores, indicative only. Accuracy: onnxruntime on the full 10,000-image Fashion-MNIST test split, which "
        "no ranking or fitting saw (calibration and Taylor gradients: the first 2,000 training images).",
        "",
    ]
    if state.get("zoo"):
        lines += zoo_markdown(state["zoo"])
    if state.get("vit"):
        lines += vit_markdown(state["vit"]) + ["![ViT: accuracy against MACs kept](peers_transformers.png)", ""]
    lines += better(state)
    return "\n".join(lines) + "\n"


def better(state: dict[str, Any]) -> list[str]:
    """Where a peer beats onnxslim-prune, read off the rows."""
    out = ["## Where a peer is better", ""]
    zrows = [r for r in state.get("zoo", []) if "error" not in r]
    by = {(r["model"], r["tool"]): r for r in zrows}
    first, ffn_only = ZOO_OURS[0][0], ZOO_OURS[-1][0]
    for tool, _ in ZOO_ONNXSIM:
        mine = [r for r in zrows if r["tool"] == tool]
        if not mine:
            continue
        faster = [r["model"] for r in mine if (o := by.get((r["model"], first))) and "prune_seconds" in o
                  and r.get("prune_seconds", 1e9) < o["prune_seconds"]]
        heads = [r["model"] for r in mine if r.get("valid") and r["heads"] < r["heads_before"]]
        line = (f"- **{tool}**: faster prune call than `{first}` on {len(faster)}/{len(mine)} models; heads removed on "
                f"{len(heads)}/{len(mine)}; valid on {sum(1 for r in mine if r.get('valid'))}/{len(mine)}")
        if tool.endswith("channels 0.5"):
            closer = []
            for r in mine:
                o = by.get((r["model"], ffn_only))
                if r.get("valid") and o and o.get("valid") and r["macs_kept"] < 0.99 \
                        and r["cosine"] > o["cosine"] + 1e-4:
                    closer.append(f"{r['model']} ({r['cosine']:.4f} at {r['params_kept']:.1%} params vs "
                                  f"{o['cosine']:.4f} at {o['params_kept']:.1%})")
            line += (f"; closer to the original's outputs than `{ffn_only}` (the same part pruned) on {len(closer)}"
                     + (f": {'; '.join(closer)}" if closer else ""))
            same = [r["model"] for r in mine if r.get("valid") and r["macs_kept"] < 0.99
                    and (o := by.get((r["model"], ffn_only))) and o.get("valid") and o["macs"] == r["macs"]
                    and abs(o["cosine"] - r["cosine"]) < 1e-6]
            line += (f". Parity: where it pruned and stayed valid, {len(same)} models have the same MACs and the same "
                     f"outputs (cosine to 1e-6) as `{ffn_only}`" + (f" ({', '.join(same)})" if same else ""))
        out.append(line + ".")
    vstate = state.get("vit", {})
    vrows = [r for r in vstate.get("rows", []) if "error" not in r]
    for data, imps in ((False, ("l1", "l2")), (True, ("taylor",))):
        wins, total = [], 0
        for r in vrows:
            if r["tool"] != "torch-pruning" or not r.get("matched") or r["importance"] not in imps:
                continue
            point, struct = round(r["macs_kept"], 4), [r["setting"], r["ratio"], r["head_ratio"]]
            ours = [o for o in vrows if ("--calib" in o["method"]) == data and (
                (o["tool"] == "onnxslim-prune" and o.get("target") == point)
                or (o["tool"] == "onnxslim-prune (same parts)" and o.get("same_as") == struct))]
            if not ours:
                continue
            total += 1
            best = max(ours, key=lambda o: o["accuracy"])
            if r["accuracy"] > best["accuracy"] + 0.001:
                wins.append(f"{r['method']} {r['accuracy']:.2%} vs {best['accuracy']:.2%} ({best['tool']} "
                            f"{best['method']}, {best['config']}) at {r['macs_kept']:.1%} MACs")
        if total:
            kind = ("with data (Taylor: train[:2000] with labels; this tool's l1/ldrf --calib: the same images, no labels)"
                    if data else "without data (Torch-Pruning l1/l2 against this tool's l1, no --calib)")
            out.append(f"- **torch-pruning** on the ViT {kind}, against this tool's best at the same MACs or the same "
                       f"parts: more accurate at {len(wins)} of {total} matched points"
                       + (f": {'; '.join(wins)}" if wins else "") + ".")
    tp_fast = [r for r in vrows if r["tool"] == "torch-pruning" and r.get("matched") and r["importance"] != "taylor"]
    ours_fast = [r for r in vrows if r["tool"].startswith("onnxslim-prune") and r["method"] == "l1" and "prune_seconds" in r]
    if tp_fast and ours_fast:
        out.append(f"- Prune call on the ViT, data-free: Torch-Pruning median {np.median([r['prune_seconds'] for r in tp_fast]):.2f} s "
                   f"(no validation), onnxslim-prune l1 median {np.median([r['prune_seconds'] for r in ours_fast]):.2f} s "
                   "(load, trace, prune, checker, strict shape inference, an onnxruntime run, the verdict).")
    return out + [""]


def vit_plot(state: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy against MACs kept on the ViT, every tool and setting (None without matplotlib)."""
    from lib.plots import percent_axes, pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    vstate = state.get("vit", {})
    rows = [r for r in vstate.get("rows", []) if "accuracy" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    colours = {"l1": "tab:blue", "l2": "tab:cyan", "taylor": "tab:purple", "l1 --calib": "tab:green",
               "ldrf --calib": "tab:red", "heads": "tab:gray", "simplify+heads": "tab:gray",
               "simplify+heads+channels": "tab:gray"}
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        method = r.get("importance", r["method"]) if r["tool"] == "torch-pruning" else r["method"]
        label = (f"Torch-Pruning {method} ({r['setting']})" if r["tool"] == "torch-pruning"
                 else f"{r['tool']} {method}")
        series.setdefault((label, method), []).append((r["macs_kept"], r["accuracy"]))
    for (label, method), pts in series.items():
        pts.sort()
        style: dict[str, Any] = {"color": colours.get(method, "black")}
        if label.startswith("Torch-Pruning"):
            style.update(marker="^" if "hidden" in label else "v", ls="none")
        elif "same parts" in label:
            style.update(marker="s", ls="none", mfc="none")
        elif label.startswith("onnxsim"):
            style.update(marker="x", ls="none")
        else:
            style.update(marker="o", ls="-", lw=1.5)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=5, label=label, **style)
    ax.axhline(vstate["baseline"], color="black", ls="--", lw=1, label=f"original {vstate['baseline']:.2%}")
    percent_axes(ax, "MACs kept", "test accuracy (10,000 images)")
    ax.set_ylim(0, 0.9)
    ax.set_title("Fashion-MNIST ViT, no fine-tuning: Torch-Pruning 1.5.2, onnxsim 0.8.1, onnxslim-prune", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    return save(fig, path)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-child":
        torch_child(Path(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--onnxsim-child":
        onnxsim_child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="zoo,vit")
    ap.add_argument("--only", nargs="*", help="zoo models to run")
    ap.add_argument("--tools", nargs="*", help="zoo: only these tool labels, the other rows of the json kept")
    ap.add_argument("--filled", type=Path, default=FILLED, help="zoo models filled by fill.py")
    ap.add_argument("--torch-python", type=Path, default=None, help="an interpreter with torch and torch_pruning")
    ap.add_argument("--out", type=Path, default=OUT, help="writes OUT.json and OUT.md")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--rebuild", action="store_true", help="rewrite the markdown from the json and stop")
    ap.add_argument("--keep", type=Path, default=None, help="keep the pruned models in this folder")
    a = ap.parse_args()
    from lib.results import write_json, write_results, write_text

    json_path, md_path = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    if a.rebuild:
        saved = json.loads(json_path.read_text())
        write_text(md_path, markdown(saved))
        vit_plot(saved, a.out.with_suffix(".png"))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parts = a.parts.split(",")
    state: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    state["versions"] = versions()
    state["command"] = "python benchmarks/peers_transformers.py"  # partial runs (--parts, --tools) add to its json
    work = a.keep or Path(tempfile.mkdtemp(prefix="peers_tf_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "zoo" in parts:
            rows = zoo(a.filled, work, a.timeout, a.only, a.tools)
            if a.tools or a.only:  # a partial run replaces only what it measured
                done = {(r["model"], r["tool"]) for r in rows}
                rows = [r for r in state.get("zoo", []) if (r["model"], r["tool"]) not in done] + rows
                order = {t: i for i, t in enumerate([t for t, _ in ZOO_ONNXSIM] + [t for t, _ in ZOO_OURS])}
                rows.sort(key=lambda r: (ZOO_MODELS.index(r["model"]), order.get(r["tool"], 99)))
            state["zoo"] = rows
            write_json(json_path, state)
        if "vit" in parts:
            state["vit"] = vit(work, find_torch_python(a.torch_python), a.timeout)
        if "vit" in parts or "vit-parity" in parts:
            vit_parity(work, state["vit"], a.timeout)
        if "vit" in parts or "vit-heads" in parts:
            vit_heads(work, state["vit"], a.timeout)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    write_results(a.out, state, markdown(state))
    vit_plot(state, a.out.with_suffix(".png"))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
