"""Quantized and half-precision models: which order loses less, and the zoo in QDQ and fp16 form.

    python benchmarks/bench_quantized.py fmnist --out benchmarks/results/quantized_fmnist.md
    python benchmarks/bench_quantized.py zoo --zoo ../shared/zoo --filled /tmp/zoo --out benchmarks/results/quantized_zoo.md \
        --work benchmarks/work/zoo_forms

fmnist: each Fashion-MNIST model is quantized with onnxruntime's ``quantize_static`` (QDQ, per-channel
int8 weights, uint8 activations, 256 seeded training images), then, for each method (l1 and ldrf at
0.5, and the gated search ``ldrf --max-drop 1`` with --eval = training images 2000-4000, bounded by
--search-extra), (a) the QDQ model is pruned (calibration: the first 2,000 training images), (b) the
float model is pruned and the result quantized the same way. Test accuracy on the 10,000 test
images. Rows of models not run are kept from the previous JSON (--methods merges into them).

zoo: every zoo model filled with seeded random weights is converted to QDQ (``quantize_static`` on 8
seeded random inputs, per-channel int8; token ids in [0, 100) and masks of ones for text models) and to fp16 storage (every float32 initializer of 16+
elements stored as float16 and cast to float32 on load: the form that runs for every op), then
pruned with l1 at 0.5 by the CLI: valid or not, and the pruned file's size over the input's. The forms
are cached in --work (made once; zoo_coverage.py reads the same cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.data import fill_zoo, load_split, write_calibration
from lib.measure import failure, prune_cli_keep
from lib.paths import SHARED_MODELS
from lib.quantized import FORMS, quantize, zoo_forms
from lib.results import write_json, write_results, write_text

MODELS = SHARED_MODELS


def accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    hits = 0
    for start in range(0, len(images), 500):
        logits = sess.run(None, {name: images[start : start + 500]})[0]
        hits += int((logits.argmax(axis=1) == labels[start : start + 500]).sum())
    return hits / len(images)


#: the gated search of bench_search.py (ldrf, --max-drop 1, probes on --eval), bounded for a shared machine
SEARCH = "search"
SEARCH_ARGS = ("--method", "ldrf", "--max-drop", "1", "--keep-failed")


def _args(method: str, calib: Path, evaluation: Path, search_extra: list[str]) -> list[str]:
    if method == SEARCH:
        return [*SEARCH_ARGS, "--calib", str(calib), "--eval", str(evaluation), "--no-latency", *search_extra]
    args = ["--method", method, "--ratio", "0.5", "--no-latency"]
    return args + (["--calib", str(calib)] if method != "l1" else [])


def fmnist(out: Path, models: list[str], methods: list[str], work: Path, search_extra: list[str]) -> None:
    test_x, test_y = load_split("test")
    train_x, train_y = load_split("train")
    pick = np.random.default_rng(0).choice(len(train_x), 256, replace=False)
    calib_inputs = [{"input": train_x[i : i + 1]} for i in sorted(pick.tolist())]
    previous = {r["model"]: r for r in json.loads(out.with_suffix(".json").read_text())} if out.with_suffix(".json").exists() else {}
    rows: list[dict[str, Any]] = []
    folder = work
    folder.mkdir(parents=True, exist_ok=True)
    calib = write_calibration(folder / "calib.npz", 2000)
    evaluation = folder / "eval_train2000_4000.npz"
    if not evaluation.exists():
        np.savez(evaluation, input=train_x[2000:4000], labels=train_y[2000:4000])
    for name in models:
        src = MODELS / f"{name}.onnx"
        qdq = folder / f"{name}_qdq.onnx"
        quantize(src, qdq, calib_inputs)
        row: dict[str, Any] = {**previous.get(name, {}), "model": name, "float": accuracy(src, test_x, test_y),
                               "qdq": accuracy(qdq, test_x, test_y), "bytes_float": src.stat().st_size, "bytes_qdq": qdq.stat().st_size}
        for method in methods:
            args = _args(method, calib, evaluation, search_extra)
            started = time.perf_counter()
            run, report, pruned = prune_cli_keep(qdq, args, folder / f"{name}_{method}_q", 7200)
            row[f"{method}_q_then_prune"] = None if pruned is None else accuracy(pruned, test_x, test_y)
            row[f"{method}_q_then_prune_s"] = round(time.perf_counter() - started, 1)
            row[f"{method}_q_then_prune_bytes"] = None if pruned is None else pruned.stat().st_size
            row[f"{method}_q_then_prune_macs"] = None if report is None else report["ratios"]["macs"]
            row[f"{method}_q_then_prune_exit"] = run.returncode
            if report is None:
                row[f"{method}_error"] = failure(run)
            elif method == SEARCH:
                row[f"{method}_q_then_prune_probes"] = len(report["extra"]["search"]["probes"])
            started = time.perf_counter()
            run, report, pruned = prune_cli_keep(src, args, folder / f"{name}_{method}_f", 7200)
            row[f"{method}_prune_float_s"] = round(time.perf_counter() - started, 1)
            row[f"{method}_prune_float_exit"] = run.returncode
            if pruned is not None and report is not None:
                requant = folder / f"{name}_{method}_pq.onnx"
                quantize(pruned, requant, calib_inputs)
                row[f"{method}_prune_then_q"] = accuracy(requant, test_x, test_y)
                row[f"{method}_prune_float"] = accuracy(pruned, test_x, test_y)
                row[f"{method}_prune_then_q_bytes"] = requant.stat().st_size
                row[f"{method}_prune_float_macs"] = report["ratios"]["macs"]
                if method == SEARCH:
                    row[f"{method}_prune_float_probes"] = len(report["extra"]["search"]["probes"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        done = rows + [old for n, old in previous.items() if n not in {r["model"] for r in rows}]
        write_results(out, done, _fmnist_table(done, search_extra))  # after every model: a stopped run keeps its rows


def _fmnist_table(rows: list[dict[str, Any]], search_extra: list[str]) -> str:
    lines = ["# Fashion-MNIST models quantized (QDQ int8): prune then quantize, or quantize then prune", "",
             "Each model is quantized with onnxruntime's `quantize_static` (QDQ, per-channel int8 weights, uint8 "
             "activations, 256 seeded training images). Methods: `l1` and `ldrf` at `--ratio 0.5`, and the gated search "
             f"(`{' '.join(SEARCH_ARGS)}`{' ' + ' '.join(search_extra) if search_extra else ''}: calibration TRAIN[:2000], "
             "`--eval` TRAIN[2000:4000], as bench_search.py but bounded) run (a) on the QDQ model, (b) on the float model, "
             "whose result is then quantized the same way. Accuracy on the 10,000 TEST images, which neither the pruning "
             "nor the quantization saw. MACs kept from the tool's report; a search's exit 3 means its final-half gate "
             "was missed (the model is kept with --keep-failed).", "",
             "    python benchmarks/bench_quantized.py fmnist --methods l1 ldrf search --out benchmarks/results/quantized_fmnist.md", "",
             "| model | method | float | QDQ | float pruned | prune, then quantize | quantize, then prune | MACs kept (float / QDQ run) "
             "| QDQ pruned bytes / QDQ bytes | s (float / QDQ run) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for m in ("l1", "ldrf", SEARCH):
            if f"{m}_q_then_prune" not in r and f"{m}_prune_then_q" not in r:
                continue
            qp, pq = r.get(f"{m}_q_then_prune"), r.get(f"{m}_prune_then_q")
            size = r.get(f"{m}_q_then_prune_bytes")
            ratio = "" if size is None else f"{size / r['bytes_qdq']:.2f}"
            fm, qm = r.get(f"{m}_prune_float_macs"), r.get(f"{m}_q_then_prune_macs")
            macs = "" if fm is None and qm is None else f"{_pct(fm)} / {_pct(qm)}"
            label = "search, ldrf --max-drop 1" if m == SEARCH else f"{m} 0.5"
            if m == SEARCH:
                label += f" (exit {r.get(f'{m}_prune_float_exit')} / {r.get(f'{m}_q_then_prune_exit')})"
            secs = f"{r.get(f'{m}_prune_float_s', '')} / {r.get(f'{m}_q_then_prune_s', '')}"
            lines.append(f"| {r['model']} | {label} | {r['float']:.2%} | {r['qdq']:.2%} | {_pct(r.get(f'{m}_prune_float'))} | "
                         f"{_pct(pq)} | {_pct(qp)} | {macs} | {ratio} | {secs} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "error" if value is None else f"{value:.2%}"


def zoo(zoo_dir: Path, filled: Path, out: Path, only: list[str], work: Path) -> None:
    fill_zoo(zoo_dir, filled)
    rows: list[dict[str, Any]] = []
    models = sorted(filled.glob("*.onnx"), key=lambda p: (p.stat().st_size, p.name))  # small first
    if only:
        models = [p for p in models if p.stem in only]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for path in models:
            row: dict[str, Any] = {"model": path.stem}
            forms, errors = zoo_forms(path, work)
            row.update({f"{form}_error": e for form, e in errors.items()})
            for form, src in forms.items():
                run, report, pruned = prune_cli_keep(src, ["--method", "l1", "--ratio", "0.5", "--no-latency"], folder / form, 900)
                if report is None or pruned is None:
                    row[f"{form}_error"] = failure(run)
                    continue
                row[f"{form}_ratio"] = round(pruned.stat().st_size / src.stat().st_size, 3)
                row[f"{form}_params"] = (report["before"]["params"], report["after"]["params"])
                row[f"{form}_s"] = run.seconds
                pruned.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
            _zoo_table(rows, out)  # after every model: a long run stopped early keeps its rows


#: why 7 of 41 QDQ zoo models barely shrank before (file kept at l1 0.5 then: deit 0.97, levit 0.99, densenet121
#: 1.00, repvgg 0.80, convmixer 1.00, convnext 0.89, swin 0.86), each fixed in graph/qdq.py or ops
FINDINGS = """## Why 7 QDQ models barely shrank, and the fixes

