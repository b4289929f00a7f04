"""The gated search on the Fashion-MNIST models: test accuracy and MACs kept, uniform ratio vs searched.

    python benchmarks/bench_search.py --models fmnist_resnet56 --method ldrf --max-drop 1

Data (the issue's protocol): calibration = TRAIN[:2000] (all fitted: --eval is given), --eval =
TRAIN[2000:4000] (the search measures its probes on one half of it, the written model's
verdict on the other half), and the figures reported here on the 10,000-image TEST split,
which the tool never sees. Per model:

* ``uniform``: ``--ratio r`` for each ratio (the same calibration and --eval data);
* ``searched``: one CLI run ``--max-drop P`` (no --ratio): the written model's MACs kept and test
  accuracy, the probes and the sensitivity profile from its report;
* ``allocation``: models at several prefixes of the same greedy order (the profile in that report;
  `planning.search.greedy_steps`), to draw the searched allocation as a curve next to the uniform one.

Writes ``results/search.json``, ``results/search.md`` and ``results/search_<model>.png``. Timings
are wall seconds on whatever else the machine runs (the ratios in one run are what count).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

from lib.data import load_split, search_split  # noqa: E402

from onnxslim_prune import api, ir  # noqa: E402
from onnxslim_prune.judge.evaluation import accuracy  # noqa: E402
from onnxslim_prune.planning.search import Objective, SensitivityRow, allocation_at, greedy_steps  # noqa: E402

MODELS = HERE.parents[1] / "shared" / "models"
log = logging.getLogger("bench_search")


def data(work: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    calib, evaluation = search_split(work)
    xt, yt = load_split("test")
    return calib, evaluation, xt, yt


def test_accuracy(model: Any, xt: np.ndarray, yt: np.ndarray) -> float:
    return accuracy(model, xt, yt, "input")


def row_of(kind: str, label: str, model: Any, before: Any, xt: np.ndarray, yt: np.ndarray, seconds: float,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    stats = __import__("onnxslim_prune.judge.validate", fromlist=["model_stats"]).model_stats(model, {"input": (1, 1, 28, 28)})
    return {"kind": kind, "label": label, "macs_kept": stats.macs / before.macs, "params_kept": stats.params / before.params,
            "test_accuracy": test_accuracy(model, xt, yt), "seconds": round(seconds, 1), **(extra or {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fmnist_resnet56"])
    parser.add_argument("--method", default="ldrf")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--curve-points", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["searched", "uniform", "allocation"],
                        choices=["searched", "uniform", "allocation", "ranking", "margin"],
                        help="ranking: --target-macs (the global ranking) at the MACs of the allocation rows already in "
                             "search.json (run after the others)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="margin part: rerun the search with this --search-margin on the profile already measured")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxslim_bench/search"))
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    calib, evaluation, xt, yt = data(args.work)
    out_json = args.results / "search.json"
    state: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    for name in args.models:
        path = MODELS / f"{name}.onnx"
        if args.parts in (["ranking"], ["margin"]):
            if args.parts == ["ranking"]:
                ranking_rows(name, path, state[name], calib, evaluation, xt, yt, args.method)
            else:
                margin_row(name, path, state[name], calib, evaluation, xt, yt, args.margin)
            out_json.write_text(json.dumps(state, indent=1, sort_keys=True))
            plot(name, state[name], args.results / f"search_{name}.png")
            continue
        original = ir.load_model(path)
        before = __import__("onnxslim_prune.judge.validate", fromlist=["model_stats"]).model_stats(original, {"input": (1, 1, 28, 28)})
        rows: list[dict[str, Any]] = [{"kind": "original", "label": "original", "macs_kept": 1.0, "params_kept": 1.0,
                                       "test_accuracy": test_accuracy(original, xt, yt), "seconds": 0.0}]
        log.info("%s: original %.2f%%", name, 100 * rows[0]["test_accuracy"])
        # the searched model: the CLI, as a user runs it
        target, report_path = args.work / f"{name}.searched.onnx", args.work / f"{name}.searched.json"
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(path), "--method", args.method, "--calib", str(calib),
               "--eval", str(evaluation), "--max-drop", f"{args.max_drop:g}", "-o", str(target), "--report", str(report_path),
               "--keep-failed", "-q"]
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(HERE.parent)}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        report = json.loads(report_path.read_text())
        verdict = report["verdict"]
        search = report["extra"]["search"]
        rows.append(row_of("searched", f"--max-drop {args.max_drop:g}", ir.load_model(target), before, xt, yt, seconds, {
            "exit_code": proc.returncode, "probes": len(search["probes"]),
            "sensitivity_probes": len(report["extra"].get("sensitivity", {}).get("rows", [])),
            "final_half_drop": verdict["accuracy_drop_points"], "final_half_samples": verdict["samples"],
            "final_half_drop_ci95": verdict["accuracy_drop_ci95"], "request": report["request"]}))
        log.info("%s searched: %s", name, rows[-1])
        # the uniform ratio, same data
        for ratio in args.ratios:
            started = time.perf_counter()
            result = api.prune(path, args.method, ratio, calib=calib, eval_data=evaluation, latency=False)
            rows.append(row_of("uniform", f"ratio {ratio:g}", result.model, before, xt, yt, time.perf_counter() - started,
                               {"eval_drop": result.report.verdict.accuracy_drop_points if result.report.verdict else None}))
            log.info("%s uniform %g: %s", name, ratio, rows[-1])
        # the searched allocation as a curve: prefixes of the greedy order of the same profile
        profile = profile_of({"sensitivity": report["extra"].get("sensitivity")})
        steps = greedy_steps(profile, Objective.MACS)
        # a search without a profile (damage lines) has no greedy order to draw
        curve = np.unique(np.linspace(len(steps) // 4, len(steps), args.curve_points).astype(int)).tolist() \
            if steps and "allocation" in args.parts else []
        for k in curve:
            started = time.perf_counter()
            result = api.prune(path, args.method, calib=calib, eval_data=evaluation, latency=False,
                               params={"group_ratios": allocation_at(steps, k)})
            rows.append(row_of("allocation", f"steps {k}/{len(steps)}", result.model, before, xt, yt,
                               time.perf_counter() - started))
            log.info("%s allocation %d: %s", name, k, rows[-1])
        state[name] = {"method": args.method, "max_drop": args.max_drop, "rows": rows, "probes": search["probes"],
                       "sensitivity": report["extra"].get("sensitivity")}
        out_json.write_text(json.dumps(state, indent=1, sort_keys=True))
        plot(name, state[name], args.results / f"search_{name}.png")
    (args.results / "search.md").write_text(markdown(state))


def profile_of(entry: dict[str, Any]) -> list[SensitivityRow]:
    return [SensitivityRow(r["group"], r["node"], r["size"], r["ratio"], r["removed"], r["macs_saved"], r["params_saved"],
                           r["damage"] if r["damage"] is not None else float("inf"), r["top1_agreement"],
                           r["accuracy_drop"], r["correlation"], r["failed"])
            for r in (entry.get("sensitivity") or {}).get("rows", [])]


def margin_row(name: str, path: Path, entry: dict[str, Any], calib: Path, evaluation: Path, xt: np.ndarray,
               yt: np.ndarray, margin: float) -> None:
    """The same search (same profile, the API's `search` with the rows given) at another --search-margin."""
    from onnxslim_prune.planning.search import Prober, SearchSettings, baseline, search
    from onnxslim_prune.settings import RunSettings
    from onnxslim_prune.judge.verdict import Gates

    original = ir.load_model(path)
    before = __import__("onnxslim_prune.judge.validate", fromlist=["model_stats"]).model_stats(original, {"input": (1, 1, 28, 28)})
    gates = Gates(max_drop=entry["max_drop"])
    prober = Prober(original, RunSettings(entry["method"], calib=str(calib), eval_data=str(evaluation), gates=gates,
                                          latency=False), margin=margin)
    started = time.perf_counter()
    outcome = search(prober, baseline(prober), SearchSettings(margin=margin), 1, gates, tuple(profile_of(entry)))
    verdict = outcome.result.report.verdict
    label = f"--max-drop {entry['max_drop']:g} --search-margin {margin:g}"
    entry["rows"] = [r for r in entry["rows"] if r["label"] != label]
    entry["rows"].append(row_of("searched", label, outcome.result.model, before, xt, yt, time.perf_counter() - started, {
        "exit_code": 0 if verdict.passed else 3, "probes": len(outcome.probes), "sensitivity_probes": 0,
        "final_half_drop": verdict.accuracy_drop_points, "final_half_samples": verdict.samples,
        "final_half_drop_ci95": list(verdict.accuracy_drop_interval or ()), "request": outcome.result.report.request}))
    entry.setdefault("probes_by_margin", {})[f"{margin:g}"] = [p.to_dict() for p in outcome.probes]
    log.info("%s margin %g: %s", name, margin, entry["rows"][-1])


def ranking_rows(name: str, path: Path, entry: dict[str, Any], calib: Path, evaluation: Path, xt: np.ndarray,
                 yt: np.ndarray, method: str) -> None:
    """The global normalised ranking (--target-macs) at the MACs the searched allocation kept."""
    original = ir.load_model(path)
    before = __import__("onnxslim_prune.judge.validate", fromlist=["model_stats"]).model_stats(original, {"input": (1, 1, 28, 28)})
    entry["rows"] = [r for r in entry["rows"] if r["kind"] != "ranking"]
    targets = sorted({round(r["macs_kept"], 3) for r in entry["rows"] if r["kind"] in ("allocation", "searched")})
    for target in targets:
        started = time.perf_counter()
        result = api.prune(path, method, calib=calib, eval_data=evaluation, latency=False, params={"target_macs": target})
        entry["rows"].append(row_of("ranking", f"--target-macs {target:g}", result.model, before, xt, yt,
                                    time.perf_counter() - started))
        log.info("%s ranking %g: %s", name, target, entry["rows"][-1])


def plot(name: str, entry: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = entry["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = next(r for r in rows if r["kind"] == "original")["test_accuracy"]
    for kind, style, label in (("uniform", "o-", f"uniform ratio ({entry['method']})"),
                               ("allocation", "s-", f"searched allocation ({entry['method']}, greedy prefixes)"),
                               ("ranking", "^--", f"global ranking --target-macs ({entry['method']})")):
        pts = sorted((r["macs_kept"], r["test_accuracy"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=label, markersize=4)
    for r, colour in zip([r for r in rows if r["kind"] == "searched"], ("black", "tab:purple", "tab:brown")):
        ax.scatter([r["macs_kept"]], [100 * r["test_accuracy"]], marker="*", s=160, c=colour, zorder=5,
                   label=f"written by the search ({r['label']})")
    ax.axhline(100 * base, color="grey", linewidth=0.8, linestyle=":", label="original")
    ax.axhline(100 * base - entry["max_drop"], color="red", linewidth=0.8, linestyle="--", label=f"original - {entry['max_drop']:g} points")
    ax.set_xlabel("fraction of MACs kept")
    ax.set_ylabel("test accuracy, % (10,000 test images, never seen)")
    ax.set_title(name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(state: dict[str, Any]) -> str:
    lines = ["# Gated search on Fashion-MNIST", "",
             "Calibration TRAIN[:2000] (all fitted), `--eval` TRAIN[2000:4000] (probes on one half, the verdict on the "
             "other), accuracy on the 10,000-image TEST split (never seen by the tool). Generated by "
             "`benchmarks/bench_search.py`; wall seconds on a machine shared with other jobs.", ""]
    for name, entry in state.items():
        lines += [f"## {name} (`--method {entry['method']}`)", "",
                  "| run | MACs kept | params kept | test accuracy | drop, points | s | notes |", "|---|---:|---:|---:|---:|---:|---|"]
        base = next(r for r in entry["rows"] if r["kind"] == "original")["test_accuracy"]
        for r in entry["rows"]:
            note = ""
            if r["kind"] == "searched":
                note = (f"exit {r['exit_code']}; {r['sensitivity_probes']} sensitivity + {r['probes']} search probes; final-half "
                        f"drop {r['final_half_drop']:+.2f} on {r['final_half_samples']}")
            lines.append(f"| {r['kind']} {r['label']} | {r['macs_kept']:.1%} | {r['params_kept']:.1%} | "
                         f"{100 * r['test_accuracy']:.2f}% | {100 * (base - r['test_accuracy']):+.2f} | {r['seconds']:.0f} | {note} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
