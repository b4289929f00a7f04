"""Speed and memory of the tool itself: calibration-based methods on 2,000 samples, and large zoo models.

    python benchmarks/bench_tool.py                                  # both tables
    python benchmarks/bench_tool.py --models fmnist_lenet300 --methods l1,thinet --large ""
    python benchmarks/bench_tool.py --methods "" --large tv_vgg16    # the large-model table only

Calibration table: each cell is one `onnx-prune` command line in a fresh process (load,
calibration statistics, selection, sequential least-squares refit, validation, write), on the
first 2,000 Fashion-MNIST TRAIN images (`--calib`, `--calib-samples 2000`); wall time and the
process's own peak RSS are measured (`measure.run_measured`); the statistics cache is off, so
every cell computes its own. `l1` without calibration is the reference row. The time and memory
of `l1` on each zoo model are in `zoo_coverage.md`.

Large-model table (`--large`, zoo models filled with seeded random weights): `onnx-prune MODEL
--ratio 0.5` (l1) with and without `--no-latency`, each timed against a baseline measured in the
same run, alternating with it: a fresh process that imports onnx and onnxruntime, `onnx.load`s
the model, builds one onnxruntime session and runs it once (`BASELINE`). The time ratio is the
tool's wall time over the baseline's (both fresh processes, interpreter start included); the
peak ratio is the tool's peak RSS over the bytes of the model's weights (the baseline's own
ratio is given beside it: loading a model and building a session already hold it about three
times). Medians of `--repeat` alternations. Results go to benchmarks/results/tool.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Any

from lib.data import write_calibration, zoo_model
from lib.measure import Measured, failure, prune_cli, run_measured
from lib.paths import RESULTS, SHARED_MODELS, WORK, ZOO
from lib.results import write_results

log = logging.getLogger("bench_tool")
MODELS = ("fmnist_lenet300", "fmnist_resnet56", "fmnist_vgg_slim_bn")
METHODS = ("l1", "l1+reconstruct", "thinet", "ldrf")
LARGE = ("tv_vgg16", "tv_wide_resnet50_2", "tv_alexnet", "tv_resnet50")
#: the baseline: what any user of the model does at least (load it, one session, one run), in a fresh process
BASELINE = """
import sys
import numpy as np
import onnx
import onnxruntime as ort

path = sys.argv[1]
model = onnx.load(path)
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
feeds = {}
for vi in sess.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in vi.shape]
    dtype = types.get(vi.type, np.float32)
    feeds[vi.name] = rng.standard_normal(shape).astype(dtype) if dtype in (np.float32, np.float64) else np.zeros(shape, dtype)
