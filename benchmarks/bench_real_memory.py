"""Peak memory against ``--calib-memory`` on real models at real calibration sizes (issue 21, item 2).

    python benchmarks/bench_real_memory.py                          # results/real_memory.{md,json}
    python benchmarks/bench_real_memory.py --cases effnet_ldrf --samples 256
    python benchmarks/bench_real_memory.py --library /tmp/lib_main --label before   # an older copy of the library

Each case runs the CLI in a fresh process (``-q --no-latency``, a scratch output) and records its peak
resident memory (``ru_maxrss`` of that very process, read with ``os.wait4``; a watchdog polls the
resident size every 0.1 s and kills the run past ``--cap-mib``, so a regression cannot take the
shared machine down). The bound is the model's *floor* plus the budget: the floor is measured in a
fresh process that does what no run can avoid, ``onnx.load`` of the model, one onnxruntime session
and one sample through it (the largest of those resident sizes).

Cases (the models and data of ../shared; SmolLM2 is built by ../shared/real/build.sh):

- ``effnet_ldrf`` / ``effnet_thinet``: EfficientNet-Lite1, ``--target-macs 0.85``, calibrated on the
  1,200-image folder at 240x240 (mean/std 0.5), verdict on the held-out 20%;
- ``effnet_l1_eval``: the same model data-free (``l1 --ratio 0.3``) with ``--eval`` an .npz of the 600
  eval images (built here, labels = the original's top-1: the accuracy is then agreement);
- ``smollm2_contrib``: SmolLM2-135M, ``contrib --ffn 0.3 --heads 0 --hidden 0`` calibrated on windows
  of 128 tokens (``smollm2_calib.npz``), verdict on the held-out 20% (logits [N, 128, 49152]);
- ``smollm2_default``: the same model and data with the default method (``obs``) at ``--target-macs 0.8``.

``--label`` names the library the rows were measured with (``before``: main before the memory work,
``main``: after its first part, ``after``: this tree); rows of other labels already in the JSON are kept, so both sit in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lib.paths import IMAGES, REAL_MODELS, RESULTS, ROOT, SHARED_MODELS, TEXT
from lib.results import write_json, write_text

EFFNET = SHARED_MODELS / "efficientnet_lite1.onnx"
SMOLLM2 = REAL_MODELS / "smollm2_135m.onnx"
IMAGE_FLAGS = ("--size", "240x240", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    args: tuple[str, ...]
    budget: str  # --calib-memory
    #: the largest calibration size (None: data-free)
    samples: int | None
    floor_feed: dict[str, tuple[tuple[int, ...], str]]  # input -> (shape of one sample, dtype) for the floor


def cases(eval_npz: Path) -> dict[str, Case]:
    image = {"input": ((1, 3, 240, 240), "float32")}
    text = {"input_ids": ((1, 128), "int64"), "attention_mask": ((1, 128), "int64")}
    calib = ("--calib", str(IMAGES / "calib"), *IMAGE_FLAGS)
    return {c.name: c for c in (
        Case("effnet_ldrf", EFFNET, ("--method", "ldrf", "--target-macs", "0.85", *calib), "3G", 1200, image),
        Case("effnet_thinet", EFFNET, ("--method", "thinet", "--target-macs", "0.85", *calib), "3G", 1200, image),
        Case("effnet_l1_eval", EFFNET, ("--method", "l1", "--ratio", "0.3", "--eval", str(eval_npz)), "1G", None, image),
        Case("smollm2_contrib", SMOLLM2, ("--method", "contrib", "--ffn", "0.3", "--heads", "0", "--hidden", "0",
                                          "--calib", str(TEXT / "smollm2_calib.npz")), "1G", 1024, text),
        Case("smollm2_default", SMOLLM2, ("--target-macs", "0.8", "--calib", str(TEXT / "smollm2_calib.npz")), "1G", 1024,
             text),
    )}


@dataclass(frozen=True)
class Run:
    returncode: int
    seconds: float
    peak_mib: float
    killed: bool
    stderr_tail: str


def _tree_rss_kib(pid: int) -> int:
    """Resident KiB of `pid` and its descendants (Linux /proc)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            total += sum(_tree_rss_kib(int(c)) for c in children.read().split())
    except (OSError, ValueError):
        pass
    return total


