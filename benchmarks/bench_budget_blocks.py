"""Global budgets, layer-compensated pruning and block pruning, measured (not a test).

    python benchmarks/bench_budget_blocks.py --shared ../shared --zoo /tmp/zoo \\
        --out benchmarks/results/budget_blocks.md [--only a,b,c]

(a) `lcp` against uniform `l1` (and a plain global `l1` ranking) on Fashion-MNIST ResNet-56 at
    the same MACs: uniform `l1` runs first at the ratio whose MACs are closest to 0.5 / 0.3 kept,
    and the other methods get that exact fraction as --target-macs;
(b) block pruning of ResNet-56: accuracy against the number of residual blocks removed;
(c) --target-macs 0.5 on every filled zoo model: the fraction achieved (one subprocess each).

Calibration: the first 2,000 train images; accuracy: the full 10,000-image test split
(IDX gzip, float32 pixels / 255, [N, 1, 28, 28]). No fine-tuning anywhere. Each section's
rows are cached as JSON under --work so that the markdown can be rebuilt from any subset.
Least-squares reconstruction is off (`reconstruct: False`): the tables compare selection only.
"""

from __future__ import annotations

import argparse
import json
import re
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.data import load_split
from lib.measure import verdict_cosine
from lib.results import write_json, write_text
from lib.runtime import accuracy
from onnxslim_prune import prune

CALIB_SAMPLES = 2000
BLOCK_COUNTS = (0, 3, 6, 9, 13)
MACS_TARGETS = (0.8, 0.5, 0.3)


def kept(result: Any) -> tuple[float, float]:
    before, after = result.report.before, result.report.after
    return after.macs / before.macs, after.params / before.params


def uniform_at(model: Path, target: float) -> tuple[float, Any]:
    """The uniform l1 ratio whose MACs are closest to `target` (bisection on the ratio)."""
    lo, hi = 0.0, 0.95
    best: tuple[float, float, Any] | None = None
    for _ in range(12):
        mid = (lo + hi) / 2
        result = prune(model, "l1", mid)
        macs = kept(result)[0]
        if best is None or abs(macs - target) < abs(best[1] - target):
            best = (mid, macs, result)
        if macs > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[0], best[2]


def row(name: str, result: Any, images: np.ndarray, labels: np.ndarray, seconds: float, **extra: Any) -> dict[str, Any]:
    macs, params = kept(result)
    acc = accuracy(result.model, images, labels)
    return {"method": name, "macs": macs, "params": params, "accuracy": acc, "seconds": seconds, **extra}


def section_a(shared: Path, calib: Path, images: np.ndarray, labels: np.ndarray, iterations: int) -> list[dict[str, Any]]:
    model = shared / "models" / "fmnist_resnet56.onnx"
    rows: list[dict[str, Any]] = []
    base = accuracy(model, images, labels)
    rows.append({"method": "original", "macs": 1.0, "params": 1.0, "accuracy": base, "seconds": 0.0, "target": 1.0})
    for target in MACS_TARGETS:
        started = time.perf_counter()
        ratio, uniform = uniform_at(model, target)
        rows.append(row(f"l1 uniform (ratio {ratio:.3f})", uniform, images, labels, time.perf_counter() - started, target=target))
        macs = kept(uniform)[0]
        started = time.perf_counter()
        glob = prune(model, "l1", params={"target_macs": macs})
        rows.append(row("l1 global (--target-macs)", glob, images, labels, time.perf_counter() - started, target=target))
        started = time.perf_counter()
        lcp = prune(model, "lcp", calib=calib, params={"target_macs": macs, "lcp_iterations": iterations, "reconstruct": False})
        note = next((n for n in lcp.report.notes if n.startswith("lcp:")), "")
        rows.append(row(f"lcp ({iterations} iterations)", lcp, images, labels, time.perf_counter() - started, target=target, note=note))
        print(json.dumps(rows[-3:], indent=1), flush=True)
    return rows