Before (file kept at l1 0.5): deit 0.97, levit 0.99, densenet121 1.00, repvgg 0.80, convmixer 1.00, convnext 0.89,
swin 0.86. Three forms of `quantize_static`'s output left weights as non-constants, so the ops reading them froze:

* **QuantizeLinear of a constant** (deit, levit, convmixer, convnext, swin): the bias of a MatMul + Add layer, and
  an exporter's Identity alias of a shared initializer, are quantized like activations, `DQ(Q(float constant))`;
  the DequantizeLinear's input was not a constant, so each Add / BatchNormalization froze ("an untraced operand
  has a channel dimension", "per-channel parameters are not constants"). Fix (`graph/qdq.py`
  `_fold_constant_quantize`): the Q of a constant folds to the integers it computes (round half to even,
  saturated, per tensor or per axis), and the pair is a weight like any other; export writes those integers.
* **a [1] scale with a scalar zero point** (densenet121, repvgg, levit, swin, convmixer): onnxruntime's int32 bias
  of a BatchNormalization / Add; rejected as "not per-tensor or per-axis". Fix: one scale of any shape is per tensor.
* **an Identity alias between a folded DequantizeLinear and a QuantizeLinear** (densenet121: BN parameters shared
  across layers): the alias was resolved only after the one folding pass. Fix: passes repeat until nothing folds.
