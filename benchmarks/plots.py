"""Plots of the benchmark results (matplotlib, Agg backend: no display needed).

    python benchmarks/plots.py                          # read and write benchmarks/results
    python benchmarks/plots.py --results /tmp/quick     # another results folder

Reads what the benchmarks wrote, skips any input that is missing, and writes PNGs beside it:

* ``accuracy_<model>.png``: test accuracy against the fraction of MACs kept, one line per
  method, from ``accuracy.json`` (bench_accuracy.py); a method's ``(no refit)`` ablation is
  drawn dashed in the same colour;
* ``latency.png``: onnxruntime speed-up against the fraction of MACs kept, round-to 1 and 8,
  from ``latency.json`` (bench_latency.py), with the line speed-up = 1 / MACs kept;
* ``peers.png``: accuracy against MACs kept, Torch-Pruning / onnxsim / onnxslim-prune, one
  panel per model, from ``peers.json`` (peers.py);
* ``anchors.png``: the Neuron Merging paper's LeNet-300-100 figures next to ours, from the
  ``anchors`` entry of ``peers.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lib.paths import RESULTS
from lib.plots import DPI, percent_axes, pretty, pyplot

plt = pyplot()


def accuracy_plots(results: Path, out: Path) -> list[Path]:
    src = results / "accuracy.json"
    if not src.exists():
        print(f"skipped accuracy plots: no {src}")
        return []
    data = json.loads(src.read_text())
    rows = [r for r in data["rows"] if "accuracy" in r]
    written = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        bases = list(dict.fromkeys(m.removesuffix(" (no refit)") for m in methods))
        cmap = plt.get_cmap("tab20" if len(bases) > 10 else "tab10")
        colour = {b: cmap(i % cmap.N) for i, b in enumerate(bases)}
        fig, ax = plt.subplots(figsize=(9, 5.6))
        for method in methods:
            pts = sorted((r["macs_after"] / r["macs_before"], r["accuracy"]) for r in mine if r["method"] == method)
            if not pts:
                continue
            ablation = method.endswith(" (no refit)")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if ablation else "-",
                    marker="o", ms=3.5, lw=1.0 if ablation else 1.6, alpha=0.75 if ablation else 1.0,
                    color=colour[method.removesuffix(" (no refit)")], label=method)
        base = data.get("baselines", {}).get(model)
        if base is not None:
            ax.axhline(base, color="black", ls=":", lw=1, label=f"original {100 * base:.2f}%")
        percent_axes(ax, "MACs kept", "test accuracy (10k Fashion-MNIST, no fine-tuning)")
        ax.set_title(f"{pretty(model)}: accuracy against MACs kept, uniform ratio per group")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        fig.tight_layout()
        path = out / f"accuracy_{model}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written


def latency_plot(results: Path, out: Path) -> list[Path]:
    src = results / "latency.json"
    if not src.exists():
        print(f"skipped latency plot: no {src}")
        return []
    rows = json.loads(src.read_text())
    fig, ax = plt.subplots(figsize=(9, 5.4))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(models)}
    markers = {1: "o", 8: "s"}
    for r in rows:
        ax.scatter(r["macs_kept"], r["speedup"], s=42, alpha=0.85, color=colour[r["model"]],
                   marker=markers.get(r["round_to"], "^"), edgecolors="black" if r["round_to"] != 1 else "none", linewidths=0.6)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colour[m], label=m.removeprefix("tv_").removeprefix("timm_"))
               for m in models]
    handles += [plt.Line2D([], [], ls="", marker=markers.get(k, "^"), markerfacecolor="white", markeredgecolor="black",
                           label=f"round-to {k} (shape)") for k in sorted({r["round_to"] for r in rows})]
    lo = min(r["macs_kept"] for r in rows) * 0.9
    hi = max(r["macs_kept"] for r in rows) * 1.1
    xs = [lo + (hi - lo) * i / 50 for i in range(51)]
    handles += ax.plot(xs, [1 / x for x in xs], color="0.5", ls=":", lw=1, label="1 / MACs kept")
    ax.axhline(1.0, color="black", lw=0.8)
    percent_axes(ax, "MACs kept", "speed-up (latency before / after)", y_percent=False)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("onnxruntime CPU speed-up of l1 at ratio 0.5 (zoo models, batch 1)")
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return [path]


TOOL_STYLE = {
    "torch-pruning": dict(color="tab:red", marker="s", ls="-"),
    "torch-pruning (filter L1)": dict(color="tab:red", marker="x", ls=":"),
    "onnxsim": dict(color="tab:green", marker="^", ls="-"),
    "onnxslim-prune": dict(color="tab:blue", marker="o", ls="-"),
    "onnxslim-prune (inner only)": dict(color="tab:blue", marker="o", ls="--", mfc="white"),
}


def peers_plot(results: Path, out: Path) -> list[Path]:
    src = results / "peers.json"
    if not src.exists():
        print(f"skipped peers plot: no {src}")
        return []
    data = json.loads(src.read_text())
    rows = [r for r in data["rows"] if "accuracy" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return []
    cols = 2 if len(models) > 1 else 1
    nrows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.3 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        mine = [r for r in rows if r["model"] == model]
        for tool in dict.fromkeys(r["tool"] for r in mine):
            pts = sorted((r["macs_kept"], r["accuracy"]) for r in mine if r["tool"] == tool)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=5, lw=1.5, label=tool,
                    **TOOL_STYLE.get(tool, dict(marker="o", ls="-")))
        base = data.get("baselines", {}).get(model)
        if base is not None:
            ax.axhline(base, color="black", ls=":", lw=1, label="original")
        percent_axes(ax, "MACs kept", "test accuracy")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.0)
        ax.set_title(pretty(model), fontsize=10)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    ratios = "/".join(f"{r:g}" for r in sorted({r["ratio"] for r in rows}))
    fig.suptitle(f"Same weights, same uniform ratios {ratios}, no fine-tuning", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = out / "peers.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return [path]


def anchors_plot(results: Path, out: Path) -> list[Path]:
    src = results / "peers.json"
    data = json.loads(src.read_text()).get("anchors") if src.exists() else None
    if not data:
        print("skipped anchors plot: no anchors in peers.json")
        return []
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {"l1": "tab:orange", "merge": "tab:purple"}
    for method in ("l1", "merge"):
        pts = sorted((r["ratio"], r["accuracy"], r["paper"]) for r in data["rows"] if r["method"] == method)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[2] for p in pts], "--", marker="s", color=colours[method], alpha=0.8, label=f"paper {method}")
        ax.plot(xs, [p[1] for p in pts], "-", marker="o", color=colours[method], lw=2, label=f"ours {method}")
    ax.axhline(data["paper_baseline"], color="0.5", ls="--", lw=0.8, label=f"paper original {100 * data['paper_baseline']:.2f}%")
    ax.axhline(data["baseline"], color="black", ls=":", lw=0.8, label=f"our original {100 * data['baseline']:.2f}%")
    percent_axes(ax, "neurons pruned per hidden layer", "test accuracy (no fine-tuning)")
    ax.set_title("LeNet-300-100, Fashion-MNIST: Neuron Merging Table 1 vs ours", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = out / "anchors.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return [path]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder with the benchmarks' JSON")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: --results)")
    a = ap.parse_args()
    if plt is None:
        print("plots need matplotlib (the bench extra)", file=sys.stderr)
        return 1
    out = a.out or a.results
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fn in (accuracy_plots, latency_plot, peers_plot, anchors_plot):
        written += fn(a.results, out)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
