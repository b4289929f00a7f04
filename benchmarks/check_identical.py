"""Prove that a change left the tool's output alone: the same command, byte-identical files.

    python benchmarks/check_identical.py                       # HEAD vs the working tree, default models
    python benchmarks/check_identical.py --rev 7aa33e3 --models tv_vgg16,tv_resnet50 --method l2
    python benchmarks/check_identical.py --models all          # every zoo model

For each model the same `onnx-prune MODEL -o OUT --report R ...` command line runs twice in
fresh processes: once with the package as it is at git revision `--rev` (`git archive REV
onnxslim_prune` unpacked into a scratch folder and put first on PYTHONPATH, so nothing is
installed or checked out), once with the working tree. The written model (and its external
data file, if any) must be byte-identical (sha256), and the reports must be equal once the
figures that are not outputs are dropped (timings, latency, paths, version). Each run's wall
time and peak RSS are measured too (`measure.run_measured`), so the table is also the
before/after profile of the command. Zoo models (`../shared/zoo`, weights stripped) are filled
with seeded random weights once (`fill.py --seed 0`) into `--filled`; a `.onnx` path is used
as it is. Exit code 1 if any output differs.

Results go to benchmarks/results/identical.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lib.data import zoo_model
from lib.measure import Measured, failure, run_measured
from lib.paths import ROOT as REPO
from lib.paths import RESULTS, SHARED_MODELS, WORK, ZOO
from lib.results import write_results

DEFAULT_MODELS = ("tv_vgg16", "tv_resnet50", "tv_mobilenet_v2", "hf_bert", str(SHARED_MODELS / "fmnist_resnet56.onnx"))
#: report keys that measure the run, not its result
VOLATILE = ("seconds", "stage_seconds", "latency", "input_path", "output_path", "version")
#: verdict gates whose value is a timing (`onnxslim_prune.judge.latency.SPEED_FIGURES`; not imported: the runs import the
#: package from the revisions they compare, never this process)
SPEED_FIGURES = ("latency_ratio", "speedup")


def model_path(name: str, filled: Path) -> Path:
    if name.endswith(".onnx"):
        return Path(name).resolve()
    return zoo_model(name, ZOO, filled)


def export_revision(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "onnxslim_prune"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def digests(out: Path) -> dict[str, str]:
    """sha256 of the written model and of every file written beside it (external data)."""
    return {p.name.replace(out.name, "OUT"): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.parent.glob(out.name + "*")) if p.is_file()}


def stable_report(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    for key in VOLATILE:
        data.pop(key, None)
    data.get("settings", {}).pop("paths", None)
    verdict = data.get("verdict") or {}
    if "gates" in verdict:  # the speed gates' values are timings (their pass / miss is the run's, kept)
        verdict["gates"] = [{**g, "value": None} if g.get("figure") in SPEED_FIGURES else g
                            for g in verdict["gates"]]
    if "extra" in data:
        data["extra"] = without_seconds(data["extra"])  # recovery's record times its blocks
    # a note may say how long its step took ("60 iterations ... in 0.3 s"; recovery's total)
    data["notes"] = [DURATION.sub("<seconds>", n) for n in data.get("notes", [])]
    return data


#: a duration in a note
DURATION = re.compile(r"\b\d+(?:[.,]\d+)? ?(?:s|ms|min)\b")


def without_seconds(value: Any) -> Any:
    """`value` with every "seconds" key of its dicts dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def imported_from(package_root: Path) -> Path:
    """Where a run with this package root imports the package from (must be inside it)."""
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    out = subprocess.run([sys.executable, "-P", "-c", "import onnxslim_prune; print(onnxslim_prune.__file__)"],
                         env=env, check=True, capture_output=True, text=True).stdout.strip()
    where = Path(out).resolve()
    if package_root.resolve() not in where.parents:
        raise SystemExit(f"the package under {package_root} is shadowed by {where}")
    return where


def run_once(package_root: Path, model: Path, args: list[str], work: Path, timeout: float) -> tuple[Measured, dict[str, str], Any]:
    work.mkdir(parents=True, exist_ok=True)
    out, report = work / "out.onnx", work / "report.json"
    env = {**os.environ, "PYTHONPATH": str(package_root), "ONNXSLIM_PRUNE_CACHE": "off"}
    # -P: `python -m` must not put the working directory (this repository) before PYTHONPATH
    cmd = [sys.executable, "-P", "-m", "onnxslim_prune.cli", str(model), "-o", str(out), "--report", str(report), "-q",
           *args]
    run = run_measured(cmd, timeout=timeout, env=env)
    return run, (digests(out) if out.exists() else {}), stable_report(report)


