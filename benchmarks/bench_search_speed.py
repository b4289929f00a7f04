"""How long the gated search takes against one plain run, measured in one script (issue 24).

    python benchmarks/bench_search_speed.py                    # ResNet-56, ldrf, --max-drop 1
    python benchmarks/bench_search_speed.py --modes serial     # only some of the runs

Same data as `bench_search.py` (calibration TRAIN[:2000], --eval TRAIN[2000:4000]). Each run is one CLI
process with a statistics cache of its own (a fresh folder: nothing is read back from another run):

* ``plain``: ``--method ldrf --ratio 0.5`` (the yardstick);
* ``serial``: ``--max-drop 1 --workers 1`` (the search: sensitivity profile, bisection, plain lines);
* ``workers2``: the same with ``--workers 2``;
* ``ray``: the same with ``--ray local`` (a local Ray cluster started by the run; skipped without Ray);
* ``uniform``: after the timed runs, plain ``--ratio r`` runs at the ratios of the uniform candidates the search
  probed (and 0.3), for the written model's comparison at equal MACs on TEST.

For each: wall seconds, the ratio to ``plain``, the probes, the written model's MACs kept and its test
accuracy on the 10,000 TEST images the tool never sees, and the test accuracy of uniform ``--ratio``
runs at the written model's size for comparison. Writes ``results/search_speed.{md,json}``. Timings are wall
seconds on whatever else the machine runs: the ratios within one run are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

from lib.data import load_split, search_split  # noqa: E402

from onnxslim_prune import ir  # noqa: E402
from onnxslim_prune.judge import validate  # noqa: E402
from onnxslim_prune.judge.evaluation import accuracy  # noqa: E402

MODELS = HERE.parents[1] / "shared" / "models"
MODES = ("plain", "serial", "workers2", "ray")


def run_cli(model: Path, args: list[str], work: Path, name: str) -> tuple[float, dict[str, Any], Path, int]:
    out, report = work / f"{name}.onnx", work / f"{name}.json"
    with tempfile.TemporaryDirectory(prefix="cache-", dir=work) as cache:
        cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(model), "-o", str(out), "--report", str(report),
               "--cache-dir", cache, "--keep-failed", "-q", *args]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(HERE.parent)}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if not report.exists():
        raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, json.loads(report.read_text()), out, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist_resnet56")
    parser.add_argument("--method", default="ldrf")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxslim_bench/search_speed"))
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if args.rewrite:
        result = json.loads((args.results / "search_speed.json").read_text())
        (args.results / "search_speed.md").write_text(markdown(result))
        return
    calib, evaluation = search_split(args.work)
    xt, yt = load_split("test")
    model = MODELS / f"{args.model}.onnx"
    original = ir.load_model(model)
    shapes = {"input": (1, 1, 28, 28)}
    before = validate.model_stats(original, shapes)
    data = ["--calib", str(calib), "--eval", str(evaluation), "--method", args.method]
    commands = {"plain": ["--ratio", "0.5"], "serial": ["--max-drop", f"{args.max_drop:g}", "--workers", "1"],
                "workers2": ["--max-drop", f"{args.max_drop:g}", "--workers", "2"],
                "ray": ["--max-drop", f"{args.max_drop:g}", "--ray", "local"]}
    rows: list[dict[str, Any]] = []
    original_accuracy = accuracy(original, xt, yt, "input")
    plain_seconds = None
    uniform_ratios: list[float] = []
    for mode in args.modes:
        if mode == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray: not installed, skipped", file=sys.stderr)
                continue
        seconds, report, out, code = run_cli(model, data + commands[mode], args.work, mode)
        written = ir.load_model(out)
        stats = validate.model_stats(written, shapes)
        search = report.get("extra", {}).get("search", {})
        probes = search.get("probes", [])
        row = {"mode": mode, "command": " ".join(commands[mode]), "seconds": round(seconds, 1), "exit_code": code,
               "probes": len(probes), "sensitivity_probes": len(report.get("extra", {}).get("sensitivity", {}).get("rows", [])),
               "macs_kept": stats.macs / before.macs, "test_accuracy": accuracy(written, xt, yt, "input"),
               "request": report.get("request", ""), "chosen": search.get("chosen"),
               "chosen_budget": next((p["budget"] for p in probes if p["index"] == search.get("chosen")), None)}
        if mode == "plain":
            plain_seconds = seconds
        row["x_plain"] = None if plain_seconds is None else round(seconds / plain_seconds, 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        write(args, original_accuracy, rows)  # after every run: a long one interrupted leaves the others
        if mode == "serial":
            uniform_ratios = sorted({p["ratio"] for p in probes if p.get("ratio") is not None} | {0.3})

    # the plain uniform runs the search compared with (after the timed runs), judged on TEST like it
    for ratio in uniform_ratios:
        seconds, report, out, code = run_cli(model, data + ["--ratio", f"{ratio:g}"], args.work, f"uniform{ratio:g}")
        written = ir.load_model(out)
        rows.append({"mode": "uniform", "command": f"--ratio {ratio:g}", "seconds": round(seconds, 1),
                     "exit_code": code, "probes": 0, "sensitivity_probes": 0,
                     "macs_kept": validate.model_stats(written, shapes).macs / before.macs,
                     "test_accuracy": accuracy(written, xt, yt, "input"), "request": report.get("request", ""),
                     "chosen": None, "chosen_budget": None, "x_plain": None})
        write(args, original_accuracy, rows)


def write(args: argparse.Namespace, original_accuracy: float, rows: list[dict[str, Any]]) -> None:
    result = {"model": args.model, "method": args.method, "max_drop": args.max_drop, "cores": os.cpu_count(),
              "original_test_accuracy": original_accuracy, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "search_speed.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (args.results / "search_speed.md").write_text(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Search speed: {result['model']}, {result['method']} --max-drop {result['max_drop']:g}", "",
             f"One script, {result['cores']} cores, each run a CLI process with a fresh statistics cache; original test "
             f"accuracy {100 * result['original_test_accuracy']:.2f}% (10,000 TEST images no run saw).", "",
             "| run | command | seconds | x plain | probes (profile) | MACs kept | test accuracy | written |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        x = "-" if r["x_plain"] is None else f"{r['x_plain']:.1f}x"
        lines.append(f"| {r['mode']} | `{r['command']}` | {r['seconds']:.1f} | {x} | {r['probes']} ({r['sensitivity_probes']}) "
                     f"| {100 * r['macs_kept']:.1f}% | {100 * r['test_accuracy']:.2f}% | {r['chosen_budget'] or '-'} |")
    lines += ["", *again(result["rows"]), *dominance(result["rows"])]
    before = result.get("before")
    if before:
        lines.append(f"- Before (commit {before['commit']}, {before['allocation']} allocation, its own run): serial "
                     f"{before['seconds']:.1f} s against plain {before['plain_seconds']:.1f} s = {before['x_plain']:.1f}x, "
                     f"{before['probes']} probes + {before['sensitivity_probes']} for the profile, written "
                     f"{100 * before['macs_kept']:.1f}% of the MACs at {100 * before['test_accuracy']:.2f}%.")
    return "\n".join(lines) + "\n"


def again(rows: list[dict[str, Any]]) -> list[str]:
    """The plain command run once more after the searches (a uniform row): the machine's load moves the yardstick."""
    plain = next((r for r in rows if r["mode"] == "plain"), None)
    repeat = next((r for r in rows if plain and r["mode"] == "uniform" and r["command"] == plain["command"]), None)
    if plain is None or repeat is None:
        return []
    fastest = min(plain["seconds"], repeat["seconds"])
    searched = [r for r in rows if r["mode"] not in ("plain", "uniform")]
    return [f"- The plain command `{plain['command']}` once more after the searches: {repeat['seconds']:.1f} s (first "
            f"{plain['seconds']:.1f} s; other jobs on the machine load it unevenly). Against the faster of the two: "
            + ", ".join(f"{r['mode']} {r['seconds'] / fastest:.1f}x" for r in searched) + "."]


def dominance(rows: list[dict[str, Any]]) -> list[str]:
    """Per searched model: the plain uniform runs with no more MACs, and whether one is at least as accurate on TEST."""
    uniform = [r for r in rows if r["mode"] in ("uniform", "plain")]
    out = []
    for r in rows:
        if r["mode"] in ("uniform", "plain"):
            continue
        smaller = list({u["command"]: u for u in uniform if u["macs_kept"] <= r["macs_kept"] + 1e-9}.values())
        over = [u for u in smaller if u["test_accuracy"] >= r["test_accuracy"]]
        listed = ", ".join(f"`{u['command']}` {100 * u['macs_kept']:.1f}% / {100 * u['test_accuracy']:.2f}%" for u in smaller)
        out.append(f"- {r['mode']}: written {100 * r['macs_kept']:.1f}% of the MACs at {100 * r['test_accuracy']:.2f}%; "
                   f"plain uniform ldrf runs with no more MACs: {listed or 'none'}; "
                   + (f"**dominated** by {len(over)} of them." if over else "dominated by none."))
    return out


if __name__ == "__main__":
    main()
