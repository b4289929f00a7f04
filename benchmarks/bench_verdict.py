"""Does the tool's held-out verdict agree with the same figures measured on data it never saw?

    python benchmarks/bench_verdict.py                       # 4 models x 4 methods x 2 ratios x configs a, b (+ c)
    python benchmarks/bench_verdict.py --models fmnist_lenet300 --configs a
    python benchmarks/bench_verdict.py --resume              # keep runs already in the JSON

Every run is ``onnx-prune MODEL --method M --ratio R --report R.json --no-latency --batch-size 256``
in a fresh process (`measure.prune_cli_keep`), the CLI of the library as committed at
``--library-commit`` (exported once into benchmarks/work/verdict/lib, put first on PYTHONPATH and run
from benchmarks/work/verdict, so concurrent edits of the working tree do not change a run half-way):

    a  --calib train[:2000]                          the tool holds out its default 20% (400 samples):
                                                     verdict = top-1 agreement and correlation
    b  --calib train[:2000] --eval train[2000:4000]  all 2,000 calibration samples fitted; verdict on
                                                     the 2,000 labelled --eval samples, with the accuracy drop
    c  --calib test[:2000] --eval test[2000:4000]    (extra) the same as b with the tool's data drawn from the
                                                     distribution of the independent figure

Independently, the benchmark runs the original and the written model with onnxruntime on the 10,000
TEST images (config c: test[4000:10000], the part it never saw) and computes, in float64 with numpy
(not the tool's accumulator):

    top-1 agreement  mean_i [argmax a_i == argmax b_i]
    correlation      <a - mean_i a, b - mean_i b> / (|a - mean_i a| |b - mean_i b|), all samples flattened
                     (verdict.py's sample-centred correlation; the models have one output, so it is the worst)
    accuracy drop    100 (acc(original) - acc(pruned)) in points

and the same on train[4000:14000] (a control: unseen by the tool, but from the models' training set,
as the tool's train-split samples are). Results: benchmarks/results/verdict.{md,json}, rewritten
after every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.data import load_split
from lib.measure import failure, prune_cli_keep
from lib.paths import RESULTS, ROOT, SHARED_MODELS
from lib.paths import WORK as BENCH_WORK
from lib.results import write_results

log = logging.getLogger("bench_verdict")

MODELS_DIR = SHARED_MODELS
MODELS = ("fmnist_lenet300", "fmnist_resnet56", "fmnist_vgg_slim_bn", "fmnist_vit")
METHODS = ("l1", "merge", "thinet", "ldrf")
RATIOS = (0.3, 0.5)
CONFIGS = {
    "a": "--calib train[:2000], default --holdout 0.2 (400 held out)",
    "b": "--calib train[:2000] --eval train[2000:4000] (2,000 labelled)",
    "c": "--calib test[:2000] --eval test[2000:4000] (2,000 labelled; independent figure on test[4000:10000])",
}
WORK = BENCH_WORK / "verdict"
BATCH = 500
Z95 = 1.959963984540054


# ---------------------------------------------------------------------------------------------
# data and library

def data_files(work: Path) -> dict[str, Path]:
    """The calibration / eval .npz files (`input`, `labels`), written once into `work`."""
    slices = {"train0_2000": ("train", 0, 2000), "train2000_4000": ("train", 2000, 4000),
              "test0_2000": ("test", 0, 2000), "test2000_4000": ("test", 2000, 4000)}
    out = {}
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (split, lo, hi) in slices.items():
        path = work / f"{name}.npz"
        if not path.exists():
            if split not in cache:
                cache[split] = load_split(split)  # type: ignore[arg-type]
            x, y = cache[split]
            work.mkdir(parents=True, exist_ok=True)
            np.savez(path, input=x[lo:hi], labels=y[lo:hi])
            log.info("wrote %s (%s[%d:%d])", path, split, lo, hi)
        out[name] = path
    return out


def config_args(config: str, files: dict[str, Path]) -> list[str]:
    if config == "a":
        return ["--calib", str(files["train0_2000"])]
    if config == "b":
        return ["--calib", str(files["train0_2000"]), "--eval", str(files["train2000_4000"])]
    if config == "c":
        return ["--calib", str(files["test0_2000"]), "--eval", str(files["test2000_4000"])]
    raise ValueError(config)


def export_library(commit: str, work: Path) -> tuple[Path, str]:
    """``onnxslim_prune`` as committed in `commit`, exported (git archive) into ``work/lib/<sha>``."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], capture_output=True, text=True, check=True).stdout.strip()
    target = work / "lib" / sha[:12]
    if not (target / "onnxslim_prune" / "cli.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "onnxslim_prune"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, sha


def library_env(lib: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(lib) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import os, onnxslim_prune; print(os.path.dirname(os.path.abspath(onnxslim_prune.__file__)))"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip()
    if Path(where).resolve() != (lib / "onnxslim_prune").resolve():
        raise SystemExit(f"the CLI children would import {where}, not the exported {lib}")
    return env


def library_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# independent figures

def logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + BATCH]})[0] for i in range(0, len(images), BATCH)])


