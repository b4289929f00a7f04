"""Prune every zoo model with l1 at 0.5: validity, size figures, and the tool's time and peak memory.

    python benchmarks/zoo_coverage.py --zoo ../shared/zoo --filled /tmp/zoo --out benchmarks/results/zoo_coverage.md

Models are filled with seeded random weights by the zoo's fill.py (once, into --filled).
Each model runs in a subprocess (the CLI: load, trace, apply, validate, write) with a time
limit, so one failure cannot stop the table; its wall time and its own peak RSS are measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import failure, prune_cli  # noqa: E402


def fill(zoo: Path, filled: Path) -> None:
    filled.mkdir(parents=True, exist_ok=True)
    for src in sorted(zoo.glob("*.onnx")):
        dst = filled / src.name
        if not dst.exists():
            subprocess.run([sys.executable, str(zoo / "fill.py"), str(src), str(dst), "--seed", "0"], check=True)


def one(model: Path, method: str, ratio: float, timeout: int) -> dict:
    run, data = prune_cli(model, ["--method", method, "--ratio", str(ratio)], timeout)
    row: dict = {"model": model.stem, "seconds": round(run.seconds, 1), "peak_mib": run.peak_mib}
    if data is None:
        row["error"] = failure(run)
        return row
    row.update(
        params_before=data["before"]["params"], params_after=data["after"]["params"],
        macs_before=data["before"]["macs"], macs_after=data["after"]["macs"],
        groups=len(data["groups"]), frozen=sum(1 for g in data["groups"] if g["prunable"] == 0),
        cosine=data["verdict"]["cosine"],
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | params before | params after | kept | MACs before | MACs after | kept | groups | frozen | s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | | {r['seconds']} | {r.get('peak_mib', '')} |")
            continue
        pk = r["params_after"] / r["params_before"]
        mk = r["macs_after"] / max(r["macs_before"], 1)
        lines.append(
            f"| {r['model']} | {r['params_before']:,} | {r['params_after']:,} | {pk:.0%} | {r['macs_before']:,} | "
            f"{r['macs_after']:,} | {mk:.0%} | {r['groups']} | {r['frozen']} | {r['seconds']} | {r.get('peak_mib', '')} |"
        )
    ok = [r for r in rows if "error" not in r]
    quarter = [r for r in ok if r["params_after"] <= 0.75 * r["params_before"]]
    lines.append("")
    lines.append(f"{len(ok)}/{len(rows)} valid; {len(quarter)}/{len(rows)} lose at least a quarter of their parameters.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "zoo")
    ap.add_argument("--filled", type=Path, default=Path("/tmp/zoo"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "zoo_coverage.md")
    ap.add_argument("--method", default="l1")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args()
    fill(a.zoo, a.filled)
    rows = []
    for model in sorted(a.filled.glob("*.onnx")):
        if model.name.count(".") > 1 or (a.only and model.stem not in a.only):
            continue
        rows.append(one(model, a.method, a.ratio, a.timeout))
        print(json.dumps(rows[-1]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(markdown(rows) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))  # read by peers_zoo.py
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