def section_b(shared: Path, calib: Path, images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    model = shared / "models" / "fmnist_resnet56.onnx"
    rows: list[dict[str, Any]] = []
    for criterion in ("output", "norm"):
        for count in BLOCK_COUNTS:
            started = time.perf_counter()
            removable = 25  # ResNet-56: 27 residual Adds, 2 of them with a projection shortcut
            fraction = (count + 0.5) / removable if count else 0.0
            result = prune(model, "layer", fraction, calib=calib, params={"block_criterion": criterion, "reconstruct": False})
            note = next((n for n in result.report.notes if n.startswith("blocks: removed")), "")
            removed = int(note.split("removed ")[1].split(" ")[0]) if note else 0
            rows.append(
                row(f"blocks ({criterion})", result, images, labels, time.perf_counter() - started, removed=removed, criterion=criterion)
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def section_c(zoo: Path, timeout: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(zoo.glob("*.onnx")):
        if ".pruned" in path.name or ".l1" in path.name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out, report = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
            started = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "onnxslim_prune.cli", str(path), "-o", str(out), "--target-macs", "0.5",
                     "--report", str(report), "-q"],
                    capture_output=True, text=True, timeout=timeout,
                )
                error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
            except subprocess.TimeoutExpired:
                error = f"timeout after {timeout} s"
            entry: dict[str, Any] = {"model": path.stem, "seconds": time.perf_counter() - started}
            if error is None:
                data = json.loads(report.read_text())
                entry.update(
                    macs=data["after"]["macs"] / data["before"]["macs"],
                    params=data["after"]["params"] / data["before"]["params"],
                    cosine=verdict_cosine(data["verdict"]),
                    notes=[n for n in data.get("notes", []) if "budget" in n],
                )
            else:
                entry["error"] = error
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    return rows


def previous_section(previous: str, key: str) -> list[str]:
    """The `## (key)` section of an earlier results file, for a section neither run now nor cached."""
    match = re.search(rf"^## \({key}\).*?(?=^## \(|\Z)", previous, flags=re.S | re.M)
    return ["", *match.group(0).rstrip().splitlines()] if match else []


def markdown(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None, c: list[dict[str, Any]] | None,
             previous: str = "") -> str:
    lines = ["# Global budgets, layer-compensated pruning, block pruning", ""]
    lines.append(
        "Fashion-MNIST ResNet-56 (`../shared/models/fmnist_resnet56.onnx`), calibration on the first 2,000 train "
        "images, accuracy on the 10,000 test images, no fine-tuning. Produced by `benchmarks/bench_budget_blocks.py`. "
        "Seconds are wall time on the 2-core machine (for (c) the whole CLI run: load, trace, search, apply, "
        "validation); sections (a) and (b) ran alongside another benchmark, so their seconds are inflated."
    )
    if not a:
        lines += previous_section(previous, "a")
    if not b:
        lines += previous_section(previous, "b")
    if not c:
        lines += previous_section(previous, "c")
    if a:
        lines += ["", "## (a) lcp vs uniform l1 at the same MACs", "",
                  "| MACs target | method | MACs kept | params kept | test accuracy | s |", "|---:|---|---:|---:|---:|---:|"]
        for r in a:
            lines.append(
                f"| {r['target']:g} | {r['method']} | {r['macs']:.3f} | {r['params']:.3f} | {r['accuracy']:.2%} | {r['seconds']:.1f} |"
            )
        notes = [r["note"] for r in a if r.get("note")]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    if b:
        lines += ["", "## (b) block pruning of ResNet-56 (25 removable identity blocks)", "",
                  "| blocks removed | criterion | MACs kept | params kept | test accuracy | s |", "|---:|---|---:|---:|---:|---:|"]
        for r in b:
            lines.append(
                f"| {r['removed']} | {r['criterion']} | {r['macs']:.3f} | {r['params']:.3f} | {r['accuracy']:.2%} | {r['seconds']:.1f} |"
            )
    if c:
        ok = [r for r in c if "error" not in r]
        within = [r for r in ok if abs(r["macs"] - 0.5) <= 0.02]
        lines += ["", "## (c) --target-macs 0.5 on the filled zoo (random weights: structure, not accuracy)", "",
                  "| model | MACs kept | params kept | within 2% | cosine | s |", "|---|---:|---:|:---:|---:|---:|"]
        for r in c:
            if "error" in r:
                lines.append(f"| {r['model']} | error: {r['error']} | | | | {r['seconds']:.1f} |")
            else:
                mark = "yes" if abs(r["macs"] - 0.5) <= 0.02 else "no"
                lines.append(f"| {r['model']} | {r['macs']:.3f} | {r['params']:.3f} | {mark} | {r['cosine']:.3f} | {r['seconds']:.1f} |")
        fewer = [r for r in ok if r["params"] <= 1.0]
        lines += ["", f"{len(within)}/{len(c)} models land within 2% of 0.5 ({len(ok)} ran without error); "
                  f"{len(fewer)}/{len(ok)} keep no more parameters than the original."]
        misses = [r for r in ok if abs(r["macs"] - 0.5) > 0.02]
        for r in misses:
            lines.append(f"- {r['model']}: {'; '.join(r.get('notes', [])) or 'no note'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/zoo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/budget_blocks.md"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_budget_blocks")
    parser.add_argument("--only", default="a,b,c")
    parser.add_argument("--lcp-iterations", type=int, default=60)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    if only & {"a", "b"}:
        fmnist = args.shared / "data" / "fashion-mnist"
        train = load_split("train", CALIB_SAMPLES, root=fmnist)[0]
        images, labels = load_split("test", root=fmnist)
        calib = args.work / "fmnist_train2000.npz"
        np.savez(calib, input=train)
    if "c" in only and not any(args.zoo.glob("*.onnx")):
        args.zoo.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(args.shared / "zoo" / "fill.py"), "--all", str(args.zoo), "--seed", "0"], check=True)
    sections = {
        "a": lambda: section_a(args.shared, calib, images, labels, args.lcp_iterations),
        "b": lambda: section_b(args.shared, calib, images, labels),
        "c": lambda: section_c(args.zoo, args.timeout),
    }
    for key in sorted(only & set(sections)):  # --only none: rebuild the markdown from the cached rows
        write_json(args.work / f"{key}.json", sections[key]())
    loaded = {k: json.loads((args.work / f"{k}.json").read_text()) if (args.work / f"{k}.json").exists() else None for k in "abc"}
    previous = args.out.read_text() if args.out.exists() else ""
    write_text(args.out, markdown(loaded["a"], loaded["b"], loaded["c"], previous))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