def figures(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, sample-centred correlation, accuracies and drop of `b` against `a` (float64)."""
    a64, b64 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    da, db = a64 - a64.mean(axis=0), b64 - b64.mean(axis=0)
    saa, sbb = float(np.vdot(da, da)), float(np.vdot(db, db))
    corr = float(np.vdot(da, db)) / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else 0.0
    pa, pb = a.argmax(axis=1), b.argmax(axis=1)
    acc_a, acc_b = float(np.mean(pa == labels)), float(np.mean(pb == labels))
    return {"n": int(len(a)), "top1_agreement": float(np.mean(pa == pb)), "correlation": corr,
            "accuracy_before": acc_a, "accuracy_after": acc_b, "accuracy_drop_points": 100.0 * (acc_a - acc_b)}


def compare(verdict: dict[str, Any], truth: dict[str, float]) -> dict[str, Any]:
    """Gap (verdict - independent) and coverage of each figure the verdict has; top-1 and drop in points."""
    out: dict[str, Any] = {}
    for key, scale in (("top1_agreement", 100.0), ("correlation", 1.0), ("accuracy_drop_points", 1.0)):
        value, ci = verdict.get(key), verdict.get(key.removesuffix("_points") + "_ci95")
        if value is None:
            continue
        t = scale * truth[key]
        out[key] = {"gap": scale * value - t, "inside": None if ci is None else bool(scale * ci[0] - 1e-9 <= t <= scale * ci[1] + 1e-9)}
    return out


# ---------------------------------------------------------------------------------------------
# one run

def one_run(model: str, method: str, ratio: float, config: str, files: dict[str, Path], env: dict[str, str],
            originals: dict[str, dict[str, np.ndarray]], sets: dict[str, tuple[np.ndarray, np.ndarray]],
            batch_size: int, timeout: float) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "method": method, "ratio": ratio, "config": config}
    args = ["--method", method, "--ratio", str(ratio), *config_args(config, files), "--no-latency", "--batch-size", str(batch_size)]
    row["args"] = " ".join(a if not a.endswith(".npz") else Path(a).name for a in args)
    out_dir = WORK / "runs" / f"{model}_{method}_{ratio:g}_{config}"
    run, report, out = prune_cli_keep(MODELS_DIR / f"{model}.onnx", args, out_dir, timeout=timeout, env=env)
    row.update(seconds=run.seconds, peak_mib=run.peak_mib, returncode=run.returncode)
    if report is None or out is None or run.returncode not in (0, 3):
        row["error"] = failure(run)
        return row
    v = report["verdict"]
    row["verdict"] = {k: v.get(k) for k in ("source", "held_out", "samples", "top1_agreement", "top1_agreement_ci95",
                                             "correlation", "correlation_ci95", "spread", "accuracy_before", "accuracy_after",
                                             "accuracy_drop_points", "accuracy_drop_ci95", "imprecise", "degraded")}
    row["params_kept"] = report["after"]["params"] / report["before"]["params"]
    started = time.perf_counter()
    for name in (["test_unseen_c"] if config == "c" else ["test", "train_unseen"]):
        images, labels = sets[name]
        truth = figures(originals[model][name], logits(out, images), labels)
        row.setdefault("independent", {})[name] = truth
        row.setdefault("compare", {})[name] = compare(v, truth)
    row["inference_seconds"] = round(time.perf_counter() - started, 1)
    out.unlink(missing_ok=True)  # keep the report, not the model
    return row


# ---------------------------------------------------------------------------------------------
# summary and markdown

def truth_name(row: dict[str, Any]) -> str:
    return "test_unseen_c" if row["config"] == "c" else "test"


def summary(rows: list[dict[str, Any]], configs: list[str], truth: str | None = None) -> list[dict[str, Any]]:
    out = []
    for config in configs:
        mine = [r for r in rows if r["config"] == config and "compare" in r]
        name = truth or ("test_unseen_c" if config == "c" else "test")
        entry: dict[str, Any] = {"config": config, "against": name, "runs": len(mine)}
        for key in ("top1_agreement", "correlation", "accuracy_drop_points"):
            cmp = [r["compare"][name][key] for r in mine if name in r["compare"] and key in r["compare"][name]]
            if not cmp:
                continue
            gaps = [abs(c["gap"]) for c in cmp]
            entry[key] = {"mean_abs_gap": float(np.mean(gaps)), "max_abs_gap": float(np.max(gaps)),
                          "mean_gap": float(np.mean([c["gap"] for c in cmp])),
                          "inside": sum(bool(c["inside"]) for c in cmp), "of": len(cmp)}
        out.append(entry)
    return out


def _ci_pct(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else f"{100 * v:.1f}"


def _ci_num(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{v:.4f}"


def _ci_pts(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{v:+.2f}"


def _yes(flag: bool | None) -> str:
    return "" if flag is None else ("yes" if flag else "**no**")


def markdown(state: dict[str, Any]) -> str:
    rows, meta = state["rows"], state["meta"]
    configs = [c for c in CONFIGS if any(r["config"] == c for r in rows)]
    lines = [
        "# Does the held-out verdict agree with data the tool never saw? (Fashion-MNIST)",
        "",
        f"Generated by `benchmarks/bench_verdict.py` ({meta['date']}, library as committed at {meta['library_commit'][:12]}, "
        f"sources sha {meta['library_digest']}; {meta['machine']}). Total {meta.get('total_minutes', 0):.1f} min.",
        "",
        "Every run is the CLI in a fresh process: `onnx-prune MODEL --method M --ratio R --report R.json --no-latency "
        "--batch-size 256` plus the configuration's data flags (with `--calib` the least-squares refit is on for every "
        "method, l1 and merge included). The benchmark then runs the original and the written pruned model with "
        "onnxruntime and computes top-1 agreement, the sample-centred correlation (verdict.py's definition; one output, "
        "so it is the worst) and the accuracy drop itself, in float64 numpy, not with the tool's code.",
        "",
        "## What was held out from what",
        "",
        "| data | Fashion-MNIST images | role |",
        "|---|---|---|",
        "| train[:2000] | first 2,000 train images | config a: `--calib`; the tool splits off 400 (seeded, its default "
        "`--holdout 0.2`) for the verdict, fits on 1,600. Config b: `--calib`, all 2,000 fitted |",
        "| train[2000:4000] | next 2,000 train images, labelled | config b: `--eval`, the verdict (accuracy drop too) |",
        "| test | all 10,000 test images | the independent figure for configs a and b |",
        "| train[4000:14000] | 10,000 further train images | control: the same figures on data the tool never saw but the "
        "models were trained on, like the tool's train-split samples |",
    ]
    if "c" in configs:
        lines += [
            "| test[:2000], test[2000:4000] | first 4,000 test images | config c (extra): `--calib` and `--eval` |",
            "| test[4000:10000] | remaining 6,000 test images | the independent figure for config c |",
        ]
    lines += [
        "",
        "The pieces are disjoint: no image is in two of them. None of the tool's samples (fitted or held out) is "
        "in the data of the independent figure. The train-split pieces were, however, in the models' own training "
        "set, and the models are more accurate there than on test:",
        "",
        "| model | accuracy train[:2000] | train[2000:4000] | train[4000:14000] | test |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, acc in meta.get("original_accuracy", {}).items():
        lines.append(f"| {model} | {100 * acc['train0_2000']:.2f}% | {100 * acc['train2000_4000']:.2f}% | "
                     f"{100 * acc['train_unseen']:.2f}% | {100 * acc['test']:.2f}% |")
    if "c" in configs and meta.get("test_slices"):
        lines += ["", "Config c's pieces of the test split (original model's accuracy): the tool's --eval slice is not "
                  "an average draw, and every config c run shares it.", "",
                  "| model | test[:2000] | test[2000:4000] (config c --eval) | test[4000:10000] (independent) |", "|---|---:|---:|---:|"]
        for model, acc in meta["test_slices"].items():
            lines.append(f"| {model} | {100 * acc['test0_2000']:.2f}% | {100 * acc['test2000_4000']:.2f}% | "
                         f"{100 * acc['test4000_10000']:.2f}% |")
    lines += ["", "## Summary", "",
              "Gap = verdict minus independent figure; top-1 agreement and accuracy drop in points. "
              "*inside*: the independent figure lies inside the verdict's 95% interval.", "",
              "| config | against | runs | top-1 mean / max abs gap (pts) | top-1 mean signed gap | top-1 inside | "
              "correlation mean / max abs gap | correlation inside | drop mean / max abs gap (pts) | drop mean signed gap | drop inside |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    against_names = {"test": "test (10,000)", "train_unseen": "train[4000:14000] (control)", "test_unseen_c": "test[4000:10000]"}
    for s in summary(rows, configs) + summary(rows, [c for c in configs if c != "c"], "train_unseen"):
        def cell(key: str, digits: int, s: dict[str, Any] = s) -> tuple[str, str, str]:
            e = s.get(key)
            if not e:
                return "–", "–", "–"
            return (f"{e['mean_abs_gap']:.{digits}f} / {e['max_abs_gap']:.{digits}f}", f"{e['mean_gap']:+.{digits}f}",
                    f"{e['inside']}/{e['of']}")
        t, ts, ti = cell("top1_agreement", 2)
        c, _, ci = cell("correlation", 4)
        d, ds, di = cell("accuracy_drop_points", 2)
        lines.append(f"| {s['config']} | {against_names[s['against']]} | {s['runs']} | {t} | {ts} | {ti} | {c} | {ci} | {d} | {ds} | {di} |")
    if meta.get("headline"):
        lines += ["", meta["headline"]]
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        truth = "test_unseen_c" if config == "c" else "test"
        lines += ["", f"## Config {config}: {CONFIGS[config]}", "",
                  f"n: the verdict's samples; *indep.*: the figure on {against_names[truth]}.", "",
                  "| model | method | ratio | params kept | n | top-1 verdict [95%] | indep. | gap | in | "
                  "correlation verdict [95%] | indep. | gap | in |" + (" drop verdict [95%] | indep. | gap | in |" if config != "a" else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|" + ("---:|---:|---:|---|" if config != "a" else "")]
        for r in mine:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['method']} | {r['ratio']:g} | error: {r['error']} |")
                continue
            v, t, cmp = r["verdict"], r["independent"][truth], r["compare"][truth]
            cells = [r["model"], r["method"], f"{r['ratio']:g}", f"{100 * r['params_kept']:.0f}%", str(v["samples"]),
                     _ci_pct(v["top1_agreement"], v["top1_agreement_ci95"]), f"{100 * t['top1_agreement']:.1f}",
                     f"{cmp['top1_agreement']['gap']:+.1f}", _yes(cmp["top1_agreement"]["inside"]),
                     _ci_num(v["correlation"], v["correlation_ci95"]), f"{t['correlation']:.4f}",
                     f"{cmp['correlation']['gap']:+.4f}", _yes(cmp["correlation"]["inside"])]
            if config != "a":
                d = cmp.get("accuracy_drop_points")
                cells += [_ci_pts(v["accuracy_drop_points"], v["accuracy_drop_ci95"]), f"{t['accuracy_drop_points']:+.2f}",
                          "–" if d is None else f"{d['gap']:+.2f}", "" if d is None else _yes(d["inside"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Notes", "",
              "- Configs a and b take the tool's samples from the train split, on which every model was trained and is "
              "more accurate than on test (table above; LeNet-300-100 98.7% against 90.3%). The pruned model keeps "
              "agreeing more often on such samples, so a train-split verdict reads its top-1 agreement a little "
              "high and, where the original is near-perfect on them, its accuracy drop high. The control rows "
              "(train[4000:14000]) separate this shift from the intervals' own calibration: against the same "
              "distribution the intervals cover; against test the narrow 2,000-sample intervals of config b "
              "miss by about the size of the shift. Config c draws the tool's samples from test.",
              "- The independent figure has its own sampling noise: on 10,000 test images a top-1 agreement near 95% is "
              "known to about +-0.4 points (95%), a drop near 2 points to about +-0.3; small against the verdict's "
              "intervals on 400 or 2,000 samples, so *inside* tests the verdict's interval, not the test figure's.",
              same_as_l1(rows),
              "- With 95% intervals about 1 in 20 should miss even when nothing is wrong; the runs are not independent "
              "(the same held-out samples for every method of a model), so misses come in groups.",
              ""]
    return "\n".join(lines)


def same_as_l1(rows: list[dict[str, Any]]) -> str:
    """Note on merge runs whose verdict equals l1's (with --calib both are refitted; merge may merge nothing)."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["model"], r["ratio"], r["config"])

    l1 = {key(r): r for r in rows if r["method"] == "l1" and "verdict" in r}
    same = [r for r in rows if r["method"] == "merge" and "verdict" in r and key(r) in l1
            and abs(r["verdict"]["top1_agreement"] - l1[key(r)]["verdict"]["top1_agreement"]) < 1e-9
            and abs(r["verdict"]["correlation"] - l1[key(r)]["verdict"]["correlation"]) < 1e-6]
    models = sorted({r["model"] for r in same})
    return (f"- With `--calib` both l1 and merge are refitted by least squares, and their figures are close throughout; "
            f"{len(same)} merge runs have l1's verdict to 1e-6 ({', '.join(models) or 'none'}: the tool's notes say merge "
            "merged no channel there and pruned plainly, 'merging would not be exact').")


def headline(rows: list[dict[str, Any]]) -> str:
    parts = []
    for s in summary(rows, [c for c in CONFIGS if any(r["config"] == c for r in rows)]):
        bits = []
        if "top1_agreement" in s:
            e = s["top1_agreement"]
            bits.append(f"top-1 agreement within {e['mean_abs_gap']:.1f} points on average (max {e['max_abs_gap']:.1f}), "
                        f"interval covers {e['inside']}/{e['of']}")
        if "correlation" in s:
            e = s["correlation"]
            bits.append(f"correlation within {e['mean_abs_gap']:.4f} (max {e['max_abs_gap']:.4f}), covers {e['inside']}/{e['of']}")
        if "accuracy_drop_points" in s:
            e = s["accuracy_drop_points"]
            bits.append(f"accuracy drop within {e['mean_abs_gap']:.2f} points (max {e['max_abs_gap']:.2f}), covers {e['inside']}/{e['of']}")
        parts.append(f"**Config {s['config']}** ({s['runs']} runs, against {s['against']}): " + "; ".join(bits) + ".")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--configs", default="a,b", help="a, b and/or c (see above)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--library-commit", default=None,
                        help="run the CLI of onnxslim_prune as committed here [default: HEAD; with --resume, the JSON's]")
    parser.add_argument("--out", type=Path, default=RESULTS / "verdict")
    parser.add_argument("--resume", action="store_true", help="keep runs already in the JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    models, methods = args.models.split(","), args.methods.split(",")
    ratios, configs = [float(r) for r in args.ratios.split(",")], args.configs.split(",")
    args.out = args.out.resolve()
    json_path = args.out.with_suffix(".json")
    if args.library_commit is None:
        args.library_commit = json.loads(json_path.read_text())["meta"]["library_commit"] if args.resume and json_path.exists() else "HEAD"
    files = data_files(WORK)
    lib, sha = export_library(args.library_commit, WORK)
    os.chdir(WORK)  # `python -m` puts the working directory first on sys.path: not the repository's working tree
    env = library_env(lib)
    state: dict[str, Any] = {"rows": [], "meta": {}}
    if args.resume and json_path.exists():
        state = json.loads(json_path.read_text())
        if state["meta"].get("library_commit") != sha:
            raise SystemExit(f"--resume: {json_path} was measured with {state['meta'].get('library_commit')}, not {sha}")
    state["meta"].update(date=time.strftime("%Y-%m-%d %H:%M"), library_commit=sha, library_digest=library_digest(lib / "onnxslim_prune"),
                         machine=f"{platform.machine()}, {os.cpu_count()} cores")
    state["meta"]["configs"] = {**state["meta"].get("configs", {}), **{c: CONFIGS[c] for c in configs}}
    started = time.perf_counter() - 60 * state["meta"].get("total_minutes", 0.0)

    train_x, train_y = load_split("train", 14000)
    test_x, test_y = load_split("test")
    sets = {"test": (test_x, test_y), "train_unseen": (train_x[4000:14000], train_y[4000:14000]),
            "test_unseen_c": (test_x[4000:], test_y[4000:])}
    originals: dict[str, dict[str, np.ndarray]] = {}
    for model in models:
        path = MODELS_DIR / f"{model}.onnx"
        test_logits = logits(path, test_x)
        originals[model] = {"test": test_logits, "test_unseen_c": test_logits[4000:]}
        hits = test_logits.argmax(1) == test_y
        state["meta"].setdefault("test_slices", {})[model] = {"test0_2000": float(hits[:2000].mean()),
                                                               "test2000_4000": float(hits[2000:4000].mean()),
                                                               "test4000_10000": float(hits[4000:].mean())}
        known = model in state["meta"].get("original_accuracy", {})
        if any(c != "c" for c in configs) or not known:
            originals[model]["train_unseen"] = logits(path, sets["train_unseen"][0])
        if known:
            continue
        train_logits = logits(path, train_x[:4000])
        acc = {name: float(np.mean(originals[model][name].argmax(1) == y)) for name, (_, y) in sets.items()}
        acc["train0_2000"] = float(np.mean(train_logits[:2000].argmax(1) == train_y[:2000]))
        acc["train2000_4000"] = float(np.mean(train_logits[2000:].argmax(1) == train_y[2000:4000]))
        state["meta"].setdefault("original_accuracy", {})[model] = acc
        log.info("%s: original accuracy %s", model, {k: round(v, 4) for k, v in acc.items()})

    done = {(r["model"], r["method"], r["ratio"], r["config"]) for r in state["rows"] if "error" not in r}
    state["rows"] = [r for r in state["rows"] if (r["model"], r["method"], r["ratio"], r["config"]) in done]
    order = [(c, m, me, ra) for c in configs for m in models for me in methods for ra in ratios]
    for config, model, method, ratio in order:
        if (model, method, ratio, config) in done:
            continue
        row = one_run(model, method, ratio, config, files, env, originals, sets, args.batch_size, args.timeout)
        state["rows"].append(row)
        key = {"a": 0, "b": 1, "c": 2}
        state["rows"].sort(key=lambda r: (key[r["config"]], models.index(r["model"]) if r["model"] in models else 99,
                                          METHODS.index(r["method"]) if r["method"] in METHODS else 99, r["ratio"]))
        if "error" in row:
            log.warning("%s %s %g %s: %s", model, method, ratio, config, row["error"])
        else:
            cmp = row["compare"][truth_name(row)]
            log.info("%s %s %g %s: %.0fs+%.0fs, top-1 gap %+.2f (%s), corr gap %+.4f (%s)%s", model, method, ratio, config,
                     row["seconds"], row["inference_seconds"], cmp["top1_agreement"]["gap"], cmp["top1_agreement"]["inside"],
                     cmp["correlation"]["gap"], cmp["correlation"]["inside"],
                     "" if "accuracy_drop_points" not in cmp else
                     f", drop gap {cmp['accuracy_drop_points']['gap']:+.2f} ({cmp['accuracy_drop_points']['inside']})")
        state["meta"]["total_minutes"] = (time.perf_counter() - started) / 60
        state["meta"]["headline"] = headline(state["rows"])
        write_results(args.out, state, markdown(state))
    state["meta"]["total_minutes"] = max(state["meta"].get("total_minutes", 0.0), (time.perf_counter() - started) / 60)
    state["meta"]["headline"] = headline(state["rows"])
    write_results(args.out, state, markdown(state))
    log.info("done in %.1f min", (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
