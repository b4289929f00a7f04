"""The real-model suite: trained models, realistic calibration data, a figure measured on unseen data.

    python benchmarks/real_suite.py                                  # every model, method and target (hours)
    python benchmarks/real_suite.py --models lite1 --methods ldrf --targets 0.85
    python benchmarks/real_suite.py --missing                        # only the rows the results lack
    python benchmarks/real_suite.py --report-only                    # rewrite the md and plots from the JSON

The yardstick of every change to selection, compensation, allocation, speed or memory
(`issues`: "Quality on real trained models"). Three trained models:

- ``lite1``: EfficientNet-Lite1 (ImageNet, ``../shared/models``), calibrated on the 1,200 images of
  ``../shared/data/imagenetlike/calib`` (image-folder flags: 240x240, /255, mean 0.5, std 0.5); the
  figure is top-1 agreement with the original on the 600 ``eval/`` images (disjoint sources), and top-5
  (the original's class among the pruned model's five best).
- ``minilm``: all-MiniLM-L6-v2 (``../shared/real/build.sh``), calibrated on ``minilm_calib.npz`` (1,024
  sentences); the figures are the mean cosine of the sentence embeddings (mean over the attention mask,
  L2-normalised) on the 500 eval sentences, and nearest-neighbour agreement: for each eval sentence, is its
  most similar other sentence the same one as with the original's embeddings.
- ``smollm2``: SmolLM2-135M, calibrated on ``smollm2_calib.npz`` (1,024 windows of 128 tokens); the figure
  is perplexity on the 400 eval windows, and its ratio to the original's.

Every run is ``onnx-prune MODEL --method M --target-macs T --calib ...`` in a fresh process (``measure.py``:
wall time and the child's own peak RSS) with ``--report`` and ``--keep-failed`` (so a missed gate still
gives a model to measure). The benchmark then runs the original and the written model itself with
onnxruntime on the eval split (never seen by the tool: the tool's verdict is on its held-out part of the
calibration data) and times both on one sample, interleaved, single-thread CPU time (``time.thread_time``,
median of ``--rounds``): ``speed`` is the original's time over the pruned model's (above 1: faster).

Method ``default`` runs without ``--method`` (what a user gets with ``--calib`` alone). Results:
``RESULTS/real_suite.{json,md}`` and one Pareto plot per model (``real_suite_<model>.png``: the figure
against the MACs kept, one line per method). Rows accumulate: a run replaces the row of the same
(model, method, target, extra flags) and leaves the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
from lib import data  # noqa: E402
from lib.data import npz_batches  # noqa: E402
from lib.measure import failure, prune_cli_keep  # noqa: E402  (the paths above stay this script's own)

log = logging.getLogger("real_suite")

IMAGES = SHARED / "data" / "imagenetlike"
TEXT = SHARED / "data" / "text"
LITE1_SIZE = 240
#: ImageNet-like inputs go through the model in batches of this many (memory: 600 x 3 x 240 x 240 floats = 415 MB)
IMAGE_BATCH = 50
TEXT_BATCH = 25
LM_BATCH = 4

Outputs = list[np.ndarray]


def session(path: Path | bytes, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, opts, providers=["CPUExecutionProvider"])


# --- the eval data and the independent figures -------------------------------------------------------------------


def image_batches(folder: Path, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The eval images as the model's input, preprocessed as its card says (written here, not the tool's code)."""
    return data.image_batches(folder, LITE1_SIZE, 0.5, 0.5, IMAGE_BATCH, limit)


