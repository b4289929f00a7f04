"""The Fashion-MNIST ViT at about 60% of its MACs: test accuracy against MACs kept, per method (issue 13).

    OMP_NUM_THREADS=1 python benchmarks/bench_vit.py            # resumes from results/transformers_vit.json

Data (the issue's protocol): calibration = TRAIN[:2000] (selection statistics and every least-squares
refit), --eval = TRAIN[2000:4000] (the gated search's probes and the sensitivity allocation's), and the
figures reported on the 10,000-image TEST split, which no fitting, selection or search saw.
Families:

* ``l1``: data-free, weights only (`analysis.score`); ``l1 + LN refit``: the same plan, then each pruned
  LayerNorm's gamma / beta refitted on calibration data (`methods.lnrefit`), no other fitting;
* ``l1 + refit``: the l1 plan, then the least-squares refit of every pruned layer's consumers (``--calib``);
* ``ldrf``: LDRF selection + refit; ``contrib`` / ``obs``: the calibrated output-contribution importances
  of `methods.contribution` (a label-free stand-in for Kwon et al. 2022's Fisher, and its OBS form) + refit;
  ``kwon``: ``contrib`` with one global cost-equal ranking of heads and FFN neurons (the same MACs as
  the per-part ratios, distributed by ``contrib / cost``) + refit;
* ``sensitivity``: ``--target-macs F --allocation sensitivity`` (per-group ratios from the sensitivity
  profile measured on --eval); ``search``: the gated search ``--max-drop 1`` (no ratio given).

Writes results/transformers_vit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import onnx

from lib.data import load_split, search_split
from lib.internals import refit_layernorms
from lib.paths import RESULTS, ROOT, SHARED_MODELS
from lib.plots import pyplot, save
from lib.results import write_json, write_text
from lib.runtime import accuracy, check_valid
from onnxslim_prune import PruneResult, model_stats, prune

MODEL = SHARED_MODELS / "fmnist_vit.onnx"
TARGET = 0.8482  # the target: within 1 point of the original's 85.82%
SHAPES = {"input": (1, 1, 28, 28)}
log = logging.getLogger("bench_vit")
FINDINGS = """Findings (this run). The target is missed: the best model at <= 60.5% of the MACs is `--method contrib
--target-macs 0.6 --allocation sensitivity` at 59.6% MACs, 84.29% test top-1, 0.53 points below 84.82%; of the per-part
ratios `contrib --ratio 0.625 --heads 0 --hidden 0.25 --calib` is best, 84.07% (ldrf 83.92%, l1 + refit
83.46%; at 63.5% MACs contrib reaches 84.64%, at 67.4% 84.96%, above the target). Keeping every head and cutting a
quarter of the hidden size and 5/8 of the FFN is the best split found; cutting heads costs more than its MACs
(`--heads 0.25 --hidden 0.125`: 83.29-83.68% at 58.2%). The global contrib/cost ranking (`kwon`) does not beat
per-layer uniform ratios: across the FFN layers (`--heads 0`) 84.01% against contrib's 84.07% at 59.6%, and with
heads competing (`--heads 0.25 --hidden 0.125`) 82.87% at 59.0% against 83.29% at 58.2%; the residual-stream
energy does not rank heads against neurons well here. Two steps do not help (contrib 84.04% at 59.6%). The LayerNorm refit alone lifts data-free l1 by up to
3.8 points (59.06% -> 62.86% at 58.2%) but lowers it in other rows (68.30% -> 65.92% at 67.4%); after the
consumers' least-squares refit it has nothing left to add, since a per-channel affine change after a LayerNorm is
what that refit absorbs. The gated search at `--max-drop 1` (its probes share the budget by predicted damage, the
default since the SmolLM2 measurement) stops at 83.4% (ldrf, 85.46%) and 85.7% (contrib, 85.66%) of the MACs,
against 87.3% and 86.3% with the sensitivity profile before: its probes are judged on 1,000 --eval images, whose
95% interval on the drop is about +-0.9 points, so a 1-point gate leaves little room."""


@dataclass(frozen=True)
class Config:
    family: str
    method: str
    ratio: float
    params: dict[str, Any] = field(default_factory=dict)
    calib: bool = False
    ln_refit: bool = False
    cli: tuple[str, ...] = ()  # a CLI run (search, sensitivity allocation) instead of prune
    then: tuple[tuple[float, tuple[tuple[str, float], ...]], ...] = ()  # further steps on the pruned model

    @property
    def label(self) -> str:
        if self.cli:
            return " ".join(["--method", self.method, *self.cli])
        parts = [self.method, f"--ratio {self.ratio:g}", *(f"--{k} {v:g}" for k, v in self.params.items())]
        more = "".join(f", then --ratio {r:g} " + " ".join(f"--{k} {v:.3g}" for k, v in p) for r, p in self.then)
        return " ".join(parts) + (" --calib" if self.calib else "") + (" + LN refit" if self.ln_refit else "") + more


PART_CONFIGS: tuple[tuple[float, dict[str, Any]], ...] = (
    (0.5, {"heads": 0.0, "hidden": 0.25}),
    (0.625, {"heads": 0.0, "hidden": 0.25}),
    (0.75, {"heads": 0.0, "hidden": 0.25}),
    (0.5, {"heads": 0.0, "hidden": 0.2}),
    (0.625, {"heads": 0.0, "hidden": 0.2}),
    (0.5, {"heads": 0.25, "hidden": 0.125}),
    (0.25, {}),
    (0.5, {}),
)


def configs() -> list[Config]:
    out: list[Config] = []
    for ratio, params in PART_CONFIGS:
        out.append(Config("l1", "l1", ratio, params))
        out.append(Config("l1 + LN refit", "l1", ratio, params, ln_refit=True))
        out.append(Config("l1 + refit", "l1", ratio, params, calib=True))
        out.append(Config("ldrf", "ldrf", ratio, params, calib=True))
        out.append(Config("contrib", "contrib", ratio, params, calib=True))
        out.append(Config("obs", "obs", ratio, params, calib=True))
        out.append(Config("kwon", "kwon", ratio, params, calib=True))
    for ratio, params in ((0.75, {"heads": 0.0, "hidden": 0.2}), (0.875, {"heads": 0.0, "hidden": 0.15}),
                          (0.875, {"heads": 0.0, "hidden": 0.2})):  # more FFN, less hidden: near 60% from the other side
        out.append(Config("l1 + refit", "l1", ratio, params, calib=True))
        out.append(Config("ldrf", "ldrf", ratio, params, calib=True))
        out.append(Config("contrib", "contrib", ratio, params, calib=True))
    # two steps, each removing about half (in kept fraction) of the final cut; the second on the refitted model
    for method in ("contrib", "kwon"):
        out.append(Config(f"{method} x2", method, 0.375, {"heads": 0.0, "hidden": 0.125}, calib=True,
                          then=((0.4, (("heads", 0.0), ("hidden", 1 / 7))),)))
        out.append(Config(f"{method} x2", method, 0.3, {"heads": 0.0, "hidden": 0.125}, calib=True,
                          then=((0.3, (("heads", 0.0), ("hidden", 1 / 7))),)))
    for method in ("ldrf", "contrib"):
        out.append(Config("sensitivity", method, 0.5, cli=("--target-macs", "0.6", "--allocation", "sensitivity")))
        out.append(Config("search", method, 0.5, cli=("--max-drop", "1")))
    return out


def ln_keep(result: PruneResult) -> dict[str, np.ndarray]:
    """Kept positions of each pruned LayerNormalization's input, from the trace and the plan."""
    keep_atoms = result.plan.atom_keep(result.trace)
    out = {}
    for node in result.model.graph.node:
        cmap = result.trace.maps.get(node.input[0]) if node.op_type == "LayerNormalization" else None
        if cmap is not None and not keep_atoms[cmap.atoms].all():
            out[node.name] = np.flatnonzero(keep_atoms[cmap.atoms])
    return out


