"""Issue 21, never slower: the written model's single-thread CPU time against the original's, with default flags.

    OMP_NUM_THREADS=1 python benchmarks/bench_never_slower.py [--models ...] [--targets 0.85 0.7] [--no-compare]

Per model and ``--target-macs`` T: one CLI run with the default flags (``onnx-prune MODEL --target-macs T``:
``l1``, data-free, ``--round-to auto``, the speed gates on), in a fresh process (`measure.prune_cli_keep`).
When it writes a model, the benchmark re-measures the file against the original itself, independently of
the tool (`bench_latency_search.remeasure`: both loaded from disk, single-threaded sessions, interleaved
rounds, the median of each, by the calling thread's CPU time and by wall time). A refused model (exit 3: a
speed gate missed) counts as not slower: nothing slower was written. For contrast, ``--round-to 1
--keep-failed`` (the old default, the written model whatever its speed) is run and re-measured the same way
(``--no-compare`` skips it). An A/A row per model times the original against itself: the noise the
not-slower gate's tolerance must stand above (`latency.SLOWER_TOLERANCE`).

Models: EfficientNet-Lite1 (trained, ../shared/models) and 8 zoo CNNs (seeded random weights by
../shared/zoo/fill.py: structure and speed only). Writes ``results/never_slower.md`` and ``.json``. The
machine is shared: interleaving moves both medians alike, so the ratios are fair-ish, the milliseconds not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from lib.data import zoo_model
from lib.internals import SLOWER_TOLERANCE, auto
from lib.measure import failure, prune_cli_keep
from lib.paths import FILLED, RESULTS, SHARED_MODELS, ZOO
from lib.results import environment, write_results, write_text
from lib.runtime import remeasure

LITE1 = SHARED_MODELS / "efficientnet_lite1.onnx"
ZOO_MODELS = ("tv_resnet18", "tv_resnet50", "tv_mobilenet_v2", "tv_mobilenet_v3_large", "tv_efficientnet_b0",
              "tv_regnet_y_400mf", "tv_mnasnet1_0", "tv_shufflenet_v2_x1_0")
QUICK_MODELS = ("tv_mobilenet_v2",)
TARGETS = (0.85, 0.7)
ROUNDS = 40
TIMEOUT = 1800


def model_path(name: str, zoo: Path, filled: Path) -> Path:
    if name == "efficientnet_lite1":
        return LITE1
    return zoo_model(name, zoo, filled)


def one_run(model: Path, args: list[str], work: Path, rounds: int) -> dict[str, Any]:
    """A CLI run and, when it wrote a model, the re-measurement of the written file."""
    run, report, out = prune_cli_keep(model, args, work, timeout=TIMEOUT)
    row: dict[str, Any] = {"args": args, "exit": run.returncode, "seconds": run.seconds, "written": out is not None}
    if report is None:
        row["error"] = failure(run)
        return row
    latency = report.get("latency") or {}
    row.update(macs_kept=report["ratios"]["macs"], params_kept=report["ratios"]["params"], speed=report.get("speed"),
               tool_ratio=latency.get("ratio"), tool_ci95=latency.get("ratio_ci95"), rounding=report.get("rounding"),
               gates=[g for g in report["verdict"]["gates"]] if report.get("verdict") else [])
    if out is not None:
        row["remeasured"] = remeasure(model, out, rounds)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ZOO)
    ap.add_argument("--filled", type=Path, default=FILLED)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--targets", type=float, nargs="*", default=list(TARGETS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--no-compare", action="store_true", help="skip the --round-to 1 --keep-failed contrast")
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)} at 0.7 only, no contrast")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="rewrite never_slower.md from never_slower.json, run nothing")
    a = ap.parse_args()
    if a.render:
        data = json.loads((a.out / "never_slower.json").read_text())
        text = table(data["rows"], data["meta"], any("round_to_1" in r for r in data["rows"]))
        write_text(a.out / "never_slower.md", text)
        print(text)
        return 0
    names = a.models or (list(QUICK_MODELS) if a.quick else ["efficientnet_lite1", *ZOO_MODELS])
    targets = [0.7] if a.quick else a.targets
    compare = not (a.no_compare or a.quick)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="never_slower_") as tmp:
        work = Path(tmp)
        for name in names:
            path = model_path(name, a.zoo, a.filled)
            aa = remeasure(path, path, a.rounds)
            for target in targets:
                row: dict[str, Any] = {"model": name, "target_macs": target, "aa_ratio": aa["ratio"]}
                row["default"] = one_run(path, ["--target-macs", str(target)], work / "default", a.rounds)
                if compare:
                    row["round_to_1"] = one_run(path, ["--target-macs", str(target), "--round-to", "1", "--keep-failed"],
                                                work / "off", a.rounds)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {**environment(), "auto": auto().describe(),
            "slower_tolerance": SLOWER_TOLERANCE, "rounds": a.rounds}
    text = table(rows, meta, compare)
    write_results(a.out / "never_slower", {"meta": meta, "rows": rows}, text)
    print(text)
    return 0


def _ratio(run: dict[str, Any]) -> float | None:
    re = run.get("remeasured")
    return None if re is None else float(re["ratio"])


def _worst(rows: list[dict[str, Any]], key: str) -> str:
    ratios = [_ratio(r[key]) for r in rows if key in r]
    present = [x for x in ratios if x is not None]
    return f" (the slowest {max(present):.2f}x)" if present else ""


def _rounding(run: dict[str, Any]) -> str:
    r = run.get("rounding") or {}
    counts = r.get("pruned_groups_by_multiple") or {}
    return ", ".join(f"{n}x{m}" for m, n in counts.items()) or "-"


def _cell(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"failed: {run['error'][:60]}"
    ratio = _ratio(run)
    written = f"{ratio:.2f}x" if ratio is not None else "not written"
    return f"{written} (tool {run['tool_ratio']:.2f}x, exit {run['exit']})" if run.get("tool_ratio") else written


def table(rows: list[dict[str, Any]], meta: dict[str, Any], compare: bool) -> str:
    ok = [r for r in rows if "error" not in r["default"] and (_ratio(r["default"]) is None or _ratio(r["default"]) <= 1.0)]
    refused = [r for r in rows if not r["default"].get("written") and "error" not in r["default"]]
    lines = [
        "# Never slower (issue 21): the written model against the original, default flags",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_never_slower.py`. Per model, `onnx-prune MODEL --target-macs T` "
        f"with the default flags (`l1`, data-free, `--round-to {meta['auto']}` on this machine, the speed gates on); the "
        f"written file re-measured against the original by the benchmark itself: single-threaded onnxruntime {meta['onnxruntime']} "
        f"sessions, {meta['rounds']} interleaved rounds, median of each, by the calling thread's CPU time (pruned / original: "
        "below 1.00x is faster). The tool's own measurement of the same run in brackets with its exit code (3: a speed gate "
        f"missed, nothing written). A/A: the original timed against itself, the noise the not-slower tolerance "
        f"({meta['slower_tolerance']:.0%}, with the 95% interval above 1) stands above. Zoo models carry seeded random "
        "weights (structure and speed only). Measured on the shared 2-core machine under other jobs' load.",
        "",
        f"**{len(ok)} of {len(rows)}** runs with default flags wrote a model at most 1.00x the original's time"
        + (f" ({len(refused)} refused by the not-slower gate)" if refused else "") + _worst(rows, "default") + ".",
        "",
    ]
    aa = [r["aa_ratio"] for r in rows]
    if aa:
        lines += [f"A/A (the original against itself): {min(aa):.3f}x to {max(aa):.3f}x.", ""]
    if compare:
        off = [r["round_to_1"] for r in rows if "error" not in r["round_to_1"]]
        slower = [o for o in off if (_ratio(o) or 0.0) > 1.0]
        gated = [o for o in slower if o["exit"] == 3]
        lines += [f"With `--round-to 1` (the old default) and `--keep-failed`: {len(slower)} of {len(off)} written models "
                  f"were slower than the original{_worst(rows, 'round_to_1')}; the not-slower gate refused {len(gated)} of "
                  "them (exit 3); the others were within its tolerance or the noise.", ""]
    head = "| model | target MACs | MACs kept | rounding: pruned groups x multiple | default: written / original | A/A |"
    rule = "|---|---:|---:|---|---:|---:|"
    if compare:
        head += " `--round-to 1`: MACs kept | `--round-to 1`: written / original |"
        rule += "---:|---:|"
    lines += [head, rule]
    for r in rows:
        d = r["default"]
        macs = f"{d['macs_kept']:.1%}" if "macs_kept" in d else "-"
        line = f"| {r['model']} | {r['target_macs']:g} | {macs} | {_rounding(d)} | {_cell(d)} | {r['aa_ratio']:.3f}x |"
        if compare:
            o = r["round_to_1"]
            omacs = f"{o['macs_kept']:.1%}" if "macs_kept" in o else "-"
            line += f" {omacs} | {_cell(o)} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
