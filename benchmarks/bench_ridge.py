"""Ridge of the least-squares refit vs calibration size: old (near zero, toward zero) vs row-scaled toward plain pruning.

    python benchmarks/bench_ridge.py                              # the table of benchmarks/results/ridge.md
    python benchmarks/bench_ridge.py --models fmnist_lenet300 --counts 16,64 --variants old,new,c=0.3

Fashion-MNIST: calibration on the first N TRAIN images (`fmnist.write_calibration`, then
``calib_samples=N`` and ``holdout=0``: all N are fitted, none kept back for the verdict),
accuracy on the full 10,000-image TEST split (held out) and on the N calibration images
themselves (seen while fitting: the overfitting shows as the gap).
Variants of the refit (`methods.reconstruct`, module docstring):

* ``old``: ``alpha = 1e-6`` and a zero prior, the refit before the row-scaled ridge
  (``DEFAULT_RIDGE_ROWS = 0`` and ``fit`` called without the prior);
* ``new``: the defaults, ``alpha = ridge + c * dim / rows`` toward plain pruning ``W0``;
* ``c=X``: the same with ``c = X`` (the sweep that chose `DEFAULT_RIDGE_ROWS`);
* ``norefit``: the selection alone (``params["reconstruct"] = False``);
* ``<variant>+rowsel``: with LDRF's selection solves at the refit's row-scaled alpha
  (``ridge + c * dim / rows``, dim the consumer's whole input) instead of the base alpha: the
  measurement behind `datadriven._selection_alpha`; thinet and cp select without solves.

The settings are module constants patched in this process (they are not user options).
Statistics are cached in a private directory, so variants of one (model, method, N) share
the selection's Gram matrices. Results go to benchmarks/results/ridge.{md,json}, rewritten
after every run; ``--resume`` keeps runs already measured.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lib.data import load_split, write_calibration
from lib.internals import datadriven
from lib.internals import reconstruct as rc
from lib.paths import RESULTS, SHARED_MODELS
from lib.results import write_results
from lib.runtime import accuracy
from onnxslim_prune import prune

log = logging.getLogger("bench_ridge")

#: (model, method, calibration sizes): 2000 samples only where it is affordable (ResNet-56 ldrf ~2 min a run)
PLAN = (
    ("fmnist_resnet56", "ldrf", (16, 64, 256, 2000)),
    ("fmnist_resnet56", "thinet", (16, 64, 256)),
    ("fmnist_lenet300", "ldrf", (16, 64, 256, 2000)),
    ("fmnist_lenet300", "thinet", (16, 64, 256, 2000)),
)
VARIANTS = ("old", "new", "norefit")
NEW_C = rc.DEFAULT_RIDGE_ROWS
OLD_FIT = rc.fit
SELECTION_ALPHA = datadriven._selection_alpha
#: fit on all N samples (the test split is the held-out measure): no verdict hold-out where `prune` has one
HOLDOUT: dict[str, Any] = {"holdout": 0.0} if "holdout" in inspect.signature(prune).parameters else {}


@contextlib.contextmanager
def refit_variant(label: str) -> Iterator[dict[str, Any]]:
    """Patch `methods.reconstruct` (and LDRF's selection) for `label`; yields the extra `params` of ``prune``."""
    saved = rc.DEFAULT_RIDGE_ROWS
    if label.endswith("+rowsel"):  # LDRF's selection solves with the refit's row-scaled alpha
        label = label.removesuffix("+rowsel")

        def row_scaled(ctx: Any, layer: rc.Layer, dim: int, s: rc.Settings) -> float:
            planned = rc.layer_rows(ctx, layer, s.positions)
            return rc.ridge_alpha(s.ridge, dim, None if planned is None else planned[0], s.ridge_rows)

        datadriven._selection_alpha = row_scaled  # type: ignore[assignment]
    try:
        if label == "old":
            rc.DEFAULT_RIDGE_ROWS = 0.0

            def zero_prior(acc: Any, intercept: bool, ridge: float, energy: float | None, prior: Any = None,
                           per_row: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
                return OLD_FIT(acc, intercept, ridge, energy)

            rc.fit = zero_prior  # type: ignore[assignment]
            yield {}
        elif label.startswith("c="):
            rc.DEFAULT_RIDGE_ROWS = float(label[2:])
            yield {}
        elif label == "new":
            rc.DEFAULT_RIDGE_ROWS = NEW_C
            yield {}
        elif label == "norefit":
            yield {"reconstruct": False}
        else:
            raise SystemExit(f"unknown variant {label!r}")
    finally:
        rc.DEFAULT_RIDGE_ROWS = saved
        rc.fit = OLD_FIT  # type: ignore[assignment]
        datadriven._selection_alpha = SELECTION_ALPHA  # type: ignore[assignment]


def canonical(label: str) -> str:
    """``c=X`` with X the default c is ``new`` (the same code path)."""
    base, plus, rest = label.partition("+")
    if base.startswith("c=") and float(base[2:]) == NEW_C:
        base = "new"
    return base + plus + rest


def settings(label: str) -> dict[str, Any]:
    """What `label` runs: c, prior of the refit, alpha of LDRF's selection."""
    base = label.removesuffix("+rowsel")
    c = 0.0 if base == "old" else (float(base[2:]) if base.startswith("c=") else NEW_C)
    return {"c": None if base == "norefit" else c, "prior": "zero" if base == "old" else ("none" if base == "norefit" else "W0"),
            "selection_alpha": "ridge + c dim / rows" if label.endswith("+rowsel") else "ridge"}


def label_of(row: dict[str, Any]) -> str:
    """A stored row's label under the current default c (from its recorded settings)."""
    if "prior" not in row:
        return canonical(row["variant"])
    base = {"zero": "old", "none": "norefit"}.get(row["prior"]) or canonical(f"c={row['c']:g}")
    return base + ("+rowsel" if row["selection_alpha"] != "ridge" else "")


def one(model: str, path: Path, method: str, ratio: float, count: int, label: str, calib: Path,
        test: tuple[np.ndarray, np.ndarray], seen: tuple[np.ndarray, np.ndarray], batch_size: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "method": method, "ratio": ratio, "samples": count, "variant": label, **settings(label)}
    started = time.perf_counter()
    try:
        with refit_variant(label) as params:
            result = prune(path, method, ratio, calib=calib, calib_samples=count, batch_size=batch_size, params=params,
                               **HOLDOUT)
    except Exception as exc:  # a failing run is a row, not the end of the table
        row.update(error=f"{type(exc).__name__}: {exc}"[:300], seconds=round(time.perf_counter() - started, 1))
        log.debug("%s", traceback.format_exc())
        return row
    row.update(
        seconds=round(time.perf_counter() - started, 1),
        accuracy=accuracy(result.model, *test),
        seen_accuracy=accuracy(result.model, seen[0][:count], seen[1][:count]),
        notes=[n for n in result.report.notes if n.startswith("reconstruction:")],
    )
    return row


def markdown(rows: list[dict[str, Any]], baselines: dict[str, float], variants: list[str], ratio: float) -> str:
    lines = [
        "# Ridge of the least-squares refit vs calibration size (Fashion-MNIST)",
        "",
        f"Ratio {ratio:g}. Calibration: the first N TRAIN images; accuracy (%) on the 10,000-image TEST split, "
        "and in brackets on the N calibration images themselves (seen while fitting). "
        f"`old`: alpha = 1e-6 toward zero weights (before); `new`: alpha = ridge + c * dim / rows toward plain "
        f"pruning, c = {NEW_C:g} (the default); `c=X`: the same with another c; `norefit`: the selection alone "
        "(`--no-reconstruct`); `+rowsel`: LDRF's selection solves with the refit's row-scaled alpha instead of the "
        "base alpha (rejected). An empty cell was not measured. Generated by `benchmarks/bench_ridge.py`.",
        "",
    ]
    keys = list(dict.fromkeys((r["model"], r["method"], r["samples"]) for r in rows))

    def acc(key: tuple[str, str, int], v: str) -> float | None:
        hit = next((r for r in rows if (r["model"], r["method"], r["samples"], r["variant"]) == (*key, v)), None)
        return None if hit is None or "accuracy" not in hit else 100 * float(hit["accuracy"])

    lines += ["| model | method | N | old | new | norefit | new - old | new - norefit |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in keys:
        old, new, bare = acc(key, "old"), acc(key, "new"), acc(key, "norefit")
        cells = ["" if a is None else f"{a:.2f}" for a in (old, new, bare)]
        cells += ["" if a is None or new is None else f"{new - a:+.2f}" for a in (old, bare)]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    lines += [
        "", "All variants (in brackets: accuracy on the N calibration images):", "",
        "| model | method | N | " + " | ".join(variants) + " |",
        "|---|---|---:|" + "---:|" * len(variants),
    ]
    for model, method, count in keys:
        cells = []
        for v in variants:
            hit = next((r for r in rows if (r["model"], r["method"], r["samples"], r["variant"]) == (model, method, count, v)), None)
            if hit is None:
                cells.append("")
            elif "error" in hit:
                cells.append("error")
            else:
                cells.append(f"{100 * hit['accuracy']:.2f} ({100 * hit['seen_accuracy']:.0f})")
        lines.append(f"| {model} | {method} | {count} | " + " | ".join(cells) + " |")
    lines += ["", "Original models: " + ", ".join(f"{m} {100 * a:.2f}%" for m, a in baselines.items()) + ".", ""]
    notes = {(r["model"], r["method"], r["samples"]): r["notes"][0] for r in rows if r.get("notes")}
    if notes:
        lines += ["Warnings of the runs (one per reconstruction):", ""]
        lines += [f"- {m} {meth} N={n}: {text}" for (m, meth, n), text in notes.items()]
        lines.append("")
    errors = [r for r in rows if "error" in r]
    lines += [f"- error: {r['model']} {r['method']} N={r['samples']} {r['variant']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=SHARED_MODELS)
    parser.add_argument("--models", default=None, help="comma-separated (default: those of PLAN)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: those of PLAN)")
    parser.add_argument("--counts", default=None, help="comma-separated calibration sizes (default: those of PLAN)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib", type=Path, default=Path("/tmp/onnxslim_bench/fmnist_train2000.npz"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "ridge")
    parser.add_argument("--resume", action="store_true", help="keep runs already in the JSON")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON; run nothing")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("ONNXSLIM_PRUNE_CACHE", "/tmp/onnxslim_bench/ridge_cache")

    variants = [canonical(v) for v in args.variants.split(",")]
    plan = [
        (model, method, tuple(int(c) for c in args.counts.split(",")) if args.counts else counts)
        for model, method, counts in PLAN
        if (args.models is None or model in args.models.split(",")) and (args.methods is None or method in args.methods.split(","))
    ]
    calib = write_calibration(args.calib, 2000)
    test = load_split("test")
    seen = load_split("train", 2000)

    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    state: dict[str, Any] = {"rows": [], "baselines": {}}
    if (args.resume or args.table_only) and json_path.exists():
        state = json.loads(json_path.read_text())
        for r in state["rows"]:
            r["variant"] = label_of(r)
    key = ("model", "method", "samples", "variant")
    done = {tuple(r[k] for k in key) for r in state["rows"] if "error" not in r}
    state["rows"] = [r for r in state["rows"] if tuple(r[k] for k in key) in done]
    def write() -> None:
        order = {(m, meth): i for i, (m, meth, _) in enumerate(PLAN)}
        rows = sorted(state["rows"], key=lambda r: (order.get((r["model"], r["method"]), 99), r["samples"]))
        shown = list(dict.fromkeys(variants + [r["variant"] for r in rows]))
        write_results(args.out, state, markdown(rows, state["baselines"], shown, args.ratio))

    for model, method, counts in [] if args.table_only else plan:
        path = args.models_dir / f"{model}.onnx"
        if model not in state["baselines"]:
            state["baselines"][model] = accuracy(onnx.load(str(path)), *test)
        for count in counts:
            for label in variants:
                if (model, method, count, label) in done:
                    continue
                row = one(model, path, method, args.ratio, count, label, calib, test, seen, args.batch_size)
                state["rows"].append(row)
                log.info("%s %s N=%d %s: %s (%ss)", model, method, count, label,
                         f"{100 * row['accuracy']:.2f}%" if "accuracy" in row else row.get("error"), row["seconds"])
                write()
    write()
    log.info("wrote %s and %s", md_path, json_path)


if __name__ == "__main__":
    main()