def run_one(cfg: Config, calib: Path, evaluation: Path, work: Path, xt: np.ndarray, yt: np.ndarray) -> dict[str, Any]:
    original = onnx.load(MODEL)
    before = model_stats(original, SHAPES)
    start = time.perf_counter()
    if cfg.cli:
        target, report = work / f"{cfg.family}_{cfg.method}.onnx", work / f"{cfg.family}_{cfg.method}.json"
        cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(MODEL), "--method", cfg.method, "--calib", str(calib),
               "--eval", str(evaluation), *cfg.cli, "-o", str(target), "--report", str(report), "--keep-failed", "-q",
               "--no-latency"]
        if not target.exists() or not report.exists():  # a finished run (minutes) is reused
            subprocess.run(cmd, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        model = onnx.load(target)
        extra = {"report": json.loads(report.read_text()).get("search")}
    else:
        result = prune(original, cfg.method, cfg.ratio, calib=calib if cfg.calib else None, params=cfg.params or None,
                           latency=False)
        model = result.model
        for ratio, step in cfg.then:
            model = prune(model, cfg.method, ratio, calib=calib, params=dict(step), latency=False).model
        if cfg.ln_refit:
            x = np.load(calib)["input"][:1000]  # half the calibration set: the lines have 50,000 tokens each
            model = refit_layernorms(original, model, ln_keep(result), {"input": x})
            check_valid(model, original)  # checker (full), strict shape inference, the original's inputs and outputs
        extra = {}
    seconds = time.perf_counter() - start
    after = model_stats(model, SHAPES)
    return {"family": cfg.family, "label": cfg.label, "macs": after.macs / before.macs, "params": after.params / before.params,
            "top1": accuracy(model, xt, yt), "seconds": round(seconds, 1), **extra}


def write(rows: list[dict[str, Any]], base: float, out: Path, command: str) -> None:
    lines = ["# Fashion-MNIST ViT: test accuracy against MACs kept", "",
             "Issue 13's target: at 60% of the MACs, within 1 point of the original (85.82%) without fine-tuning. "
             "Calibration (every selection statistic and refit) is TRAIN[:2000]; the sensitivity allocation and the "
             "gated search measure on --eval TRAIN[2000:4000]; top-1 is on the 10,000 TEST images no step saw. "
             "`l1 + LN refit` refits only the pruned LayerNorms' gamma / beta (`methods.lnrefit`); `contrib` / `obs` are the "
             "calibrated output-contribution importances of `methods.contribution`, followed by the least-squares refit; "
             "`kwon` ranks heads and FFN neurons of all layers in one contrib/cost order at the MACs of the per-part ratios "
             "(a part given 0 stays whole); "
             "`x2` prunes in two steps (the second on the refitted model); `sensitivity` is `--target-macs 0.6 --allocation "
             "sensitivity` and `search` the gated search `--max-drop 1` (both measured on --eval). "
             "Rows are sorted by MACs kept; bold: at most 60.5% MACs and the best top-1 there.", "",
             f"    {command}", "",
             f"Original: {base:.2%} test top-1.", "",
             "| family | command | MACs kept | params kept | test top-1 | vs target (84.82%) |",
             "|---|---|---:|---:|---:|---:|"]
    best = max((r["top1"] for r in rows if r["macs"] <= 0.605), default=None)
    for r in sorted(rows, key=lambda r: (-r["macs"], r["family"])):
        mark = "**" if best is not None and r["top1"] == best and r["macs"] <= 0.605 else ""
        lines.append(f"| {r['family']} | `{r['label']}` | {r['macs']:.1%} | {r['params']:.1%} | {mark}{r['top1']:.2%}{mark} | "
                     f"{100 * (r['top1'] - TARGET):+.2f} |")
    lines += ["", "Best per family at most 60.5% of the MACs (the target's budget) and at most 64%:", "",
              "| family | best top-1 at <= 60.5% MACs | MACs | vs target | best top-1 at <= 64% MACs | MACs |",
              "|---|---:|---:|---:|---:|---:|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        tops = [max((r for r in rows if r["family"] == family and r["macs"] <= cap), key=lambda r: r["top1"], default=None)
                for cap in (0.605, 0.64)]
        low, high = (("", "", "") if t is None else (f"{t['top1']:.2%}", f"{t['macs']:.1%}",
                                                      f"{100 * (t['top1'] - TARGET):+.2f}") for t in tops)
        lines.append(f"| {family} | {low[0]} | {low[1]} | {low[2]} | {high[0]} | {high[1]} |")
    lines += ["", FINDINGS]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        pts = sorted((100 * r["macs"], 100 * r["top1"]) for r in rows if r["family"] == family)
        front = [p for p in pts if not any(q[0] <= p[0] and q[1] > p[1] for q in pts)]  # best top-1 at <= MACs
        (line,) = ax.plot([p[0] for p in front], [p[1] for p in front], "-", linewidth=0.8, label=family)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", markersize=3.5, color=line.get_color())
    ax.axhline(100 * TARGET, color="red", linewidth=0.8, linestyle="--", label="target (original - 1 point)")
    ax.axhline(100 * base, color="black", linewidth=0.8, label="original")
    ax.axvline(60, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(76.0, 100 * base + 0.5)
    ax.set_title("Fashion-MNIST ViT, no fine-tuning (lines: best at <= MACs; l1 without refit is below 70%)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, out.with_suffix(".png"), dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxslim_bench/vit"))
    parser.add_argument("--out", type=Path, default=RESULTS / "transformers_vit")
    parser.add_argument("--only", nargs="*", default=None, help="families to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    calib, evaluation = search_split(args.work)
    xt, yt = load_split("test")
    base = accuracy(MODEL, xt, yt)
    store = args.out.with_suffix(".json")
    done: dict[str, dict[str, Any]] = {}
    if store.exists():
        done = {r["family"] + "|" + r["label"]: r for r in json.loads(store.read_text())["rows"]}
    for cfg in configs():
        key = cfg.family + "|" + cfg.label
        if key in done or (args.only and cfg.family not in args.only):
            continue
        row = run_one(cfg, calib, evaluation, args.work, xt, yt)
        print(f"{row['family']:14s} {row['label']:60s} macs {row['macs']:.3f} top1 {row['top1']:.4f} {row['seconds']}s",
              flush=True)
        done[key] = row
        write_json(store, {"original": base, "rows": list(done.values())})
        write(list(done.values()), base, args.out, "OMP_NUM_THREADS=1 python benchmarks/bench_vit.py")
    write(list(done.values()), base, args.out, "OMP_NUM_THREADS=1 python benchmarks/bench_vit.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