sess.run(None, feeds)
"""
TARGET_TIME, TARGET_PEAK = 2.0, 2.0


def cell(model: Path, label: str, ratio: float, calib: Path, samples: int, timeout: int) -> dict[str, Any]:
    method = "l1" if label == "l1+reconstruct" else label
    args = ["--method", method, "--ratio", str(ratio), "--batch-size", "256"]
    if label != "l1":
        args += ["--calib", str(calib), "--calib-samples", str(samples)]
    run, data = prune_cli(model, args, timeout, env={**os.environ, "ONNXSLIM_PRUNE_CACHE": "off"})
    row: dict[str, Any] = {"model": model.stem, "method": label, "ratio": ratio, "samples": samples if label != "l1" else 0,
                           "seconds": run.seconds, "peak_mib": run.peak_mib}
    if data is None:
        row["error"] = failure(run)
        return row
    row["macs_kept"] = data["after"]["macs"] / data["before"]["macs"]
    return row


def filled(name: str, folder: Path) -> Path:
    """The zoo model with seeded random weights (`fill.py --seed 0`), made once."""
    return zoo_model(name, ZOO, folder)


def weight_bytes(model: Path) -> int:
    """Bytes of the model's weights (every tensor's values, counted from the headers).

    Counted in a child process: a child's peak RSS starts at its parent's RSS when it was forked
    (Linux keeps the high-water mark across exec), so this process must never hold a model.
    """
    code = ("import sys, math, onnx; m = onnx.load(sys.argv[1], load_external_data=False); "
            "ts = [*m.graph.initializer, *(a.t for n in m.graph.node for a in n.attribute if a.name == 'value')]; "
            "print(sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in ts))")
    return int(subprocess.run([sys.executable, "-c", code, str(model)], check=True, capture_output=True, text=True).stdout)


def large_cell(model: Path, ratio: float, latency: bool, repeat: int, timeout: int) -> dict[str, Any]:
    """The tool against the baseline on one model, alternating `repeat` times; medians."""
    args = ["--method", "l1", "--ratio", str(ratio)] + ([] if latency else ["--no-latency"])
    weights = weight_bytes(model)
    base: list[Measured] = []
    tool: list[Measured] = []
    data = None
    for _ in range(repeat):
        base.append(run_measured([sys.executable, "-c", BASELINE, str(model)], timeout=timeout))
        run, data = prune_cli(model, args, timeout)
        tool.append(run)
        if data is None:
            break
    row: dict[str, Any] = {"model": model.stem, "weights_mib": weights / 2**20, "args": " ".join(args), "runs": len(tool)}
    if data is None or any(b.returncode for b in base):
        row["error"] = failure(tool[-1]) if data is None else failure(next(b for b in base if b.returncode))
        return row
    base_s, tool_s = median(b.seconds for b in base), median(t.seconds for t in tool)
    base_peak, tool_peak = median(b.peak_mib for b in base), median(t.peak_mib for t in tool)
    row.update(
        baseline_seconds=base_s, baseline_peak_mib=base_peak, seconds=tool_s, peak_mib=tool_peak,
        time_ratio=tool_s / base_s, peak_ratio=tool_peak / row["weights_mib"],
        baseline_peak_ratio=base_peak / row["weights_mib"],
        stage_seconds=data.get("stage_seconds", {}), macs_kept=data["after"]["macs"] / data["before"]["macs"],
    )
    return row


def _calibration_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "# Speed and memory of the tool with calibration-based methods",
        "",
        "One `onnx-prune` command line per cell, in a fresh process: load, calibration statistics, selection, "
        "sequential least-squares refit of every consumer of a pruned group, validation, write. Calibration: the "
        "first 2,000 Fashion-MNIST train images, batch 256. Peak MiB is the process's own peak RSS. "
        "2-core machine, nothing else running. Generated by `benchmarks/bench_tool.py`.",
        "",
        "| model | method | ratio | calibration samples | MACs kept | s | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['ratio']} | {r['samples']} | error: {r['error']} | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio']} | {r['samples']:,} | {r['macs_kept']:.1%} | "
                     f"{r['seconds']:.1f} | {r['peak_mib']:.0f} |")
    return lines


def _large_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Large models: the tool against loading and running the model once",
        "",
        "`onnx-prune MODEL --ratio 0.5` (l1, data-free: the verdict runs 16 seeded random samples through both "
        "models) on zoo models with seeded random weights, with and without latency. Baseline, measured in the "
        "same run and alternating with the tool: a fresh process that loads the model with `onnx.load`, builds "
        "one onnxruntime session and runs it once. Both times include the interpreter's start and imports; peak "
        "MiB is each process's own peak RSS; weights are the bytes of every tensor's values. Targets: time "
        f"ratio at most {TARGET_TIME:g}, peak ratio at most {TARGET_PEAK:g}. Generated by `benchmarks/bench_tool.py` "
        "(a shared 2-core machine: absolute seconds move with other load, ratios less).",
        "",
        "| model | weights MiB | arguments | baseline s | tool s | time ratio | baseline peak MiB | tool peak MiB | "
        "peak / weights | baseline peak / weights | slowest stages |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['weights_mib']:.0f} | `{r['args']}` | error: {r['error']} | | | | | | | |")
            continue
        stages = sorted(r["stage_seconds"].items(), key=lambda kv: -kv[1])[:3]
        slow = ", ".join(f"{name} {sec:.1f}" for name, sec in stages)
        lines.append(
            f"| {r['model']} | {r['weights_mib']:.0f} | `{r['args']}` | {r['baseline_seconds']:.1f} | {r['seconds']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['baseline_peak_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_ratio']:.2f} | "
            f"{r['baseline_peak_ratio']:.2f} | {slow} |"
        )
    return lines


def markdown(rows: list[dict[str, Any]], large: list[dict[str, Any]] | None = None) -> str:
    lines = _calibration_table(rows) if rows else []
    if large:
        lines += ([""] if lines else []) + _large_table(large)
    return "\n".join(lines) + "\n"


def _previous(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The tables of an earlier run (a table not rerun is kept); the old file was the calibration rows alone."""
    if not path.exists():
        return {"calibration": [], "large": []}
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {"calibration": data, "large": []}
    return {"calibration": data.get("calibration", []), "large": data.get("large", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=SHARED_MODELS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="calibration table methods ('' skips the table)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--calib", type=Path, default=Path("/tmp/onnxslim_bench/fmnist_train2000.npz"))
    parser.add_argument("--large", default=",".join(LARGE), help="zoo models of the large-model table ('' skips it)")
    parser.add_argument("--filled", type=Path, default=WORK / "zoo", help="where zoo models are filled")
    parser.add_argument("--repeat", type=int, default=1, help="alternations of baseline and tool per large cell")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS / "tool")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tables = _previous(args.out.with_suffix(".json"))

    def save() -> None:
        write_results(args.out, tables, markdown(tables["calibration"], tables["large"]))

    methods = [m for m in args.methods.split(",") if m]
    if methods:
        calib = write_calibration(args.calib, max(args.samples, 2000))
        tables["calibration"] = []
        for model in args.models.split(","):
            for label in methods:
                tables["calibration"].append(cell(args.models_dir / f"{model}.onnx", label, args.ratio, calib,
                                                  args.samples, args.timeout))
                log.info("%s", json.dumps(tables["calibration"][-1]))
                save()
    large = [m for m in args.large.split(",") if m]
    if large:
        tables["large"] = []
        for name in large:
            model = filled(name, args.filled)
            for latency in (False, True):
                tables["large"].append(large_cell(model, args.ratio, latency, args.repeat, args.timeout))
                log.info("%s", json.dumps(tables["large"][-1]))
                save()
    log.info("wrote %s", args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