def check(model: Path, args: list[str], ref_root: Path, new_root: Path, scratch: Path, timeout: float) -> dict[str, Any]:
    ref_run, ref_hash, ref_report = run_once(ref_root, model, args, scratch / "ref", timeout)
    new_run, new_hash, new_report = run_once(new_root, model, args, scratch / "new", timeout)
    row: dict[str, Any] = {
        "model": model.stem, "args": " ".join(args),
        "ref_seconds": ref_run.seconds, "new_seconds": new_run.seconds,
        "ref_peak_mib": ref_run.peak_mib, "new_peak_mib": new_run.peak_mib,
        "ref_exit": ref_run.returncode, "new_exit": new_run.returncode,
        "sha256": new_hash.get("OUT", ""),
        "files_identical": bool(ref_hash) and ref_hash == new_hash,
        "report_identical": ref_report is not None and ref_report == new_report,
    }
    if ref_run.returncode != new_run.returncode or not ref_hash:
        row["error"] = f"ref: {failure(ref_run) if ref_run.returncode else 'ok'}; new: {failure(new_run) if new_run.returncode else 'ok'}"
    elif ref_report != new_report and ref_report is not None and new_report is not None:
        row["report_diff"] = sorted(k for k in {*ref_report, *new_report} if ref_report.get(k) != new_report.get(k))
    return row


def markdown(rows: list[dict[str, Any]], rev: str) -> str:
    lines = [
        "# Same command, same output: the working tree against a git revision",
        "",
        f"Each row runs one `onnx-prune` command twice in fresh processes, with the package at `{rev}` "
        "and with the working tree; the written files are compared by sha256 and the reports without their "
        "timings, latency, paths and version. Zoo models carry seeded random weights (`fill.py --seed 0`). "
        "The seconds and peak RSS of the two runs are measured in the same session (a shared 2-core machine: "
        "wall times move with other load). Generated by `benchmarks/check_identical.py`.",
        "",
        "| model | arguments | files identical | report identical | s before | s after | peak MiB before | peak MiB after | sha256 (first 16) |",
        "|---|---|:-:|:-:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mark = {True: "yes", False: "**NO**"}
        extra = f" ({r['error']})" if "error" in r else (f" (differs: {', '.join(r['report_diff'])})" if "report_diff" in r else "")
        lines.append(
            f"| {r['model']} | `{r['args']}` | {mark[r['files_identical']]} | {mark[r['report_identical']]}{extra} | "
            f"{r['ref_seconds']:.1f} | {r['new_seconds']:.1f} | {r['ref_peak_mib']:.0f} | {r['new_peak_mib']:.0f} | "
            f"`{r['sha256'][:16]}` |"
        )
    same = sum(1 for r in rows if r["files_identical"])
    lines += ["", f"{same}/{len(rows)} byte-identical."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision of the reference package [HEAD]")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="zoo names or .onnx paths, comma-separated; 'all'")
    ap.add_argument("--method", default="l1", help="comma-separated: one row per model and method")
    ap.add_argument("--ratio", default="0.5", help="'none': no --ratio (for a budget given in --extra)")
    ap.add_argument("--extra", default="--no-latency", help="more CLI arguments, one string (e.g. '--calib x.npz')")
    ap.add_argument("--tree", type=Path, default=REPO,
                    help="the package root to check against the revision [the working tree]")
    ap.add_argument("--filled", type=Path, default=WORK / "zoo")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=RESULTS / "identical")
    a = ap.parse_args()
    names = [p.stem for p in sorted(ZOO.glob("*.onnx"))] if a.models == "all" else a.models.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="check_identical.") as tmp:
        ref_root = Path(tmp) / "ref"
        ref_root.mkdir()
        export_revision(a.rev, ref_root)
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.rev], check=True, capture_output=True,
                             text=True).stdout.strip()
        print(f"reference: {imported_from(ref_root)} ({rev}); checked: {imported_from(a.tree)}", flush=True)
        for name in names:
            model = model_path(name, a.filled)
            for method in a.method.split(","):
                ratio = [] if a.ratio.lower() == "none" else ["--ratio", a.ratio]
                args = ["--method", method, *ratio, *a.extra.split()]
                row = check(model, args, ref_root, a.tree, Path(tmp) / "runs" / f"{model.stem}.{method}", a.timeout)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(a.out, {"rev": rev, "rows": rows}, markdown(rows, rev))
    bad = [r["model"] for r in rows if not r["files_identical"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} identical" + (f"; differ: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
