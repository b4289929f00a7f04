"""Time and peak memory of calibration statistics vs a plain onnxruntime pass.

    python benchmarks/bench_calibration.py                       # ResNet-56 (Fashion-MNIST) and zoo ResNet-50
    python benchmarks/bench_calibration.py --models resnet56 --counts 500,2000

For each model and sample count, three measurements run in fresh subprocesses (peak RSS is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process; the statistics cache is off):

* ``plain``: one onnxruntime session (default options) over the samples, outputs dropped;
* ``moments``: ``ChannelMoments`` of every prunable group's activations (mean_act / apoz);
* ``gram``: the im2col input covariance of every consumer of a prunable group at 16 sampled
  positions per image (ThiNet / CP / LDRF statistics; float64 Gram matrices).

Only the pass itself is timed (model loading, tracing and session creation are not, in
any mode). Two sample counts per model show that memory does not grow with N.
ResNet-50 uses seeded random inputs (timing only); ResNet-56 the Fashion-MNIST train split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
MODELS = {
    "resnet56": (SHARED / "models" / "fmnist_resnet56.onnx", "fmnist", 64, (500, 2000)),
    "resnet50": (Path("/tmp/zoo/tv_resnet50.onnx"), "random", 1, (16, 64)),
}
MODES = ("plain", "moments", "gram")
log = logging.getLogger("bench_calibration")


def child(mode: str, model_path: Path, source: str, count: int, batch_size: int) -> dict[str, Any]:
    """One measurement inside this (fresh) process."""
    os.environ["ONNXSLIM_PRUNE_CACHE"] = "off"
    sys.path.insert(0, str(HERE))
    import numpy as np
    import onnxruntime as ort

    from onnxslim_prune import api
    from onnxslim_prune.calib import input_specs, load_calibration
    from onnxslim_prune.passes import datadriven
    from onnxslim_prune.passes.methods import Context, Options

    analysis = api.analyze(model_path)
    specs = input_specs(analysis.model, analysis.input_shapes)
    if source == "fmnist":
        from fmnist import write_calibration

        calib_path = write_calibration(Path("/tmp/onnxslim_bench/fmnist_train2000.npz"), 2000)
        calib = load_calibration(str(calib_path), specs, samples=count)
    else:
        calib = load_calibration("random", specs, samples=count, seed=0)
    options = Options(batch_size=batch_size, params={"calib_positions": 16})
    ctx = Context(analysis.model, analysis.graph, analysis.trace, options, analysis.input_shapes, analysis.opset, calib)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    detail: dict[str, Any] = {}
    if mode == "plain":
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(analysis.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        started = time.perf_counter()
        for feed in calib.iter_batches(batch_size):
            session.run(None, feed)
        seconds = time.perf_counter() - started
    elif mode == "moments":
        tensors = [t for g in analysis.trace.groups if not g.is_frozen for t in datadriven.activation_tensors(ctx, g)]
        started = time.perf_counter()
        moments = datadriven.activation_moments(ctx, tensors)
        seconds = time.perf_counter() - started
        detail = {"tensors": len(moments)}
    else:
        consumers = datadriven.group_consumers(ctx)
        layers = [c.layer for cs in consumers.values() for c in cs]
        started = time.perf_counter()
        cov = datadriven.input_covariances(ctx, layers)
        seconds = time.perf_counter() - started
        detail = {"layers": len(cov), "gram_mib": round(sum(c.nbytes for c, _ in cov.values()) / 2**20, 1)}
        assert all(np.isfinite(c).all() for c, _ in cov.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode, "samples": count, "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 1024, 1),
        "rss_before_mib": round(baseline_rss / 1024, 1), **detail,
    }


def measure(mode: str, name: str, count: int) -> dict[str, Any]:
    path, source, batch, _ = MODELS[name]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), source, str(count), str(batch)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return {"mode": mode, "samples": count, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_resnet50() -> None:
    path = MODELS["resnet50"][0]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(SHARED / "zoo" / "fill.py"), str(SHARED / "zoo" / "tv_resnet50.onnx"), str(path)],
                       check=True)


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "# Calibration statistics: time and peak memory vs a plain onnxruntime pass",
        "",
        "Each cell is a fresh process; time covers the pass only; peak RSS is the whole process "
        "(model, session, statistics). `gram`: float64 im2col input covariances of every consumer "
        "(16 positions per image); `moments`: ChannelMoments of every group's activations. "
        "Generated by `benchmarks/bench_calibration.py`.",
        "",
        "| model | samples | batch | plain s | moments s (x plain) | gram s (x plain) | plain MiB | moments MiB | gram MiB | Gram matrices MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        counts = sorted({r["samples"] for r in rows})
        for count in counts:
            by = {r["mode"]: r for r in rows if r["samples"] == count}
            if any("error" in r for r in by.values()):
                lines.append(f"| {name} | {count} | | error: {'; '.join(r['error'] for r in by.values() if 'error' in r)} |")
                continue
            plain = by["plain"]["seconds"]
            lines.append(
                f"| {name} | {count} | {MODELS[name][2]} | {plain:.1f} | {by['moments']['seconds']:.1f} "
                f"({by['moments']['seconds'] / plain:.2f}) | {by['gram']['seconds']:.1f} ({by['gram']['seconds'] / plain:.2f}) | "
                f"{by['plain']['peak_rss_mib']:.0f} | {by['moments']['peak_rss_mib']:.0f} | {by['gram']['peak_rss_mib']:.0f} | "
                f"{by['gram'].get('gram_mib', 0):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, path, source = sys.argv[2:5]
        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(child(mode, Path(path), source, int(sys.argv[5]), int(sys.argv[6]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet56,resnet50")
    parser.add_argument("--counts", default=None, help="override the two sample counts, e.g. 500,2000")
    parser.add_argument("--repeat", type=int, default=1, help="measure each cell N times, keep the fastest")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "calibration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.models.split(","):
        if name == "resnet50":
            ensure_resnet50()
        counts = [int(c) for c in args.counts.split(",")] if args.counts else list(MODELS[name][3])
        rows = []
        for count in counts:
            for mode in MODES:
                tries = [measure(mode, name, count) for _ in range(args.repeat)]
                good = [t for t in tries if "error" not in t]
                rows.append(min(good, key=lambda t: t["seconds"]) if good else tries[0])
                log.info("%s %s", name, rows[-1])
        results[name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    log.info("%s", markdown(results))


if __name__ == "__main__":
    main()
