"""Pruning time and onnxruntime CPU latency before/after, on zoo models.

    python benchmarks/bench_latency.py [--models tv_resnet18 ...] [--round-to 1 8] [--quick]

For each model: prune with l1 at --ratio (once per --round-to), then time the original
and the pruned model in the same process, interleaved (original, pruned, original, ...)
so that machine noise hits both alike; the figure is the median of --repeats runs after
--warmup runs. Results: benchmarks/results/latency.md and latency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

from lib.data import zoo_model
from lib.paths import FILLED, RESULTS, ZOO
from lib.results import write_results
from lib.runtime import seeded_feed, session
from onnxslim_prune import prune

DEFAULT_MODELS = [
    "tv_resnet18", "tv_resnet50", "tv_mobilenet_v2", "tv_vgg16", "tv_densenet121", "tv_efficientnet_b0",
    "tv_regnet_x_400mf", "timm_cspdarknet53", "tv_convnext_tiny", "tv_squeezenet1_1",
]
QUICK_MODELS = ["tv_resnet18", "tv_mobilenet_v2", "tv_squeezenet1_1"]


def interleaved_latency(a: ort.InferenceSession, b: ort.InferenceSession, feeds: dict, warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        a.run(None, feeds)
        b.run(None, feeds)
    ta, tb = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        a.run(None, feeds)
        ta.append(time.perf_counter() - start)
        start = time.perf_counter()
        b.run(None, feeds)
        tb.append(time.perf_counter() - start)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ZOO)
    ap.add_argument("--filled", type=Path, default=FILLED)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    models = a.models or (QUICK_MODELS if a.quick else DEFAULT_MODELS)
    rows = []
    for name in models:
        path = zoo_model(name, a.zoo, a.filled)
        original = path.read_bytes()
        for round_to in a.round_to:
            started = time.perf_counter()
            result = prune(str(path), "l1", a.ratio, round_to=round_to)
            prune_s = time.perf_counter() - started
            feeds = seeded_feed(result.model, {i.name: tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim)
                                                 for i in result.model.graph.input}, 0)
            base_ms, pruned_ms = interleaved_latency(
                session(original, a.threads), session(result.model.SerializeToString(), a.threads), feeds, a.warmup, a.repeats
            )
            r = result.report
            row = {
                "model": name, "round_to": round_to, "prune_s": round(prune_s, 2),
                "macs_kept": r.after.macs / r.before.macs, "params_kept": r.after.params / r.before.params,
                "latency_ms_before": round(base_ms, 2), "latency_ms_after": round(pruned_ms, 2),
                "speedup": base_ms / pruned_ms,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"l1 at ratio {a.ratio}; onnxruntime CPU, {a.threads} threads, batch 1, median of {a.repeats} interleaved runs.",
        "",
        "| model | round-to | prune s | MACs kept | params kept | latency before ms | after ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['round_to']} | {r['prune_s']} | {r['macs_kept']:.1%} | {r['params_kept']:.1%} | "
            f"{r['latency_ms_before']} | {r['latency_ms_after']} | {r['speedup']:.2f}x |"
        )
    write_results(a.out / "latency", rows, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