* **a class token behind an activation Q/DQ pair** (deit): the Concat with `Expand(cls_token)` no longer saw the
  constant. Fix (`ops/quant.through_activation_qdq`, used by `ops/attention.constant_like`): per-tensor pairs are
  looked through.

Tests beside the rules (zero-channel oracles, outputs unchanged to float32 tolerance): `ops/test_quant.py`
`test_a_quantized_constant_bias_of_an_add_prunes_with_its_matmul` (opsets 13, 21),
`test_shared_batchnorm_parameters_behind_identity_aliases_prune`, and `ops/test_attention.py`
`test_class_token_and_a_dynamic_flatten_follow_the_hidden_size[True]`; each fails before the fix.
"""


def from_coverage(coverage: Path, out: Path) -> None:
    """The zoo table from zoo_coverage.py's JSON (the same forms and runs: one run of the zoo, not two)."""
    rows: list[dict[str, Any]] = []
    for r in json.loads(coverage.read_text()):
        row: dict[str, Any] = {"model": r["model"]}
        for form in FORMS:
            if f"{form}_file_kept" in r:
                row[f"{form}_ratio"] = round(r[f"{form}_file_kept"], 3)
                row[f"{form}_params"] = r.get(f"{form}_params")
                row[f"{form}_s"] = r.get(f"{form}_seconds")
            elif f"{form}_error" in r:
                row[f"{form}_error"] = r[f"{form}_error"]
        rows.append(row)
    _zoo_table(rows, out, f"zoo_coverage.py (its JSON: {coverage.name})")


