"""``--objective latency --target-latency F`` on zoo CNNs: the target against the latency measured afterwards.

    OMP_NUM_THREADS=1 python benchmarks/bench_latency_search.py --target 0.6

Per model (seeded random weights, ``../shared/zoo/fill.py``; structure only, no accuracy): one CLI run
``onnx-prune MODEL --objective latency --target-latency F --method l1`` (data-free: the global ranking
allocation, ``--round-to auto``), then the benchmark re-measures the written file against the original
itself, independently of the tool: both loaded from disk, onnxruntime CPU sessions with
``intra_op_num_threads = 1`` (as the tool's), ``REMEASURE_ROUNDS`` interleaved rounds (order alternating),
the median of each, timed by the calling thread's CPU time (as the tool's default clock) and, for comparison,
by wall time. The machine is shared with other jobs: interleaving moves both medians alike, so the
*ratio* is fair-ish while the milliseconds are not a benchmark. Writes ``results/latency_search.md`` and
``results/latency_search.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from lib.data import zoo_model
from lib.paths import RESULTS, ROOT
from lib.results import environment, write_results, write_text
from lib.runtime import remeasure

MODELS = ("tv_resnet18", "tv_mobilenet_v2", "tv_squeezenet1_1", "tv_efficientnet_b0", "tv_regnet_x_400mf",
          "timm_lcnet_050", "timm_repvgg_a0", "tv_shufflenet_v2_x1_0", "tv_densenet121", "tv_vgg11_bn")
REMEASURE_ROUNDS = 40
WITHIN = 0.10


def run_one(name: str, target: float, work: Path) -> dict[str, Any]:
    model = zoo_model(name)
    out, rep = work / f"{name}.latency.onnx", work / f"{name}.latency.json"
    cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(model), "--objective", "latency", "--target-latency", str(target),
           "--method", "l1", "-o", str(out), "--report", str(rep), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    row: dict[str, Any] = {"model": name, "target": target, "exit": proc.returncode, "wall_s": wall,
                           "stderr": proc.stderr.strip()[-400:]}
    if not rep.exists():
        return row
    report = json.loads(rep.read_text())
    search = report["extra"]["search"]
    lat = report["extra"]["latency_search"]
    row.update(
        macs_kept=report["after"]["macs"] / report["before"]["macs"],
        params_kept=report["after"]["params"] / report["before"]["params"],
        probes=len(search["probes"]), chosen=search["chosen"], tool_ratio=lat["final_ratio"],
        probe_ratios=[p["latency_ratio"] for p in lat["points"]], round_to=report["settings"].get("round_to"),
        written=out.exists(),
    )
    if out.exists():
        onnx.checker.check_model(str(out), full_check=True)
        row["remeasured"] = remeasure(model, out, REMEASURE_ROUNDS)
        ratio = row["remeasured"]["ratio"]
        row["within"] = abs(ratio / target - 1.0) <= WITHIN
        row["faster"] = ratio < 1.0
        out.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_latency_search"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json in --out")
    args = parser.parse_args()
    if args.render:
        payload = json.loads((args.out / "latency_search.json").read_text())
        write_text(args.out / "latency_search.md", render(payload))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        row = run_one(name, args.target, args.work)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
    payload = {**environment(), "target": args.target, "within": WITHIN, "remeasure_rounds": REMEASURE_ROUNDS, "rows": rows}
    write_results(args.out / "latency_search", payload, render(payload), indent=2, sort_keys=True)
    print(f"wrote {args.out / 'latency_search.md'}")


def render(payload: dict[str, Any]) -> str:
    rows, target = payload["rows"], payload["target"]
    ok = [r for r in rows if r.get("within") and r.get("faster")]
    above = [r["model"] for r in rows if r.get("tool_ratio") is not None and r["tool_ratio"] > target]
    lines = [
        "# `--objective latency --target-latency 0.6` on zoo CNNs", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_latency_search.py --target {target}`. Ten zoo CNNs with seeded "
        "random weights (`../shared/zoo/fill.py --seed 0`: structure only, no accuracy is claimed), each pruned by one CLI run "
        f"`onnx-prune MODEL --objective latency --target-latency {target} --method l1` (data-free: global-ranking allocation, "
        "`--round-to auto`, which is 16 on this AVX-512 machine). *tool* is the written model's latency ratio the tool measured at "
        "the end of its run; *re-measured* is the benchmark's own measurement of the written file against the original after the "
        f"tool exited ({payload['remeasure_rounds']} interleaved rounds, median each). All latency sessions are onnxruntime CPU with "
        "`intra_op_num_threads = 1` (and OMP_NUM_THREADS=1), batch 1 at the model's input shape, so load from other processes "
        "disturbs them less, and each run is timed by the calling thread's CPU time (`time.thread_time`: with one intra-op thread "
        "the whole run), the tool's default clock: the machine (2 cores, load average 7-9 from other jobs during this run) gives "
        "each thread about half a core, and wall-clock ratios of one pair swung 0.58-0.79 between repeats while CPU-time ratios "
        "stayed within 0.655-0.666 (`Clock` in `planning/latency_search.py`). The wall-clock ratio of the same re-measurement is "
        "shown for comparison; interleaving makes the *ratios* fair-ish, not the milliseconds. Must show: re-measured within "
        f"{WITHIN:.0%} of the target and below 1 (never slower than the original).", "",
        f"**{len(ok)}/{len(rows)}** models within {WITHIN:.0%} of the target and faster than the original (re-measured). "
        + (f"The tool's own final measurement came out above the target for {', '.join(above)} (it warns and notes it in the "
           "report; the probe it chose had met the target): the spread of two measurements of one pair. " if above else "")
        + "*probes*: the bisection's probes (each one pruned, validated and measured model; `--max-probes` 10).", "",
        "| model | MACs kept | params kept | probes | tool ratio | re-measured ratio | CPU ms before → after | within 10% | "
        "faster | wall-clock ratio | exit | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if "macs_kept" not in r:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | no | - | - | {r['exit']} | {r['wall_s']:.0f} |")
            continue
        m = r.get("remeasured")
        lines.append(
            f"| {r['model']} | {r['macs_kept']:.1%} | {r['params_kept']:.1%} | {r['probes']} | {r['tool_ratio']:.3f} | "
            + (f"{m['ratio']:.3f} | {m['before_ms']:.1f} → {m['after_ms']:.1f} | {'yes' if r['within'] else 'NO'} | "
               f"{'yes' if r['faster'] else 'NO'} | {m['wall_ratio']:.3f}" if m else "- | - | - | - | -")
            + f" | {r['exit']} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
