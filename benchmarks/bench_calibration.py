"""Time and peak memory of calibration statistics vs a plain onnxruntime pass, in one run.

    python benchmarks/bench_calibration.py                       # ResNet-56 (Fashion-MNIST) and zoo ResNet-50
    python benchmarks/bench_calibration.py --models resnet56 --counts 2000 --repeat 3

For each model and sample count these measurements run in fresh subprocesses (peak RSS is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process; the statistics cache is off):

* ``plain``: one onnxruntime session (default options) over the samples, outputs dropped;
* ``moments``: ``ChannelMoments`` of every prunable group's activations (mean_act / apoz);
* ``stream``: ``stream_tensors`` of the Gram pass's tensors (the layer inputs), dropped: the
  onnxruntime share of ``gram``;
* ``gram``: the im2col input covariance of every consumer of a prunable group at 16 sampled
  positions per image (ThiNet / CP / LDRF statistics; float32 products, float64 Gram
  matrices), with the streaming BLAS limit (one thread, ``calib.threads``);
* ``gram_nolimit``: the same with ``ONNXSLIM_PRUNE_BLAS_THREADS=off`` (BLAS picks its own
  thread count, as before the limit).

Every time is reported as a ratio to ``plain`` of the same run. With ``--repeat N`` the modes
are measured in N interleaved rounds and each keeps its fastest (the machine may be shared).
Only the pass itself is timed (model loading, tracing and session creation are not, in
any mode). Two sample counts per model show that memory does not grow with N.
ResNet-50 uses seeded random inputs (timing only); ResNet-56 the Fashion-MNIST train split.
``gram_gflop`` is the arithmetic of the Gram products alone (``rows * D * (D + 1)`` per layer,
symmetric rank-k updates), the floor that no sampling or gathering change removes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lib.data import zoo_model
from lib.paths import FILLED, RESULTS, SHARED_MODELS
from lib.results import write_results

MODELS = {
    "resnet56": (SHARED_MODELS / "fmnist_resnet56.onnx", "fmnist", 64, (500, 2000)),
    "resnet50": (FILLED / "tv_resnet50.onnx", "random", 1, (16, 64)),
}
MODES = ("plain", "moments", "stream", "gram", "gram_nolimit")
log = logging.getLogger("bench_calibration")


def gram_gflop(ctx: Any, layers: list[Any], count: int, positions: int) -> float:
    """Arithmetic of the Gram products of `layers` (unique keys) over `count` samples."""
    from lib.internals import conv_output_size, datadriven

    unique = {datadriven._layer_key(layer): layer for layer in layers}
    flop = 0.0
    for layer in unique.values():
        shape = [int(d) for d in ctx.trace.shapes[layer.x]]
        if layer.kind == "conv":
            spatial = shape[2:]
            out = conv_output_size(spatial, layer.kernel, layer.strides, layer.conv_pads(spatial), layer.dilations)
            rows = min(positions, math.prod(out))
        else:
            rows = math.prod(shape[1:-1]) if len(shape) > 2 else 1
        dim = datadriven._dims(ctx, layer)
        flop += count * rows * dim * (dim + 1)
    return flop / 1e9


def child(mode: str, model_path: Path, source: str, count: int, batch_size: int) -> dict[str, Any]:
    """One measurement inside this (fresh) process."""
    os.environ["ONNXSLIM_PRUNE_CACHE"] = "off"
    if mode == "gram_nolimit":
        os.environ["ONNXSLIM_PRUNE_BLAS_THREADS"] = "off"
    import numpy as np
    import onnxruntime as ort

    from lib.internals import Context, Options, activation, datadriven, input_specs, load_calibration
    from onnxslim_prune import analyze

    analysis = analyze(model_path)
    specs = input_specs(analysis.model, analysis.input_shapes)
    if source == "fmnist":
        from lib.data import write_calibration

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
        tensors = [t for g in analysis.trace.groups if not g.is_frozen for t in activation.activation_tensors(ctx, g)]
        started = time.perf_counter()
        moments = activation.activation_moments(ctx, tensors)
        seconds = time.perf_counter() - started
        detail = {"tensors": len(moments)}
    elif mode == "stream":
        from lib.internals import reconstruct

        consumers = datadriven.group_consumers(ctx)
        names = list(dict.fromkeys(c.layer.x for cs in consumers.values() for c in cs))
        started = time.perf_counter()
        for _ in reconstruct.stream(ctx.model, ctx.calibration, names, batch_size):
            pass
        seconds = time.perf_counter() - started
        detail = {"tensors": len(names)}
    else:
        consumers = datadriven.group_consumers(ctx)
        layers = [c.layer for cs in consumers.values() for c in cs]
        started = time.perf_counter()
        cov = datadriven.input_covariances(ctx, layers)
        seconds = time.perf_counter() - started
        detail = {
            "layers": len(cov), "gram_mib": round(sum(c.nbytes for c, _ in cov.values()) / 2**20, 1),
            "gram_gflop": round(gram_gflop(ctx, layers, count, 16), 1),
        }
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
    zoo_model("tv_resnet50")  # seed 0, fill.py's default


def environment() -> dict[str, Any]:
    """BLAS library, its kernel and default threads, the OPENBLAS_* settings and the load average."""
    import numpy  # noqa: F401  (loads the BLAS library that threadpoolctl reports)
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_info

    return {
        "blas": [
            {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
            for info in threadpool_info()
        ],
        "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
        "cores": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def _ratio(by: dict[str, dict[str, Any]], mode: str) -> str:
    row = by.get(mode)
    if row is None or "error" in row:
        return "error" if row is not None else ""
    return f"{row['seconds']:.1f} ({row['seconds'] / by['plain']['seconds']:.2f})"


def markdown(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    blas = ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']} ({b['num_threads']} threads)" for b in meta["start"]["blas"])
    env = ", ".join(f"{k}={v}" for k, v in meta["start"]["openblas_env"].items()) or "none"
    lines = [
        "# Calibration statistics: time and peak memory vs a plain onnxruntime pass",
        "",
        "Each cell is a fresh process; time covers the pass only, as seconds and (in brackets) the ratio "
        "to the plain onnxruntime pass of the same run; peak RSS is the whole process (model, session, "
        "statistics). `gram`: im2col input covariances of every consumer (16 positions per image; float32 "
        "products, float64 totals) with one BLAS thread while streaming (`calib.threads`); `gram, BLAS "
        "unlimited`: the same with `ONNXSLIM_PRUNE_BLAS_THREADS=off`; `stream`: the onnxruntime part of "
        "`gram` alone (its tensors streamed and dropped); `moments`: ChannelMoments of every group's "
        "activations. `Gram GFLOP`: arithmetic of the Gram products. "
        f"Best of {meta['repeat']} interleaved rounds. Generated by `benchmarks/bench_calibration.py`.",
        "",
        f"BLAS: {blas}; OPENBLAS_* settings: {env}; {meta['start']['cores']} cores; "
        f"1-minute load average {meta['start']['loadavg_1min']} at the start, {meta['end']['loadavg_1min']} at the end.",
        "",
        "| model | samples | batch | plain s | moments s (x plain) | stream s (x plain) | gram s (x plain) "
        "| gram, BLAS unlimited s (x plain) | BLAS limit speed-up | plain MiB | moments MiB | gram MiB "
        "| Gram matrices MiB | Gram GFLOP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        counts = sorted({r["samples"] for r in rows})
        for count in counts:
            by = {r["mode"]: r for r in rows if r["samples"] == count}
            if "error" in by.get("plain", {"error": "missing"}) or "error" in by.get("gram", {"error": "missing"}):
                errors = "; ".join(f"{r['mode']}: {r['error']}" for r in by.values() if "error" in r)
                lines.append(f"| {name} | {count} | | error: {errors} |")
                continue
            nolimit = by.get("gram_nolimit", {})
            speedup = f"{nolimit['seconds'] / by['gram']['seconds']:.2f}x" if "seconds" in nolimit else ""
            mib = [f"{by[m]['peak_rss_mib']:.0f}" if "peak_rss_mib" in by.get(m, {}) else "" for m in ("plain", "moments", "gram")]
            lines.append(
                f"| {name} | {count} | {MODELS[name][2]} | {by['plain']['seconds']:.1f} | {_ratio(by, 'moments')} | "
                f"{_ratio(by, 'stream')} | {_ratio(by, 'gram')} | {_ratio(by, 'gram_nolimit')} | {speedup} | "
                f"{' | '.join(mib)} | {by['gram'].get('gram_mib', 0):.0f} | {by['gram'].get('gram_gflop', 0):.0f} |"
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
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)} (plain is always run)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each cell N times (interleaved rounds), keep the fastest")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = ["plain", *(m for m in args.modes.split(",") if m in MODES and m != "plain")]
    meta: dict[str, Any] = {"repeat": args.repeat, "modes": modes, "start": environment()}
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.models.split(","):
        if name == "resnet50":
            ensure_resnet50()
        counts = [int(c) for c in args.counts.split(",")] if args.counts else list(MODELS[name][3])
        rows = []
        for count in counts:
            tries: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for _ in range(args.repeat):  # interleaved: a burst of load elsewhere hits every mode alike
                for mode in modes:
                    tries[mode].append(measure(mode, name, count))
                    log.info("%s %s", name, tries[mode][-1])
            for mode in modes:
                good = [t for t in tries[mode] if "error" not in t]
                best = min(good, key=lambda t: t["seconds"]) if good else tries[mode][0]
                if good:
                    best = {**best, "all_seconds": [t["seconds"] for t in good]}
                rows.append(best)
        results[name] = rows
    meta["end"] = environment()
    write_results(args.out, {"meta": meta, **results}, markdown(results, meta))
    log.info("%s", markdown(results, meta))


if __name__ == "__main__":
    main()