def class_scores(sess: ort.InferenceSession, batches: Iterator[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([sess.run(None, feed)[0] for feed in batches])


def top1_figures(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, and top-5: the original's class among the pruned model's five best."""
    a, b = before.argmax(axis=1), after.argmax(axis=1)
    top5 = np.argsort(-after, axis=1)[:, :5]
    return {"top1_agreement": float(np.mean(a == b)), "top5_agreement": float(np.mean((top5 == a[:, None]).any(axis=1)))}


def sentence_embeddings(sess: ort.InferenceSession, batches: Iterator[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean of the last hidden state over the attention mask, L2-normalised (sentence-transformers' pooling)."""
    names = {i.name for i in sess.get_inputs()}
    out = []
    for feed in batches:
        hidden = sess.run(None, {k: v for k, v in feed.items() if k in names})[0].astype(np.float64)
        mask = feed["attention_mask"][:, :, None].astype(np.float64)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def embedding_figures(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Mean cosine of each sentence's two embeddings; nearest-neighbour agreement among the eval sentences."""
    cosine = np.sum(before * after, axis=1)

    def neighbours(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "nn_agreement": float(np.mean(neighbours(before) == neighbours(after)))}


def perplexity(sess: ort.InferenceSession, batches: Iterator[dict[str, np.ndarray]]) -> float:
    """exp of the mean next-token negative log-likelihood over the attended tokens, streamed batch by batch."""
    names = {i.name for i in sess.get_inputs()}
    total, count = 0.0, 0
    for feed in batches:
        logits = sess.run(None, {k: v for k, v in feed.items() if k in names})[0][:, :-1].astype(np.float64)
        target = feed["input_ids"][:, 1:]
        mask = feed["attention_mask"][:, 1:].astype(bool)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        total += float(((log_z - picked) * mask).sum())
        count += int(mask.sum())
    return math.exp(total / count)


@dataclass(frozen=True)
class Model:
    """One model of the suite: where it is, the calibration flags, the eval figure."""

    name: str
    path: Callable[[argparse.Namespace], Path]
    calib: tuple[str, ...]
    #: the original's reference on the eval split (anything `figures` takes), computed once per benchmark run
    reference: Callable[[ort.InferenceSession, int | None], Any]
    #: the pruned model's figures against the reference
    figures: Callable[[Any, ort.InferenceSession, int | None], dict[str, float]]
    headline: str
    higher_is_better: bool
    methods: tuple[str, ...]
    targets: tuple[float, ...]
    one_sample: Callable[[], dict[str, np.ndarray]]
    extra: tuple[str, ...] = field(default=())


def _lite1_reference(sess: ort.InferenceSession, limit: int | None) -> np.ndarray:
    return class_scores(sess, image_batches(IMAGES / "eval", limit))


def _lite1_figures(ref: np.ndarray, sess: ort.InferenceSession, limit: int | None) -> dict[str, float]:
    return top1_figures(ref, class_scores(sess, image_batches(IMAGES / "eval", limit)))


def _minilm_reference(sess: ort.InferenceSession, limit: int | None) -> np.ndarray:
    return sentence_embeddings(sess, npz_batches(TEXT / "minilm_eval.npz", TEXT_BATCH, limit))


def _minilm_figures(ref: np.ndarray, sess: ort.InferenceSession, limit: int | None) -> dict[str, float]:
    return embedding_figures(ref, sentence_embeddings(sess, npz_batches(TEXT / "minilm_eval.npz", TEXT_BATCH, limit)))


def _smollm2_reference(sess: ort.InferenceSession, limit: int | None) -> float:
    return perplexity(sess, npz_batches(TEXT / "smollm2_eval.npz", LM_BATCH, limit))


def _smollm2_figures(ref: float, sess: ort.InferenceSession, limit: int | None) -> dict[str, float]:
    ppl = perplexity(sess, npz_batches(TEXT / "smollm2_eval.npz", LM_BATCH, limit))
    return {"perplexity": ppl, "perplexity_before": ref, "perplexity_ratio": ppl / ref}


def _first(path: Path, batch: int) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: next(npz_batches(path, batch))


MODELS = {
    m.name: m for m in (
        Model("lite1", lambda a: SHARED / "models" / "efficientnet_lite1.onnx",
              ("--calib", str(IMAGES / "calib"), "--size", f"{LITE1_SIZE}x{LITE1_SIZE}", "--mean", "0.5,0.5,0.5",
               "--std", "0.5,0.5,0.5"),
              _lite1_reference, _lite1_figures, "top1_agreement", True,
              ("default", "l1", "merge", "ldrf", "thinet", "cp", "contrib", "random"), (0.85, 0.75, 0.7),
              lambda: next(image_batches(IMAGES / "eval", 1))),
        Model("minilm", lambda a: a.real / "all_minilm_l6_v2.onnx", ("--calib", str(TEXT / "minilm_calib.npz")),
              _minilm_reference, _minilm_figures, "nn_agreement", True,
              ("default", "l1", "ldrf", "contrib", "obs", "kwon", "random"), (0.85, 0.6),
              _first(TEXT / "minilm_eval.npz", 1)),
        Model("smollm2", lambda a: a.real / "smollm2_135m.onnx", ("--calib", str(TEXT / "smollm2_calib.npz")),
              _smollm2_reference, _smollm2_figures, "perplexity_ratio", False,
              ("default", "l1", "ldrf", "contrib", "obs", "kwon", "random"), (0.85, 0.8, 0.7),
              _first(TEXT / "smollm2_eval.npz", 1)),
    )
}


def cpu_speed(original: Path, pruned: Path, feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Single-thread CPU time of one sample, both models interleaved: medians and their ratio."""
    a, b = session(original, threads=1), session(pruned, threads=1)
    names_a = {i.name for i in a.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names_a}
    for sess in (a, b):
        sess.run(None, feed)
    ta, tb = [], []
    for _ in range(rounds):
        for sess, times in ((a, ta), (b, tb)):
            start = time.thread_time()
            sess.run(None, feed)
            times.append(time.thread_time() - start)
    before, after = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
    return {"cpu_ms_before": round(before, 3), "cpu_ms_after": round(after, 3), "speed": round(before / after, 3)}


# --- one run -----------------------------------------------------------------------------------------------------


def row_key(row: dict[str, Any]) -> tuple[str, str, float, tuple[str, ...]]:
    return row["model"], row["method"], float(row["target"]), tuple(row.get("extra", ()))


def verdict_figures(report: dict[str, Any] | None) -> dict[str, Any]:
    """The tool's own verdict (held out from the calibration data), to set beside the independent figure."""
    verdict = (report or {}).get("verdict") or {}
    keep = ("source", "samples", "cosine", "correlation", "top1_agreement", "degraded", "passed")
    return {k: verdict.get(k) for k in keep}


def one_run(spec: Model, model: Path, method: str, target: float, extra: Sequence[str], reference: Any,
            work: Path, args: argparse.Namespace) -> dict[str, Any]:
    flags = [*(() if method == "default" else ("--method", method)), "--target-macs", str(target), *spec.calib,
             "--keep-failed", *extra]
    out_dir = work / spec.name / f"{method}_{target}{'_' + '_'.join(e.strip('-') for e in extra) if extra else ''}"
    log.info("%s: onnx-prune %s", spec.name, " ".join(flags))
    run, report, pruned = prune_cli_keep(model, flags, out_dir, timeout=args.timeout)
    row: dict[str, Any] = {"model": spec.name, "method": method, "target": target, "extra": list(extra),
                           "seconds": run.seconds, "peak_mib": run.peak_mib, "exit": run.returncode, "commit": _commit()}
    if report is not None:
        row["method_used"] = report.get("method")
        row["macs_kept"] = (report.get("ratios") or {}).get("macs")
        row["params_kept"] = (report.get("ratios") or {}).get("params")
        row["verdict"] = verdict_figures(report)
    if pruned is None:
        row["error"] = failure(run)
        return row
    row.update(spec.figures(reference, session(pruned), args.limit))
    row.update(cpu_speed(model, pruned, spec.one_sample(), args.rounds))
    if not args.keep_models:
        pruned.unlink(missing_ok=True)
        pruned.with_name(pruned.name + ".data").unlink(missing_ok=True)
    return row


# --- results ----------------------------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save(results: Path, rows: list[dict[str, Any]], originals: dict[str, Any]) -> None:
    rows = sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), -float(r["target"]), r["method"], r.get("extra", [])))
    meta = {"machine": platform.machine(), "processor": platform.processor(), "onnxruntime": ort.__version__,
            "commit": _commit()}
    (results / "real_suite.json").write_text(json.dumps({"meta": meta, "originals": originals, "rows": rows}, indent=1) + "\n")
    (results / "real_suite.md").write_text(markdown(rows, originals, meta))
    plot(results, rows)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _num(v: Any, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _figure_cells(r: dict[str, Any]) -> str:
    if r["model"] == "lite1":
        return f"{_pct(r.get('top1_agreement'))} | {_pct(r.get('top5_agreement'))}"
    if r["model"] == "minilm":
        return f"{_num(r.get('cosine'))} | {_pct(r.get('nn_agreement'))}"
    ppl = r.get("perplexity")
    return f"{'' if ppl is None else f'{ppl:.1f}'} | {_num(r.get('perplexity_ratio'), 2)}{'x' if ppl is not None else ''}"


HEADERS = {"lite1": "top-1 agreement | top-5", "minilm": "cosine | NN agreement", "smollm2": "perplexity | x original"}


@dataclass(frozen=True)
class Target:
    """An issue's target on the suite: `bounds` (figure -> least value, or most for a perplexity ratio) at no more
    than `macs` of the MACs, closed-form (no ``--recover``) or recovered, and within `seconds` of the tool's time."""

    issue: int
    model: str
    macs: float
    bounds: tuple[tuple[str, float], ...]
    recover: bool
    seconds: float | None = None


TARGETS = (
    Target(22, "lite1", 0.75, (("top1_agreement", 0.80),), recover=False),
    Target(22, "minilm", 0.60, (("cosine", 0.93), ("nn_agreement", 0.60)), recover=False),
    Target(22, "smollm2", 0.80, (("perplexity_ratio", 1.6),), recover=False),
    Target(23, "lite1", 0.70, (("top1_agreement", 0.90),), recover=True, seconds=1800),
    Target(23, "minilm", 0.60, (("cosine", 0.97), ("nn_agreement", 0.80)), recover=True),
    Target(23, "smollm2", 0.80, (("perplexity_ratio", 1.25),), recover=True, seconds=1800),
)


def _shortfall(key: str, value: float, bound: float) -> str | None:
    """How far `value` is from `bound` (None when it is met): points of a share, cosine, the ratio's excess."""
    if key == "perplexity_ratio":
        return f"{value - bound:.3f}x" if value > bound else None
    if value >= bound:
        return None
    return f"cosine {bound - value:.3f}" if key == "cosine" else f"{100 * (bound - value):.1f} points"


def _said(key: str, value: float) -> str:
    return f"{value:.3f}x" if key == "perplexity_ratio" else f"{value:.3f}" if key == "cosine" else _pct(value)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issues' targets against the best row within each one's MACs (first by its first figure), and how far off."""
    lines = ["## Targets", "",
             "The issues' targets, each against the best row within its MACs (by its first figure), and how far that is "
             "from the target (points of agreement, of cosine, the perplexity ratio's excess). Time: the tool's whole "
             "run, the selection statistics read from the cache where an earlier run of the same model and data filled "
             "it (a run from scratch takes about 8 minutes more on SmolLM2 at 1,024 windows).", "",
             "| issue | model | MACs at most | with | target | best row | its figures | short by | time s | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        key = t.bounds[0][0]
        mine = [r for r in rows if r["model"] == t.model and r.get(key) is not None and r.get("macs_kept") is not None
                and r["macs_kept"] <= t.macs + 0.005 and ("--recover" in r.get("extra", [])) == t.recover]
        wanted = " and ".join(f"{_said(k, b)}" for k, b in t.bounds)
        wanted += f", {t.seconds / 60:.0f} min" if t.seconds else ""
        cells = f"| {t.issue} | {t.model} | {t.macs:.0%} | {'--recover' if t.recover else 'closed form'} | {wanted} |"
        if not mine:
            lines.append(f"{cells} none | | | | |")
            continue
        pick = min if key == "perplexity_ratio" else max
        best = [pick(mine, key=lambda r: r[key])]
        in_time = [r for r in mine if t.seconds and r["seconds"] <= t.seconds]
        if t.seconds and best[0]["seconds"] > t.seconds and in_time:
            best.append(pick(in_time, key=lambda r: r[key]))  # and the best that keeps to the time
        for row in best:
            label = row["method"] + "".join(f" {e}" for e in row.get("extra", []))
            figures = ", ".join(_said(k, row[k]) for k, _ in t.bounds)
            short = [gap for k, b in t.bounds if (gap := _shortfall(k, row[k], b))]
            if t.seconds and row["seconds"] > t.seconds:
                short.append(f"{(row['seconds'] - t.seconds) / 60:.0f} min")
            lines.append(f"{cells} {label} | {figures} | {', '.join(short) or 'met'} | {row['seconds']:.0f} | "
                         f"{row.get('commit', '?')} |")
    return lines + [""]


def markdown(rows: list[dict[str, Any]], originals: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# The real-model suite", "",
        "Trained models, calibrated on realistic data, each figure measured by the benchmark on an eval split the tool never "
        "saw (`benchmarks/real_suite.py`). *speed*: the original's single-thread CPU time over the pruned model's on one "
        "sample, interleaved (above 1 = faster). *time* and *peak*: the tool's own wall time and peak RSS. *verdict*: the "
        "tool's own figure on its held-out part of the calibration data.", "",
        f"Machine {meta['machine']}, onnxruntime {meta['onnxruntime']}; each row names the commit it ran (rows accumulate "
        "across runs: a row is replaced only by a rerun of the same model, method, target and flags).", "",
        *target_lines(rows),
    ]
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        orig = originals.get(name) or {}
        extra = f" (original perplexity {orig['perplexity']:.1f})" if "perplexity" in orig else ""
        lines += [f"## {name}{extra}", "",
                  f"| method | target MACs | MACs kept | params kept | {HEADERS[name]} | speed | verdict | time s | peak MiB | exit | commit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            v = r.get("verdict") or {}
            said = "; ".join(f"{k} {v[k]:.3f}" for k in ("top1_agreement", "cosine", "correlation") if isinstance(v.get(k), float))
            if v.get("degraded"):
                said += " DEGRADED"
            label = r["method"] + (f" ({r['method_used']})" if r["method"] == "default" and r.get("method_used") else "")
            label += "".join(f" {e}" for e in r.get("extra", []))
            figure = _figure_cells(r) if "error" not in r else f"failed: {r['error']} |"
            lines.append(f"| {label} | {r['target']:.2f} | {_pct(r.get('macs_kept'))} | {_pct(r.get('params_kept'))} | {figure} | "
                         f"{_num(r.get('speed'), 2)} | {said} | {r['seconds']:.0f} | {r['peak_mib']:.0f} | {r['exit']} | {r.get('commit', '?')} |")
        lines.append("")
        lines.append(f"![{name}](real_suite_{name}.png)")
        lines.append("")
    return "\n".join(lines)


def plot(results: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is missing: no plots (pip install -e '.[bench]')")
        return
    for name, spec in MODELS.items():
        mine = [r for r in rows if r["model"] == name and spec.headline in r and r.get("macs_kept") is not None]
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, extra in sorted({(r["method"], tuple(r.get("extra", ()))) for r in mine}):
            pts = sorted((r["macs_kept"], r[spec.headline]) for r in mine
                         if r["method"] == method and tuple(r.get("extra", ())) == extra)
            if pts:  # rows with extra flags (--recover) dashed, beside the plain ones
                ax.plot([100 * p[0] for p in pts], [p[1] * (100 if spec.higher_is_better else 1) for p in pts],
                        "o--" if extra else "o-", label=" ".join((method, *extra)))
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel({"lite1": "top-1 agreement (%)", "minilm": "nearest-neighbour agreement (%)",
                       "smollm2": "perplexity / original's"}[name])
        if not spec.higher_is_better:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(name)
        fig.tight_layout()
        fig.savefig(results / f"real_suite_{name}.png", dpi=110)
        plt.close(fig)


def cached_reference(spec: Model, model: Path, args: argparse.Namespace) -> Any:
    """The original's reference on the eval split, kept in ``WORK/references`` by the model's and eval data's digest.

    SmolLM2's perplexity on 400 windows takes minutes: a rerun of one row should not pay it again.
    """
    data = sorted(p for p in (IMAGES / "eval").rglob("*") if p.is_file()) if spec.name == "lite1" \
        else [TEXT / f"{spec.name}_eval.npz"]
    digest = hashlib.sha256()
    for path in (model, *data):
        digest.update(path.read_bytes())
    store = args.work / "references" / f"{spec.name}_{digest.hexdigest()[:16]}_{args.limit}.npy"
    if store.exists():
        log.info("%s: the original's figures on the eval split, from %s", spec.name, store)
        value = np.load(store)
        return float(value) if value.ndim == 0 else value
    log.info("%s: the original's figures on the eval split", spec.name)
    reference = spec.reference(session(model), args.limit)
    store.parent.mkdir(parents=True, exist_ok=True)
    np.save(store, np.asarray(reference))
    return reference


def original_figures(spec: Model, reference: Any) -> dict[str, Any]:
    return {"perplexity": reference} if isinstance(reference, float) else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", help="default: each model's list")
    ap.add_argument("--targets", nargs="+", type=float, help="--target-macs values (default: each model's list)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more onnx-prune flags for every run (last)")
    ap.add_argument("--real", type=Path, default=ROOT.parent / "real-models",
                    help="where ../shared/real/build.sh wrote the transformers (built when missing)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/real_suite"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--limit", type=int, help="measure on the first N eval samples only (smoke runs)")
    ap.add_argument("--rounds", type=int, default=30, help="timing rounds of the speed ratio")
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--missing", action="store_true", help="skip the runs the results already hold")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.results.mkdir(parents=True, exist_ok=True)
    stored = json.loads((args.results / "real_suite.json").read_text()) if (args.results / "real_suite.json").exists() else {}
    rows, originals = stored.get("rows", []), stored.get("originals", {})
    if args.report_only:
        save(args.results, rows, originals)
        return 0
    if any(m != "lite1" for m in args.models) and not (args.real / "smollm2_135m.onnx").exists():
        subprocess.run(["bash", str(SHARED / "real" / "build.sh"), str(args.real)], check=True)
    for name in args.models:
        spec = MODELS[name]
        model = spec.path(args)
        todo = [(m, t) for m in (args.methods or spec.methods) for t in (args.targets or spec.targets)]
        if args.missing:
            have = {row_key(r) for r in rows}
            todo = [(m, t) for m, t in todo if (name, m, float(t), tuple(args.extra)) not in have]
        if not todo:
            continue
        reference = cached_reference(spec, model, args)
        originals[name] = original_figures(spec, reference)
        for method, target in todo:
            row = one_run(spec, model, method, target, args.extra, reference, args.work, args)
            rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
            log.info("%s", json.dumps(row))
            save(args.results, rows, originals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
