"""The calibration engine's cost: a calibrated method as a ratio to one plain onnxruntime pass, in one run.

    python benchmarks/bench_engine.py                     # ResNet-56 ldrf 0.5 on 2,000 images, frontier schedule
    python benchmarks/bench_engine.py --prefix            # also the prefix schedule (every level from the input)
    python benchmarks/bench_engine.py --zoo tv_resnet50 --method thinet --samples 256   # 224x224, seeded random inputs

In one process: a plain onnxruntime pass over the same calibration samples (batch 32), then
`prune(..., method, ratio, calib, holdout=0)` with the statistics cache off, for each
schedule. Reported: process CPU seconds and wall seconds of each, as ratios to the plain pass
(CPU time is the steadier figure on a shared machine), the stage times, the largest difference
between the schedules' refitted weights, and the test accuracy of the result on the 10,000-image
test split. Peak memory of the CLI in a fresh process is measured separately
(`measure.run_measured`). Results go to benchmarks/results/engine.{md,json}. With ``--zoo NAME``
the model is a zoo architecture (``../shared/zoo``) filled with seeded random weights
(``fill.py --seed 0``) and fed seeded normal inputs at its own input shape: a timing of the
engine on a full-size model, no accuracy (results/engine_NAME.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lib.data import write_calibration, zoo_model
from lib.measure import run_measured
from lib.paths import RESULTS, SHARED_MODELS, WORK
from lib.results import write_results
from lib.runtime import accuracy, session

MODELS = SHARED_MODELS


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist_resnet56")
    parser.add_argument("--method", default="ldrf")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--prefix", action="store_true", help="also run the prefix schedule (slow)")
    parser.add_argument("--zoo", help="a zoo architecture instead of a Fashion-MNIST model (random weights and inputs)")
    args = parser.parse_args()

    from lib.internals import reconstruct
    from onnxslim_prune import prune

    work = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    os.environ["ONNXSLIM_PRUNE_CACHE"] = "off"
    if args.zoo:
        path = zoo_model(args.zoo, filled=WORK / "zoo")  # seeded random weights, filled once
        model = onnx.load(str(path), load_external_data=False)
        first = model.graph.input[0]
        name = first.name
        shape = [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]
        batch = shape[0]
        data = np.random.default_rng(0).standard_normal((args.samples, *shape[1:])).astype(np.float32)
        calib = work / "calib.npz"
        np.savez(calib, **{name: data})
        test = None
        model = onnx.load(str(path))
    else:
        name, batch = "input", 32
        calib = write_calibration(work / "calib.npz", args.samples)
        test = write_calibration(work / "test.npz", 10000, "test")
        path = MODELS / f"{args.model}.onnx"
        model = onnx.load(str(path))
        data = np.load(calib)["input"]
    cpu, wall = _cpu(), time.perf_counter()
    sess = session(model)
    for start in range(0, len(data) - batch + 1, batch):
        sess.run(None, {name: data[start : start + batch]})
    plain = {"cpu": _cpu() - cpu, "wall": time.perf_counter() - wall}
    rows: dict[str, Any] = {"plain": plain}
    weights = {}
    test_data = None if test is None else np.load(test)
    for schedule in [reconstruct.Schedule.FRONTIER] + ([reconstruct.Schedule.PREFIX] if args.prefix else []):
        reconstruct.DEFAULT_SCHEDULE = schedule
        cpu, wall = _cpu(), time.perf_counter()
        result = prune(str(path), args.method, args.ratio, calib=calib, holdout=0.0, latency=False)
        spent = {"cpu": _cpu() - cpu, "wall": time.perf_counter() - wall}
        rows[schedule.value] = {
            **spent, "cpu_ratio": spent["cpu"] / plain["cpu"], "wall_ratio": spent["wall"] / plain["wall"],
            "stages": result.report.stage_seconds,
            "test_accuracy": None if test_data is None else accuracy(result.model, test_data["input"], test_data["labels"]),
        }
        weights[schedule.value] = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    if len(weights) == 2:
        a, b = weights.values()
        rows["max_weight_difference"] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a if a[k].size)
    out = work / "out.onnx"
    run = run_measured([sys.executable, "-m", "onnxslim_prune.cli", str(path), "-o", str(out), "--method", args.method,
                        "--ratio", str(args.ratio), "--calib", str(calib), "--holdout", "0", "--no-latency", "-q"],
                       timeout=3600, env={**os.environ, "ONNXSLIM_PRUNE_CACHE": "off"})
    rows["cli"] = {"seconds": run.seconds, "peak_mib": run.peak_mib, "returncode": run.returncode}
    rows["setting"] = vars(args)
    stem = f"engine_{args.zoo}" if args.zoo else "engine"
    what = (f"{args.zoo} (zoo, seeded random weights) `{args.method} --ratio {args.ratio}` on {args.samples} seeded random "
            f"inputs of shape {shape} (batch {batch})") if args.zoo else \
        f"{args.model} `{args.method} --ratio {args.ratio}` on {args.samples} Fashion-MNIST train images"
    lines = [
        f"{what} "
        f"(holdout 0, cache off), against one plain onnxruntime pass over the same samples in the same process "
        f"({plain['cpu']:.2f} s CPU, {plain['wall']:.2f} s wall).", "",
        "| schedule | CPU s | CPU / plain | wall s | wall / plain | statistics + selection s | refit s | test accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("frontier", "prefix"):
        if name in rows:
            r = rows[name]
            lines.append(f"| {name} | {r['cpu']:.1f} | {r['cpu_ratio']:.1f}x | {r['wall']:.1f} | {r['wall_ratio']:.1f}x | "
                         f"{r['stages'].get('method (scores, statistics, selection)', 0):.1f} | "
                         f"{r['stages'].get('reconstruction', 0):.1f} | "
                         f"{'–' if r['test_accuracy'] is None else format(r['test_accuracy'], '.2%')} |")
    if "max_weight_difference" in rows:
        lines.append(f"\nLargest difference between the two schedules' weights: {rows['max_weight_difference']:.2e}.")
    lines.append(f"\nThe CLI in a fresh process: {run.seconds:.1f} s, peak RSS {run.peak_mib:.0f} MiB.")
    write_results(RESULTS / stem, rows, "\n".join(lines), indent=2, sort_keys=True)
    print("\n".join(lines))  # noqa: T201 - a benchmark's report


if __name__ == "__main__":
    main()