def _zoo_table(rows: list[dict[str, Any]], out: Path, source: str = "") -> None:
    write_json(out.with_suffix(".json"), rows)
    lines = ["# The zoo in QDQ int8 and fp16 form, pruned with l1 0.5", "",
             "Every zoo model (seeded random weights) as QDQ int8 (`quantize_static`, per-channel int8 weights, 8 seeded "
             "inputs) and as fp16 storage, pruned with `l1 --ratio 0.5 --no-latency` and validated (full checker, strict "
             "shape inference, onnxruntime). Size = the pruned model's serialized size over its input's."
             + (f" Rows from {source}." if source else ""), "",
             "    python benchmarks/zoo_coverage.py --work benchmarks/work/zoo_forms   # the runs",
             "    python benchmarks/bench_quantized.py zoo --from-coverage benchmarks/results/zoo_coverage.json", "",
             "| model | QDQ l1 0.5 | QDQ size after / before | fp16 l1 0.5 | fp16 size after / before |", "|---|---|---:|---|---:|"]
    for r in rows:
        cells = []
        for form in ("qdq", "fp16"):
            if f"{form}_ratio" in r:
                cells += ["valid", f"{r[f'{form}_ratio']:.2f}"]
            else:
                cells += [f"error: {r.get(f'{form}_error', '?')}", ""]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    for form in ("qdq", "fp16"):
        ok = [r[f"{form}_ratio"] for r in rows if f"{form}_ratio" in r]
        if ok:
            lines.append(f"\n{form}: {len(ok)}/{len(rows)} valid; size ratio median {np.median(ok):.2f}, "
                         f"at most {max(ok):.2f}; {sum(1 for v in ok if v <= 0.75)} at least 25% smaller")
    write_text(out, "\n".join(lines) + "\n\n" + FINDINGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fmnist")
    f.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_fmnist.md"))
    f.add_argument("--models", nargs="*", default=["fmnist_resnet56", "fmnist_vgg_slim_bn"])
    f.add_argument("--methods", nargs="*", default=["l1", "ldrf", SEARCH])
    f.add_argument("--work", type=Path, default=Path("benchmarks/work/quantized_fmnist"))
    f.add_argument("--search-extra", default="--sensitivity-ratios 0.5 --max-probes 6",
                   help="flags added to the search's command line (bounds its probes)")
    z = sub.add_parser("zoo")
    z.add_argument("--zoo", type=Path, default=Path("../shared/zoo"))
    z.add_argument("--filled", type=Path, default=Path("/tmp/zoo"))
    z.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_zoo.md"))
    z.add_argument("--only", nargs="*", default=[])
    z.add_argument("--work", type=Path, default=Path("benchmarks/work/zoo_forms"), help="cache of the QDQ and fp16 forms")
    z.add_argument("--from-coverage", type=Path, help="write the table from zoo_coverage.py's JSON instead of running")
    args = parser.parse_args()
    if args.what == "fmnist":
        fmnist(args.out, args.models, args.methods, args.work, args.search_extra.split())
    else:
        if args.from_coverage:
            from_coverage(args.from_coverage, args.out)
        else:
            zoo(args.zoo, args.filled, args.out, args.only, args.work)


if __name__ == "__main__":
    main()