def run_capped(cmd: list[str], cap_mib: float, env: dict[str, str], timeout: float) -> Run:
    """Run `cmd`; its own ``ru_maxrss``, killed (process group) past `cap_mib` resident or `timeout` seconds."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        # from a scratch folder: ``python -m`` puts the working directory first on the path, before --library
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
                                cwd=tempfile.gettempdir())
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _tree_rss_kib(proc.pid) > cap_mib * 1024 or time.perf_counter() - started > timeout:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    return Run(proc.returncode, round(time.perf_counter() - started, 1), round(usage.ru_maxrss / 1024, 1), killed,
               " | ".join(tail)[-300:])


_FLOOR = (
    "import sys, resource, numpy as np, onnx, onnxruntime as ort\n"
    "path, feeds = sys.argv[1], eval(sys.argv[2])\n"
    "model = onnx.load(path)\n"
    "sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
    "sess.run(None, {k: np.zeros(s, d) for k, (s, d) in feeds.items()})\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def floor_mib(case: Case) -> float:
    """Peak of onnx.load + one session + one sample: what any run of the model holds."""
    out = subprocess.run([sys.executable, "-c", _FLOOR, str(case.model), repr(case.floor_feed)], capture_output=True,
                         text=True, check=True)
    return round(int(out.stdout.split()[-1]) / 1024, 1)


def build_eval(path: Path) -> Path:
    """The 600 eval images at 240x240 (the CLI's image formula) with the original's top-1 as labels."""
    if path.exists():
        return path
    import onnxruntime as ort

    from lib.internals import Preprocess, input_specs, load_calibration

    import onnx

    model = onnx.load(str(EFFNET))
    pre = Preprocess(size=(240, 240), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    calib = load_calibration(IMAGES / "eval", input_specs(model, {}), preprocess=pre)
    images = np.concatenate([b["input"] for b in calib.iter_batches(50)])
    sess = ort.InferenceSession(str(EFFNET), providers=["CPUExecutionProvider"])
    labels = np.concatenate([np.argmax(sess.run(None, {"input": images[i : i + 50]})[0], axis=1)
                             for i in range(0, len(images), 50)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input=images, labels=labels.astype(np.int64))
    return path


def measure(case: Case, samples: int | None, label: str, library: Path, cap_mib: float, timeout: float) -> dict[str, Any]:
    # no statistics cache: a run must compute what it holds, not load it from an earlier run's entries
    env = dict(os.environ, PYTHONPATH=str(library), ONNXSLIM_PRUNE_CACHE="off")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(case.model), "-o", str(Path(tmp) / "out.onnx"),
               "--report", str(report), "-q", "--no-latency", "--calib-memory", case.budget, *case.args]
        if samples is not None and samples != case.samples:
            cmd += ["--calib-samples", str(samples)]
        run = run_capped(cmd, cap_mib, env, timeout)
        data = json.loads(report.read_text()) if report.exists() else {}
    verdict = data.get("verdict") or {}
    return {"case": case.name, "label": label, "samples": samples, "budget": case.budget, **asdict(run),
            "verdict_samples": verdict.get("samples"), "top1_agreement": verdict.get("top1_agreement"),
            "cosine": verdict.get("cosine")}


def _size(text: str) -> float:
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    return float(text[:-1]) * units[text[-1].upper()]


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write(rows: list[dict[str, Any]], floors: dict[str, float], out: Path) -> None:
    write_json(out.with_suffix(".json"), {"machine": platform.platform(), "floors_mib": floors, "rows": rows})
    lines = [
        "# Peak memory against --calib-memory",
        "",
        "Peak resident memory of one CLI run (`ru_maxrss`), against the bound the run must keep: the model's floor",
        "(onnx.load, one onnxruntime session, one sample through it) plus `--calib-memory`. `before`: the library",
        "before the memory work (6be53c2); `main`: after its first part (9a5d483); `after`: this tree. Killed: the",
        "watchdog stopped the run past its cap.",
        "Written by `benchmarks/bench_real_memory.py`.",
        "",
        "| case | library | samples | --calib-memory | floor MiB | bound MiB | peak MiB | within | seconds | verdict samples | top-1 agreement | cosine |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    order = {"before": 0, "main": 1}
    for r in sorted(rows, key=lambda r: (r["case"], r["samples"] or 0, order.get(r["label"], 2))):
        floor = floors.get(r["case"], 0.0)
        bound = floor + _size(r["budget"])
        ok = "killed" if r["killed"] else ("yes" if r["peak_mib"] <= bound else "**no**")
        if r["returncode"] not in (0, 3) and not r["killed"]:
            ok = f"exit {r['returncode']}"
        lines.append(f"| {r['case']} | {r['label']} | {r['samples'] or 'data-free'} | {r['budget']} | {floor:.0f} | "
                     f"{bound:.0f} | {r['peak_mib']:.0f} | {ok} | {r['seconds']:.0f} | {_fmt(r['verdict_samples'], 'd')} | "
                     f"{_fmt(r['top1_agreement'], '.4f')} | {_fmt(r['cosine'], '.6f')} |")
    notes = [f"- {r['case']} ({r['label']}, {r['samples'] or 'data-free'}): {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", *notes]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "real_memory")
    ap.add_argument("--cases", default="effnet_ldrf,effnet_thinet,effnet_l1_eval,smollm2_contrib")
    ap.add_argument("--samples", type=int, help="calibration samples (default: each case's full set)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--budget", help="--calib-memory instead of each case's own (e.g. 6G)")
    ap.add_argument("--library", type=Path, default=ROOT, help="folder holding the onnxslim_prune package to measure")
    ap.add_argument("--cap-mib", type=float, default=14000, help="kill a run whose resident size passes this")
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "onnxslim_bench_memory")
    ap.add_argument("--build-eval", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_eval is not None:
        build_eval(a.build_eval)
        return
    table = cases(a.scratch / "effnet_eval600.npz")
    old = json.loads(a.out.with_suffix(".json").read_text()) if a.out.with_suffix(".json").exists() else {}
    rows, floors = old.get("rows", []), old.get("floors_mib", {})
    for name in a.cases.split(","):
        case = table[name] if a.budget is None else replace(table[name], budget=a.budget)
        if not case.model.exists():
            print(f"{name}: {case.model} is missing, skipped", flush=True)
            continue
        if name == "effnet_l1_eval" and not (a.scratch / "effnet_eval600.npz").exists():
            # in a child: this process stays small, and so does the high-water mark its children start from
            subprocess.run([sys.executable, __file__, "--build-eval", str(a.scratch / "effnet_eval600.npz")], check=True)
        floors[name] = floor_mib(case)
        samples = case.samples if a.samples is None or case.samples is None else min(a.samples, case.samples)
        row = measure(case, samples, a.label, a.library, a.cap_mib, a.timeout)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if (r["case"], r["label"], r["samples"], r["budget"]) != (name, a.label, samples, case.budget)]
        rows.append(row)
        write(rows, floors, a.out)


if __name__ == "__main__":
    main()
