"""Prune every zoo model with l1 at 0.5: validity, size figures, and the tool's time and peak memory.

    python benchmarks/zoo_coverage.py --zoo ../shared/zoo --filled /tmp/zoo --out benchmarks/results/zoo_coverage.md \
        --work benchmarks/work/zoo_forms

Models are filled with seeded random weights by the zoo's fill.py (once, into --filled).
Each model runs in a subprocess (the CLI: load, trace, apply, validate, write) with a time
limit, so one failure cannot stop the table; its wall time and its own peak RSS are measured.

Each model is also pruned (same method and ratio, ``--no-latency``) in its QDQ int8 form
(onnxruntime's ``quantize_static`` on 8 seeded inputs, per-channel int8 weights) and its fp16 form
(float32 initializers stored as float16, cast on load), both made by lib/quantized.py (as bench_quantized.py
makes them) and cached in --work: valid or not and the serialized size kept. For transformers (groups whose
report `part` is heads or hidden) the channels kept of the float run's heads, FFN and hidden
groups are columns of a second table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lib.data import fill_zoo
from lib.measure import failure, prune_cli, verdict_cosine
from lib.paths import FILLED, RESULTS, WORK, ZOO
from lib.quantized import FORMS, zoo_forms
from lib.results import write_results

#: the zoo's transformer / attention models (the second table)
TRANSFORMERS = ("hf_", "hfdyn_", "deit", "swin", "levit", "mobilevit", "efficientformer")


def parts_kept(groups: list[dict]) -> dict[str, list[int]]:
    """Channels [kept, total] of each transformer part (the report's group `part`: heads, ffn, hidden)."""
    out: dict[str, list[int]] = {}
    for g in groups:
        kept = out.setdefault(g.get("part", "ffn"), [0, 0])
        kept[0] += g["kept"]
        kept[1] += g["size"]
    return out


def one(model: Path, method: str, ratio: float, timeout: int, work: Path | None = None) -> dict:
    run, data = prune_cli(model, ["--method", method, "--ratio", str(ratio)], timeout)
    row: dict = {"model": model.stem, "seconds": round(run.seconds, 1), "peak_mib": run.peak_mib}
    if data is None:
        row["error"] = failure(run)
    else:
        row.update(
            params_before=data["before"]["params"], params_after=data["after"]["params"],
            macs_before=data["before"]["macs"], macs_after=data["after"]["macs"],
            groups=len(data["groups"]), frozen=sum(1 for g in data["groups"] if g["prunable"] == 0),
            cosine=verdict_cosine(data["verdict"]), parts=parts_kept(data["groups"]),
        )
    if work is None:
        return row
    forms, errors = zoo_forms(model, work)
    for form, err in errors.items():
        row[f"{form}_error"] = err
    for form, src in forms.items():
        run, data = prune_cli(src, ["--method", method, "--ratio", str(ratio), "--no-latency"], timeout)
        row[f"{form}_seconds"] = round(run.seconds, 1)
        if data is None:
            row[f"{form}_error"] = failure(run)
            continue
        row[f"{form}_file_kept"] = data["ratios"]["file_bytes"]
        row[f"{form}_params"] = (data["before"]["params"], data["after"]["params"])
    return row


def _form_cells(r: dict) -> str:
    cells = []
    for form in FORMS:
        if f"{form}_file_kept" in r:
            cells += ["valid", f"{r[f'{form}_file_kept']:.0%}"]
        elif f"{form}_error" in r:
            cells += [f"error: {r[f'{form}_error']}", ""]
        else:
            cells += ["", ""]
    return " | ".join(cells)


INTRO = (
    "Every model of `../shared/zoo` (seeded random weights from `fill.py`) pruned with `l1 --ratio 0.5` and validated "
    "(full checker, strict shape inference, onnxruntime), as float32, as QDQ int8 (`quantize_static`, per-channel int8 "
    "weights, 8 seeded inputs) and as fp16 storage. Random weights: structure, not accuracy. File kept = the pruned "
    "model's serialized size over its input's.\n\n"
    "    python benchmarks/zoo_coverage.py --zoo ../shared/zoo --filled /tmp/zoo --work benchmarks/work/zoo_forms "
    "--out benchmarks/results/zoo_coverage.md\n"
)


def markdown(rows: list[dict], minutes: float | None = None) -> str:
    lines = [
        INTRO,
        "| model | params before | params after | kept | MACs before | MACs after | kept | groups | frozen | s | peak MiB "
        "| QDQ int8 | QDQ file kept | fp16 | fp16 file kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | | {r['seconds']} | {r.get('peak_mib', '')} | "
                         f"{_form_cells(r)} |")
            continue
        pk = r["params_after"] / r["params_before"]
        mk = r["macs_after"] / max(r["macs_before"], 1)
        lines.append(
            f"| {r['model']} | {r['params_before']:,} | {r['params_after']:,} | {pk:.0%} | {r['macs_before']:,} | "
            f"{r['macs_after']:,} | {mk:.0%} | {r['groups']} | {r['frozen']} | {r['seconds']} | {r.get('peak_mib', '')} | "
            f"{_form_cells(r)} |"
        )
    ok = [r for r in rows if "error" not in r]
    quarter = [r for r in ok if r["params_after"] <= 0.75 * r["params_before"]]
    lines.append("")
    lines.append(f"{len(ok)}/{len(rows)} valid; {len(quarter)}/{len(rows)} lose at least a quarter of their parameters.")
    for form, label in zip(FORMS, ("QDQ int8", "fp16")):
        done = [r[f"{form}_file_kept"] for r in rows if f"{form}_file_kept" in r]
        tried = [r for r in rows if f"{form}_file_kept" in r or f"{form}_error" in r]
        if tried:
            small = sum(1 for v in done if v <= 0.75)
            lines.append(f"{label}: {len(done)}/{len(tried)} valid; {small}/{len(tried)} files at least 25% smaller"
                         + (f" (file kept: median {sorted(done)[len(done) // 2]:.0%}, at most {max(done):.0%})." if done else "."))
    tf = [r for r in rows if any(k in r["model"] for k in TRANSFORMERS) and "parts" in r]
    if tf:
        lines += ["", "Transformers and attention models (float run): channels kept of each part, "
                  "kept / total over the groups of that part (heads: attention heads; hidden: the residual stream).", "",
                  "| model | params kept | heads kept | FFN kept | hidden kept |", "|---|---:|---:|---:|---:|"]
        for r in tf:
            cells = []
            for part in ("heads", "ffn", "hidden"):
                k = r["parts"].get(part)
                cells.append("-" if not k else f"{k[0]:,}/{k[1]:,} ({k[0] / k[1]:.0%})")
            lines.append(f"| {r['model']} | {r['params_after'] / r['params_before']:.0%} | " + " | ".join(cells) + " |")
    if minutes is not None:
        lines += ["", f"Whole run: {minutes:.0f} min wall on a shared 2-core machine (forms already cached; making them "
                  "the first time adds about a minute per large model)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=ZOO)
    ap.add_argument("--filled", type=Path, default=FILLED)
    ap.add_argument("--out", type=Path, default=RESULTS / "zoo_coverage.md")
    ap.add_argument("--method", default="l1")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--work", type=Path, default=WORK / "zoo_forms",
                    help="cache of the QDQ and fp16 forms (made once)")
    ap.add_argument("--no-forms", action="store_true", help="only the float models")
    a = ap.parse_args()
    fill_zoo(a.zoo, a.filled)
    started = time.perf_counter()
    rows = []
    for model in sorted(a.filled.glob("*.onnx")):
        if model.name.count(".") > 1 or (a.only and model.stem not in a.only):
            continue
        rows.append(one(model, a.method, a.ratio, a.timeout, None if a.no_forms else a.work))
        print(json.dumps(rows[-1]), flush=True)
    write_results(a.out, rows, markdown(rows, (time.perf_counter() - started) / 60))  # the JSON is read by peers_zoo.py
    print(markdown(rows, (time.perf_counter() - started) / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
