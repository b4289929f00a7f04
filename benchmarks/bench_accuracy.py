"""Accuracy without fine-tuning of every pruning method on the Fashion-MNIST models.

    python benchmarks/bench_accuracy.py                 # all four models, all methods, 4 ratios
    python benchmarks/bench_accuracy.py --quick         # LeNet-300-100 only, fewer methods
    python benchmarks/bench_accuracy.py --models fmnist_resnet56 --methods ldrf,thinet --ratios 0.5

Calibration: the first 2,000 TRAIN images (written once to an .npz); accuracy: the full
10,000-image TEST split. Rows without calibration (l1, l2, fpgm, bn, random, merge) are
plain pruning; with calibration (`l1+reconstruct` and the data-driven methods) the api
refits the consumers of pruned channels by least squares (`--no-reconstruct` is the
`<method> (no refit)` ablation). Results go to benchmarks/results/accuracy.{md,json},
rewritten after every row; `--resume` keeps rows already measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fmnist import load_split, write_calibration  # noqa: E402

from onnxslim_prune import api  # noqa: E402
from onnxslim_prune.passes import methods as methods_mod  # noqa: E402

log = logging.getLogger("bench_accuracy")

MODELS = ("fmnist_lenet300", "fmnist_vgg_slim_bn", "fmnist_vgg_slim_bn_unfused", "fmnist_resnet56")
RATIOS = (0.3, 0.5, 0.7, 0.8)
ALL_METHODS = (
    "l1", "l2", "fpgm", "bn", "random", "merge", "merge-projection", "l1+reconstruct", "thinet", "cp", "ldrf", "nisp", "mean_act", "apoz",
)
QUICK_METHODS = ("l1", "merge", "merge-projection", "l1+reconstruct", "thinet", "cp", "ldrf", "nisp", "mean_act", "apoz")
ABLATIONS = ("thinet", "cp", "ldrf", "nisp", "mean_act", "apoz")  # selection alone, without the refit
TARGETS = (  # (model, method, ratio, minimum accuracy): the issues' targets
    ("fmnist_lenet300", "thinet", 0.8, 0.86),
    ("fmnist_resnet56", "ldrf", 0.5, 0.925),
    ("fmnist_lenet300", "merge", 0.8, 0.80),
    ("fmnist_vgg_slim_bn_unfused", "merge", 0.3, 0.90),
)


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    calibrated: bool
    reconstruct: bool
    params: tuple[tuple[str, Any], ...] = ()


#: data-free variants with their own settings: label -> (method, params)
SETTINGS_VARIANTS = {"merge-projection": ("merge", (("merge_scale", "projection"), ("merge_threshold", 0.1)))}


def variant(label: str) -> Variant:
    if label.endswith(" (no refit)"):
        return Variant(label, label.removesuffix(" (no refit)"), True, False)
    if label == "l1+reconstruct":
        return Variant(label, "l1", True, True)
    if label in SETTINGS_VARIANTS:
        method, params = SETTINGS_VARIANTS[label]
        return Variant(label, method, False, True, params)
    return Variant(label, label, label in methods_mod.DATA_DRIVEN, True)


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    hits = 0
    for start in range(0, len(images), batch):
        logits = session.run(None, {name: images[start : start + batch]})[0]
        hits += int((logits.argmax(axis=1) == labels[start : start + batch]).sum())
    return hits / len(images)


def one(model_path: Path, v: Variant, ratio: float, calib: Path, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model_path.stem, "method": v.label, "ratio": ratio}
    started = time.perf_counter()
    try:
        result = api.prune(
            model_path, v.method, ratio, calib=calib if v.calibrated else None, batch_size=batch_size,
            params={**dict(v.params), **({} if v.reconstruct else {"reconstruct": False})},
        )
    except Exception as exc:  # a failing method is a row, not the end of the table
        row.update(error=f"{type(exc).__name__}: {exc}"[:300], seconds=round(time.perf_counter() - started, 1))
        log.debug("%s", traceback.format_exc())
        return row
    row.update(
        seconds=round(time.perf_counter() - started, 1),
        accuracy=accuracy(result.model, images, labels),
        params_before=result.report.before.params, params_after=result.report.after.params,
        macs_before=result.report.before.macs, macs_after=result.report.after.macs,
    )
    return row


def markdown(rows: list[dict[str, Any]], baselines: dict[str, float], ratios: list[float], calib_count: int) -> str:
    lines = [
        "# Accuracy without fine-tuning (Fashion-MNIST)",
        "",
        f"Calibration: first {calib_count} TRAIN images; accuracy: the full 10,000-image TEST split. "
        "Uniform ratio per channel group. `(no refit)`: the selection alone (`--no-reconstruct`). "
        "Generated by `benchmarks/bench_accuracy.py`.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        lines += [f"## {model} (original {100 * baselines[model]:.2f}%)", ""]
        lines.append("| method | " + " | ".join(f"{r:g}" for r in ratios) + " |")
        lines.append("|---|" + "---:|" * len(ratios))
        order = {m: i for i, m in enumerate(ALL_METHODS + tuple(f"{a} (no refit)" for a in ABLATIONS))}
        for method in sorted(dict.fromkeys(r["method"] for r in mine), key=lambda m: order.get(m, len(order))):
            cells = []
            for ratio in ratios:
                hit = next((r for r in mine if r["method"] == method and r["ratio"] == ratio), None)
                if hit is None:
                    cells.append("")
                elif "error" in hit:
                    cells.append("error")
                else:
                    cells.append(f"{100 * hit['accuracy']:.2f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        sizes = []
        for ratio in ratios:
            hit = next((r for r in mine if r["ratio"] == ratio and "params_after" in r), None)
            sizes.append("" if hit is None else f"{100 * hit['params_after'] / hit['params_before']:.0f}% / "
                         f"{100 * hit['macs_after'] / hit['macs_before']:.0f}%")
        lines.append("| *params / MACs kept* | " + " | ".join(sizes) + " |")
        secs = []
        for ratio in ratios:
            took = [r["seconds"] for r in mine if r["ratio"] == ratio and "seconds" in r]
            secs.append(f"{max(took):.0f}" if took else "")
        lines += ["| *slowest method, s* | " + " | ".join(secs) + " |", ""]
        errors = [r for r in mine if "error" in r]
        for r in errors:
            lines.append(f"- error: {r['method']} at {r['ratio']}: {r['error']}")
        if errors:
            lines.append("")
    lines += ["## Targets", "", "| model | method | ratio | target | measured | met |", "|---|---|---:|---:|---:|---|"]
    for model, method, ratio, goal in TARGETS:
        hit = next((r for r in rows if r["model"] == model and r["method"] == method and r["ratio"] == ratio), None)
        got = "" if hit is None or "accuracy" not in hit else f"{100 * hit['accuracy']:.2f}%"
        met = "" if not got else ("yes" if hit["accuracy"] >= goal else "no")  # type: ignore[index]
        lines.append(f"| {model} | {method} | {ratio:g} | {100 * goal:.1f}% | {got} | {met} |")
    lines += ["", merge_vs_l1(rows, "fmnist_vgg_slim_bn_unfused", ratios)]
    return "\n".join(lines) + "\n"


def merge_vs_l1(rows: list[dict[str, Any]], model: str, ratios: list[float]) -> str:
    """The issue's 'merge beats l1 at every ratio' on `model`, ratio by ratio."""
    def acc(method: str, ratio: float) -> float | None:
        hit = next((r for r in rows if r["model"] == model and r["method"] == method and r["ratio"] == ratio), None)
        return None if hit is None or "accuracy" not in hit else float(hit["accuracy"])

    cells = []
    for ratio in ratios:
        m, l1 = acc("merge", ratio), acc("l1", ratio)
        if m is not None and l1 is not None:
            verdict = "beats" if m > l1 + 0.001 else ("ties" if abs(m - l1) <= 0.001 else "loses to")
            cells.append(f"{ratio:g}: {100 * m:.2f} {verdict} {100 * l1:.2f}")
    return f"merge vs l1 on {model}: " + ("; ".join(cells) if cells else "not measured") + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=HERE.parents[1] / "shared" / "models")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=None, help="comma-separated labels (default: all, or the quick set)")
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--quick", action="store_true", help="LeNet-300-100 only, fewer methods")
    parser.add_argument("--ablation", action="store_true", help="selections without refit for every model (LeNet: always)")
    parser.add_argument("--calib-count", type=int, default=2000)
    parser.add_argument("--calib", type=Path, default=Path("/tmp/onnxslim_bench/fmnist_train2000.npz"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "accuracy")
    parser.add_argument("--resume", action="store_true", help="keep rows already in the JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    models = ["fmnist_lenet300"] if args.quick else args.models.split(",")
    labels_list = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else ALL_METHODS)
    labels_list = [m for m in labels_list if variant(m).method in methods_mod.METHODS or m == "l1+reconstruct"]
    ablation = [f"{m} (no refit)" for m in ABLATIONS if m in labels_list]
    ratios = [float(r) for r in args.ratios.split(",")]
    calib = write_calibration(args.calib, args.calib_count)
    images, labels = load_split("test")

    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    state: dict[str, Any] = {"rows": [], "baselines": {}}
    if args.resume and json_path.exists():
        state = json.loads(json_path.read_text())
    done = {(r["model"], r["method"], r["ratio"]) for r in state["rows"] if "error" not in r}
    state["rows"] = [r for r in state["rows"] if (r["model"], r["method"], r["ratio"]) in done]
    for model in models:
        path = args.models_dir / f"{model}.onnx"
        state["baselines"][model] = accuracy(onnx.load(str(path)), images, labels)
        log.info("%s: original %.2f%%", model, 100 * state["baselines"][model])
        labels_here = labels_list + (ablation if args.ablation or model == "fmnist_lenet300" else [])
        for ratio in ratios:
            for label in labels_here:
                if (model, label, ratio) in done:
                    continue
                row = one(path, variant(label), ratio, calib, images, labels, args.batch_size)
                state["rows"].append(row)
                log.info("%s %s %.1f: %s (%ss)", model, label, ratio,
                         f"{100 * row['accuracy']:.2f}%" if "accuracy" in row else row.get("error"), row["seconds"])
                args.out.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(state, indent=1))
                order = {m: i for i, m in enumerate(models)}
                rows = sorted(state["rows"], key=lambda r: order.get(r["model"], 99))
                md_path.write_text(markdown(rows, state["baselines"], ratios, args.calib_count))
    log.info("wrote %s and %s", md_path, json_path)


if __name__ == "__main__":
    main()
