"""What a plain run costs against loading and running the model (issue 24), measured in one script.

    python benchmarks/bench_plain_run.py                          # zoo VGG-16 (528 MB), l1 --ratio 0.5
    python benchmarks/bench_plain_run.py --model tv_resnet50 --pairs 5
    python benchmarks/bench_plain_run.py --package-root /tmp/rev-before --label before --package-root . --label after
    flock /tmp/heavy.lock python benchmarks/bench_plain_run.py    # on a shared machine: no other heavy job beside it

Rounds of fresh processes (the order reversed every other round, so none always runs on a warmer page cache),
the median of each; with several ``--package-root`` (say the revision before a change and after it) each is a
tool run of every round, beside the same baseline:

* ``baseline``: ``onnx.load`` + one onnxruntime ``InferenceSession`` (CPU, default options, built from the
  file) + one run on a seeded random input: the least any tool that reads and runs the model pays;
* ``tool``: ``onnx-prune MODEL --method l1 --ratio 0.5 -o OUT --report R`` with whatever the defaults run
  (data-free: a verdict on seeded random inputs, the speed gate with its latency measurement, the atomic
  write), the statistics cache off.

Also the import of the CLI alone (``python -c "import onnxslim_prune.cli"``), and from each tool run's report
its stage seconds (`progress.Stage`); the rest of the tool's wall time (interpreter start, imports, the report
and the write after the last stage) is the row "outside the stages". The zoo model is filled with seeded random
weights once (``../shared/zoo/fill.py --seed 0``) into --filled. Writes ``results/plain_run.{json,md}``.
Wall seconds on whatever else the machine runs: the ratio within one run is what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lib.measure import Measured, failure, run_measured
from lib.paths import ZOO

HERE = Path(__file__).resolve().parent

#: the baseline process: load, one session, one run (argv: model path)
BASELINE = (
    "import sys, numpy as np, onnx, onnxruntime as ort\n"
    "model = onnx.load(sys.argv[1])\n"
    "sess = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
    "feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape])"
    ".astype(np.float32) for i in sess.get_inputs()}\n"
    "sess.run(None, feed)\n"
)


def model_path(name: str, filled: Path) -> Path:
    if name.endswith(".onnx"):
        return Path(name).resolve()
    dst = filled / f"{name}.onnx"
    if not dst.exists():
        filled.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ZOO / "fill.py"), str(ZOO / f"{name}.onnx"), str(dst), "--seed", "0"], check=True)
    return dst


#: the package the tool runs from (--package-root; default this checkout)
PACKAGE_ROOT = [HERE.parent]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT[0]), "ONNXSLIM_PRUNE_CACHE": "off"}


def baseline(model: Path) -> Measured:
    run = run_measured([sys.executable, "-c", BASELINE, str(model)], timeout=1800, env=env())
    if run.returncode:
        raise SystemExit(f"baseline failed: {failure(run)}")
    return run


def tool(model: Path, args: list[str], work: Path) -> tuple[Measured, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="plain-", dir=work) as tmp:
        out, report = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
        # -P: `python -m` must not put the working directory (a checkout) before --package-root
        cmd = [sys.executable, "-P", "-m", "onnxslim_prune.cli", str(model), "-o", str(out), "--report", str(report), "-q",
               *args]
        run = run_measured(cmd, timeout=1800, env=env())
        if not report.exists():
            raise SystemExit(f"tool failed ({run.returncode}): {failure(run)}")
        return run, json.loads(report.read_text())


def imports() -> float:
    return run_measured([sys.executable, "-P", "-c", "import onnxslim_prune.cli"], timeout=300, env=env()).seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tv_vgg16", help="zoo name or .onnx path [tv_vgg16]")
    ap.add_argument("--args", default="--method l1 --ratio 0.5", help="the tool's arguments, one string")
    ap.add_argument("--pairs", type=int, default=3, help="rounds (each: the baseline and every tool run) [3]")
    ap.add_argument("--filled", type=Path, default=Path("/tmp/zoo"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--package-root", type=Path, action="append", default=[],
                    help="a folder holding the onnxslim_prune package to time (e.g. `git archive REV onnxslim_prune` "
                         "unpacked); repeatable: each is a tool run of every round, beside the same baseline "
                         "[this checkout]")
    ap.add_argument("--label", action="append", default=[],
                    help="a word per --package-root for the results (e.g. the commit)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plain_run")
    ap.add_argument("--with", dest="others", type=Path, action="append", default=[],
                    help="a JSON this script wrote (e.g. of the revision before a change): its sections follow this "
                         "run's in the results (repeatable)")
    a = ap.parse_args()
    roots = [r.resolve() for r in a.package_root] or [HERE.parent]
    labels = a.label + [""] * (len(roots) - len(a.label))
    model = model_path(a.model, a.filled)
    args = a.args.split()
    base: list[Measured] = []
    runs: list[list[tuple[Measured, dict[str, Any]]]] = [[] for _ in roots]
    for pair in range(a.pairs):
        # a round: the baseline and a tool run per package root, the order reversed every other round
        order = ["baseline", *range(len(roots))]
        for which in order if pair % 2 == 0 else order[::-1]:
            if which == "baseline":
                base.append(baseline(model))
                seconds = base[-1].seconds
            else:
                PACKAGE_ROOT[0] = roots[int(which)]
                runs[int(which)].append(tool(model, args, a.work))
                seconds = runs[int(which)][-1][0].seconds
            print(f"round {pair + 1} {which}: {seconds:.2f} s", file=sys.stderr, flush=True)
    results = []
    for root, label, root_runs in zip(roots, labels, runs):
        PACKAGE_ROOT[0] = root
        results.append(summarise(model, a, label, base, root_runs, [imports() for _ in range(a.pairs)]))
    for other in a.others:
        results.extend(json.loads(other.read_text())["results"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=1) + "\n")
    text = "\n".join([summary(results), *(markdown(r) for r in results)])
    a.out.with_suffix(".md").write_text(text)
    print(text)


def summarise(model: Path, a: argparse.Namespace, label: str, base: list[Measured],
              runs: list[tuple[Measured, dict[str, Any]]], import_seconds: list[float]) -> dict[str, Any]:
    med = statistics.median
    stages: dict[str, float] = {}
    for name in dict.fromkeys(k for _, r in runs for k in r.get("stage_seconds", {})):
        stages[name] = med(r.get("stage_seconds", {}).get(name, 0.0) for _, r in runs)
    outside = med(run.seconds - r["seconds"] for run, r in runs)
    report = runs[-1][1]
    verdict = report.get("verdict") or {}
    latency = report.get("latency") or {}
    return {
        "model": model.name, "model_bytes": model.stat().st_size, "args": a.args, "label": label,
        "cores": os.cpu_count(), "pairs": a.pairs,
        "baseline_seconds": [r.seconds for r in base], "tool_seconds": [r.seconds for r, _ in runs],
        "baseline_median": med(r.seconds for r in base), "tool_median": med(r.seconds for r, _ in runs),
        "ratio": med(r.seconds for r, _ in runs) / med(r.seconds for r in base),
        "baseline_peak_mib": med(r.peak_mib for r in base), "tool_peak_mib": med(r.peak_mib for r, _ in runs),
        "tool_exit_codes": [r.returncode for r, _ in runs],
        "import_seconds": med(import_seconds),
        "stage_seconds": stages, "in_process_seconds": med(r["seconds"] for _, r in runs),
        "outside_stages_seconds": outside,
        "verdict_source": verdict.get("source"), "verdict_samples": verdict.get("samples"),
        "gates": [g.get("gate") for g in verdict.get("gates", [])],
        "latency_rounds": latency.get("rounds"), "latency_threads": latency.get("threads"),
    }


def summary(results: list[dict[str, Any]]) -> str:
    """One line per result: the tool against the baseline of its own rounds."""
    lines = ["# A plain run against loading and running the model", "",
             "| model | tool arguments | package | baseline s | tool s | tool / baseline |", "|---|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | `{r['args']}` | {r['label'] or '-'} | {r['baseline_median']:.2f} | "
                     f"{r['tool_median']:.2f} | **{r['ratio']:.2f}x** |")
    names = list(dict.fromkeys(n for r in results for n in r["stage_seconds"]))
    lines += ["", "Where each tool run's time goes (seconds, medians; the stages are the report's `stage_seconds`):", "",
              "| stage | " + " | ".join(r["label"] or "-" for r in results) + " |",
              "|---|" + "---:|" * len(results)]
    rows = [(n, [r["stage_seconds"].get(n) for r in results]) for n in names]
    rows += [("outside the stages (interpreter, imports, report, write)", [r["outside_stages_seconds"] for r in results]),
             ("(of which importing the CLI alone)", [r["import_seconds"] for r in results]),
             ("the baseline process, whole", [r["baseline_median"] for r in results]),
             ("the tool process, whole", [r["tool_median"] for r in results])]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def markdown(r: dict[str, Any]) -> str:
    label = f" ({r['label']})" if r["label"] else ""
    timed = (f"the latency measurement ({r['latency_rounds']} interleaved rounds, {r['latency_threads']} thread)"
             if r["latency_rounds"] else "no latency measurement")
    lines = [
        f"## {r['model']} ({r['model_bytes'] / 1e6:.0f} MB){label}: {r['ratio']:.2f}x",
        "",
        f"Generated by `benchmarks/bench_plain_run.py`{label}: "
        f"{r['pairs']} rounds of fresh processes (order reversed every other round) on {r['cores']} cores, medians. "
        "Baseline: `onnx.load` + one onnxruntime session (from the file) + one run on a random input. "
        f"Tool: `onnx-prune MODEL {r['args']} -o OUT --report R` with its defaults: the verdict on "
        f"{r['verdict_samples']} seeded random inputs ({r['verdict_source']}), gates {', '.join(r['gates']) or 'none'}, "
        f"{timed}, the atomic write.",
        "",
        "| process | seconds (median) | each | peak MiB |",
        "|---|---:|---|---:|",
        f"| baseline | {r['baseline_median']:.2f} | {', '.join(f'{s:.2f}' for s in r['baseline_seconds'])} | "
        f"{r['baseline_peak_mib']:.0f} |",
        f"| tool | {r['tool_median']:.2f} | {', '.join(f'{s:.2f}' for s in r['tool_seconds'])} | {r['tool_peak_mib']:.0f} |",
        "",
        f"**The tool takes {r['ratio']:.2f}x the baseline.**",
        "",
        "Where the tool's time goes (medians over its runs; the stages are the report's `stage_seconds`):",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    for name, seconds in r["stage_seconds"].items():
        lines.append(f"| {name} | {seconds:.2f} |")
    lines += [
        f"| outside the stages (interpreter, imports, report, write) | {r['outside_stages_seconds']:.2f} |",
        f"| (of which importing the CLI alone) | {r['import_seconds']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
