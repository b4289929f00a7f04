"""The verdict: how closely the pruned model follows the original, where it was measured, and the gates.

Both models run on the same samples, batch by batch; per graph output (floating outputs only)
the figures are accumulated in float64 without holding the outputs (``a`` the original's, ``b``
the pruned model's, ``i`` a sample, ``j`` an element of one sample's output)::

    max_abs      = max |b - a|                 max_rel = max_abs / max |a|
    cosine       = <a, b> / (|a| |b|)          (all samples flattened)
    correlation  = <a - mean_i a, b - mean_i b> / (|a - mean_i a| |b - mean_i b|)
    spread       = |b - mean_i b| / |a - mean_i a|
    top1         = mean_i [argmax_j a_i == argmax_j b_i]   (2-D outputs [N, classes] only)

The verdict's headline figures are the worst output's. For top-1 agreement only outputs that
are class scores count when the model says which they are: when some 2-D outputs come from a
Softmax or LogSoftmax (through Identity, Reshape, Flatten, Squeeze, Unsqueeze or Cast),
those alone decide it, and the argmax of a detector's box or landmark regression output
(MTCNN's [N, 4] and [N, 10] beside its face/no-face softmax) is kept as detail, not headline.
Without such outputs every 2-D output counts (logits straight from a Gemm are class scores too).

``cosine`` is dominated by the output's mean over samples: a classifier that outputs the
same scores for every input can score 0.995 against the original. ``correlation`` (the
sample-centred cosine) is 0 for a constant output and 1 when the pruned model's outputs vary
with the input exactly as the original's do; ``spread`` says how much they vary at all.
Sums are taken about the first batch's mean, so near-constant outputs lose no precision.

Every figure measured on ``n`` samples is an estimate; the verdict carries its 95% interval so
that a user sees how far the figure on 8 held-out samples may be from the figure on the next
thousand (measured in benchmarks/results/real_models.md)::

    top-1 agreement   Wilson score interval of hits / n
    correlation       Fisher z: tanh(atanh(r) -+ 1.96 / sqrt(n - 3)), each sample one observation
                      (elements of one sample's output are not independent, so this is the
                      conservative count)
    accuracy drop     paired (both models on the same samples): from the discordant counts
                      b (only the original right) and c (only the pruned right), Agresti-Min
                      adjusted Wald: (b - c) / (n + 2) -+ 1.96 sqrt(b + c + 1 - (b - c)^2 / (n + 2)) / (n + 2)

A verdict is *imprecise* when an interval is wider than `PRECISE_WIDTH` (10 points either
side): the table says so and the log names how many samples would give +-5 points.

A verdict is *held out* only when no fitting, selection or ranking saw its samples: ``eval``
(``--eval`` data, labelled or not) or ``calib-holdout`` (the part of ``--calib`` split off before
the method ran). ``calib-fit`` (``--holdout 0``) is optimistic. ``random`` (seeded random inputs:
no real data was given) proves structure, not function: random token ids are not text and random
pixels are not images, so a random-input figure can say that the pruned model runs, never that it
still works (SmolLM2 pruned to 70% of its MACs: cosine 0.97 on random ids, perplexity 86 -> 38,319).
Such a verdict's function is unknown: `Verdict.passed` is None (JSON null), its figures are kept
as structure evidence only (the report's ``random_inputs``, never the headline keys), and a gate
without real data is a usage error raised before any work (`check_gates_have_data`), so no random
figure can pass one.

A pruned model is *degraded* when, on the verdict's samples (random ones included: a model that
fails on random inputs is broken whatever real data would say), its top-1 agreement is below
`TOP1_FLOOR`, its cosine below `COSINE_FLOOR` (outputs that point elsewhere, negated ones
included), its correlation below `CORRELATION_FLOOR`, its spread below `SPREAD_FLOOR` (outputs
that no longer depend on the input), or its accuracy kept less than half of the original's
margin over chance. Not degraded on random inputs proves nothing about function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import onnx

from ..errors import UsageError, ValidationError

#: below these the pruned model is flagged ``degraded`` (see the module docstring)
TOP1_FLOOR = 0.5
COSINE_FLOOR = 0.5
CORRELATION_FLOOR = 0.5
SPREAD_FLOOR = 0.1
#: a pruned classifier keeping less than this share of the original's accuracy margin over chance is degraded
ACCURACY_MARGIN_FLOOR = 0.5
#: two-sided 95% normal quantile
Z95 = 1.959963984540054
#: widest 95% interval (top-1 agreement, correlation: as a fraction; accuracy drop: / 100) of a precise verdict
PRECISE_WIDTH = 0.2
#: half-width the log's sample-count advice aims at
ADVISED_HALF_WIDTH = 0.05
#: what the table and the log say of a verdict on random inputs
FUNCTION_UNKNOWN = "function unknown: measured on random inputs"
#: the usage error of a gate without real samples (module docstring)
GATES_NEED_DATA = "gates need real samples: --calib or --eval (a figure on random inputs cannot pass a gate)"

Interval = tuple[float, float]


def wilson_interval(hits: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of a proportion ``hits / n`` (exact at the bounds 0 and 1, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def fisher_interval(r: float, n: int, z: float = Z95) -> Interval:
    """Interval of a correlation over `n` samples by Fisher's z; ``(-1, 1)`` when ``n < 4``."""
    if n < 4:
        return (-1.0, 1.0)
    centre = math.atanh(min(max(r, -0.999999), 0.999999))
    half = z / math.sqrt(n - 3)
    return (math.tanh(centre - half), math.tanh(centre + half))


def paired_drop_interval(only_before: int, only_after: int, n: int, z: float = Z95) -> Interval:
    """Interval of an accuracy drop (points) from paired outcomes (Agresti-Min adjusted Wald, module docstring)."""
    m = n + 2
    d = (only_before - only_after) / m
    se = math.sqrt(max(only_before + only_after + 1 - (only_before - only_after) ** 2 / m, 0.0)) / m
    return (100.0 * (d - z * se), 100.0 * (d + z * se))


def samples_for(p: float, half_width: float = ADVISED_HALF_WIDTH, z: float = Z95) -> int:
    """Samples a proportion near `p` needs for a 95% interval of +-`half_width` (p kept in [0.1, 0.9])."""
    q = min(max(p, 0.1), 0.9)
    return math.ceil(z * z * q * (1.0 - q) / (half_width * half_width))


class VerdictSource(str, Enum):
    EVAL = "eval"
    CALIB_HOLDOUT = "calib-holdout"
    CALIB_FIT = "calib-fit"
    RANDOM = "random"

    @property
    def held_out(self) -> bool:
        return self in (VerdictSource.EVAL, VerdictSource.CALIB_HOLDOUT)

    @property
    def description(self) -> str:
        return {
            VerdictSource.EVAL: "held-out --eval samples",
            VerdictSource.CALIB_HOLDOUT: "held-out calibration samples (never fitted)",
            VerdictSource.CALIB_FIT: "calibration samples that were fitted to (optimistic: --holdout 0)",
            VerdictSource.RANDOM: "seeded random inputs (structure, not function: give --calib or --eval)",
        }[self]


@dataclass(frozen=True)
class OutputAgreement:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    correlation: float | None  # None with fewer than 2 samples
    spread: float | None
    top1: float | None  # classifiers ([N, classes]) only
    samples: int = 0
    top1_interval: Interval | None = None
    correlation_interval: Interval | None = None


class _OutputSums:
    """Running sums of one output over samples (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.shift_a: np.ndarray | None = None
        self.shift_b: np.ndarray | None = None
        self.sum_a: np.ndarray | None = None
        self.sum_b: np.ndarray | None = None
        self.ab = self.aa = self.bb = 0.0  # raw products, for the cosine
        self.cab = self.caa = self.cbb = 0.0  # products about the shift, for the correlation
        self.max_abs = 0.0
        self.max_ref = 0.0
        self.top1_hits = 0
        self.top1_count = 0
        self.classes = True

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise ValidationError(f"output {self.name}: shape {b.shape} differs from the original {a.shape}")
        flat_a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        flat_b = b.reshape(flat_a.shape)
        if self.shift_a is None:
            self.shift_a, self.shift_b = _row_mean(flat_a), _row_mean(flat_b)
            self.sum_a, self.sum_b = np.zeros_like(self.shift_a), np.zeros_like(self.shift_b)
        assert self.shift_b is not None and self.sum_a is not None and self.sum_b is not None
        if flat_a.shape[1] != self.shift_a.shape[0]:
            raise ValidationError(f"output {self.name}: per-sample size changed between batches")
        # float64 copies of a few rows at a time: a whole batch of a language model's logits would be 1.6 GB each;
        # a row wider than WIDE_ROW_BYTES (its logits: 50 MB in float64) a block of its columns at a time
        step = _rows_per_chunk(flat_a.shape[1])
        width = flat_a.shape[1]
        cols = width if 8 * width <= WIDE_ROW_BYTES else WIDE_ROW_BYTES // 8
        for start in range(0, flat_a.shape[0], step):
            for col in range(0, width, cols):
                block = slice(col, col + cols)
                self._add_rows(flat_a[start : start + step, block].astype(np.float64),
                               flat_b[start : start + step, block].astype(np.float64), block)
        self.count += flat_a.shape[0]
        self.classes = self.classes and a.ndim == 2 and a.shape[1] > 1
        if self.classes:
            self.top1_hits += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            self.top1_count += a.shape[0]

    def _add_rows(self, rows_a: np.ndarray, rows_b: np.ndarray, cols: slice) -> None:
        """Add `rows_a` / `rows_b`: the columns `cols` of a few rows (float64)."""
        assert self.shift_a is not None and self.shift_b is not None and self.sum_a is not None and self.sum_b is not None
        da, db = rows_a - self.shift_a[cols], rows_b - self.shift_b[cols]
        self.sum_a[cols] += da.sum(axis=0)
        self.sum_b[cols] += db.sum(axis=0)
        self.cab += float(np.vdot(da, db))
        self.caa += float(np.vdot(da, da))
        self.cbb += float(np.vdot(db, db))
        self.ab += float(np.vdot(rows_a, rows_b))
        self.aa += float(np.vdot(rows_a, rows_a))
        self.bb += float(np.vdot(rows_b, rows_b))
        if rows_a.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(rows_a - rows_b))))
            self.max_ref = max(self.max_ref, float(np.max(np.abs(rows_a))))

    def result(self) -> OutputAgreement:
        denom = math.sqrt(self.aa * self.bb)
        cosine = self.ab / denom if denom > 0 else (1.0 if self.aa == self.bb == 0 else 0.0)
        correlation = spread = None
        if self.count >= 2 and self.sum_a is not None and self.sum_b is not None:
            n = self.count
            # centred sums from sums about the shift: sum (d - mean d)(e - mean e) = sum d e - (sum d)(sum e) / n
            caa = max(self.caa - float(self.sum_a @ self.sum_a) / n, 0.0)
            cbb = max(self.cbb - float(self.sum_b @ self.sum_b) / n, 0.0)
            cab = self.cab - float(self.sum_a @ self.sum_b) / n
            if caa > 0:
                spread = math.sqrt(cbb / caa)
                correlation = cab / math.sqrt(caa * cbb) if cbb > 0 else 0.0
        top1 = self.top1_hits / self.top1_count if self.classes and self.top1_count else None
        return OutputAgreement(self.name, self.max_abs, self.max_abs / max(self.max_ref, 1e-12), cosine,
                               correlation, spread, top1, self.count,
                               None if top1 is None else wilson_interval(self.top1_hits, self.top1_count),
                               None if correlation is None else fisher_interval(correlation, self.count))


#: bytes of float64 rows of one output the accumulator converts at a time (one batch below it: the whole batch)
CHUNK_BYTES = 64 << 20
#: a row (one sample of an output) wider than this in float64 is converted a block of this many bytes at a time
WIDE_ROW_BYTES = 8 << 20


def _rows_per_chunk(row_size: int) -> int:
    return max(1, CHUNK_BYTES // max(1, 8 * row_size))


def _row_mean(rows: np.ndarray) -> np.ndarray:
    """Mean over rows in float64, `_rows_per_chunk` rows at a time (a batch within one chunk: exactly ``mean``)."""
    step = _rows_per_chunk(rows.shape[1])
    if rows.shape[0] <= step:
        return rows.astype(np.float64).mean(axis=0)
    total = np.zeros(rows.shape[1])
    for start in range(0, rows.shape[0], step):
        total += rows[start : start + step].astype(np.float64).sum(axis=0)
    return total / rows.shape[0]


def _finite_lost(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `b` is non-finite anywhere `a` is finite (a sample at a time: the masks of a batch of a language
    model's logits would take 250 MB)."""
    rows_a, rows_b = (a.reshape(a.shape[0], -1), b.reshape(a.shape[0], -1)) if a.ndim else (a.reshape(1, 1), b.reshape(1, 1))
    return any(bool(np.any(np.isfinite(x) & ~np.isfinite(y))) for x, y in zip(rows_a, rows_b))


class AgreementAccumulator:
    """Agreement of two models' outputs, fed batch by batch (nothing but one batch is held)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._sums = [_OutputSums(n) for n in names]
        self.samples = 0

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], samples: int) -> None:
        for sums, a, b in zip(self._sums, reference, outputs):
            if np.issubdtype(a.dtype, np.floating):
                if a.dtype.kind == "f" and _finite_lost(a, b):
                    raise ValidationError(
                        f"pruned model gives non-finite values in output {sums.name} where the original does not"
                    )
                sums.add(a, b)
            elif a.shape != b.shape:
                raise ValidationError(f"output {sums.name}: shape {b.shape} differs from the original {a.shape}")
        self.samples += samples

    def results(self) -> tuple[OutputAgreement, ...]:
        return tuple(s.result() for s in self._sums if s.count)


@dataclass(frozen=True)
class Gate:
    """One quality gate: a figure of the verdict that must reach (``minimum``) or not pass a threshold."""

    name: str  # the flag, e.g. "--min-cosine"
    figure: str  # the verdict key it reads
    threshold: float
    minimum: bool = True  # False: the figure may not exceed the threshold (--max-drop)

    def check(self, value: float | None) -> GateResult:
        if value is None:
            return GateResult(self.name, self.figure, self.threshold, None, False,
                              f"{self.name} {self.threshold:g}: {self.figure} is not measured here")
        passed = value >= self.threshold if self.minimum else value <= self.threshold
        word = "at least" if self.minimum else "at most"
        how = "" if passed else f", missed by {abs(value - self.threshold):.4g}"
        return GateResult(self.name, self.figure, self.threshold, value, passed,
                          f"{self.name} {self.threshold:g}: {self.figure} is {value:.4g} (needs {word} {self.threshold:g}){how}")


@dataclass(frozen=True)
class GateResult:
    gate: str
    figure: str
    threshold: float
    value: float | None
    passed: bool
    message: str


@dataclass(frozen=True)
class Gates:
    """The gates of one run (CLI ``--min-top1-agreement``, ``--min-cosine``, ``--min-correlation``, ``--max-drop``,
    ``--min-speedup``).

    The first four read the verdict's figures (`gates`; `any` says whether one is set: a search aims at them);
    ``min_speedup`` and the not-slower gate, always on, read the latency measured after the verdict
    (`latency.speed_gates`): they judge the written model and start no search.
    """

    min_top1_agreement: float | None = None
    min_cosine: float | None = None
    min_correlation: float | None = None
    max_drop: float | None = None  # accuracy points, with labelled --eval data
    min_speedup: float | None = None  # original / pruned median latency, measured in the same run

    def __post_init__(self) -> None:
        for flag, value, high in (("--min-top1-agreement", self.min_top1_agreement, 1.0), ("--min-cosine", self.min_cosine, 1.0),
                                  ("--min-correlation", self.min_correlation, 1.0), ("--max-drop", self.max_drop, 100.0)):
            if value is not None and not (math.isfinite(value) and (0.0 if flag == "--max-drop" else -1.0) <= value <= high):
                raise UsageError(f"{flag} must be a number in [{0 if flag == '--max-drop' else -1}, {high:g}], got {value!r}")
        if self.min_speedup is not None and not (math.isfinite(self.min_speedup) and self.min_speedup > 0):
            raise UsageError(f"--min-speedup must be a positive number, got {self.min_speedup!r}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.min_top1_agreement, self.min_cosine, self.min_correlation, self.max_drop))

    def gates(self) -> tuple[Gate, ...]:
        out = []
        if self.min_top1_agreement is not None:
            out.append(Gate("--min-top1-agreement", "top1_agreement", self.min_top1_agreement))
        if self.min_cosine is not None:
            out.append(Gate("--min-cosine", "cosine", self.min_cosine))
        if self.min_correlation is not None:
            out.append(Gate("--min-correlation", "correlation", self.min_correlation))
        if self.max_drop is not None:
            out.append(Gate("--max-drop", "accuracy_drop_points", self.max_drop, minimum=False))
        return tuple(out)


def check_gates_have_data(gates: Gates, calib: object, eval_data: object) -> None:
    """Raise `UsageError` for gates without real samples (no ``--eval``, no ``--calib`` or ``--calib random``)."""
    if gates.any and eval_data is None and (calib is None or str(calib) == "random"):
        raise UsageError(GATES_NEED_DATA)


@dataclass(frozen=True)
class Verdict:
    """What a CI step gates on; the JSON keys are stable (see docs and the module docstring)."""

    source: VerdictSource
    samples: int
    top1_agreement: float | None
    cosine: float
    correlation: float | None
    spread: float | None
    max_abs: float
    max_rel: float
    outputs: tuple[OutputAgreement, ...]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    degraded_reasons: tuple[str, ...] = ()
    gates: tuple[GateResult, ...] = ()
    fitted: tuple[OutputAgreement, ...] = ()  # the same figures on fitted samples, when held-out ones exist: never the verdict
    top1_interval: Interval | None = None  # 95%, of the worst output (module docstring)
    correlation_interval: Interval | None = None
    accuracy_drop_interval: Interval | None = None  # points

    @property
    def held_out(self) -> bool:
        return self.source.held_out

    @property
    def imprecise(self) -> tuple[str, ...]:
        """The figures whose 95% interval is wider than `PRECISE_WIDTH`, each with its interval."""
        out = []
        if self.top1_interval is not None and self.top1_interval[1] - self.top1_interval[0] > PRECISE_WIDTH:
            lo, hi = self.top1_interval
            out.append(f"top-1 agreement {lo:.0%}-{hi:.0%}")
        if self.correlation_interval is not None and self.correlation_interval[1] - self.correlation_interval[0] > PRECISE_WIDTH:
            lo, hi = self.correlation_interval
            out.append(f"correlation {lo:.2f} to {hi:.2f}")
        if self.accuracy_drop_interval is not None and self.accuracy_drop_interval[1] - self.accuracy_drop_interval[0] > 100 * PRECISE_WIDTH:
            lo, hi = self.accuracy_drop_interval
            out.append(f"accuracy drop {lo:+.1f} to {hi:+.1f} points")
        return tuple(out)

    @property
    def advised_samples(self) -> int:
        """Held-out samples that would put the top-1 agreement (or a proportion near 0.5) within +-5 points."""
        return samples_for(self.top1_agreement if self.top1_agreement is not None else 0.5)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def function_known(self) -> bool:
        """False on random inputs: they prove that the pruned model runs, not that it works (module docstring)."""
        return self.source is not VerdictSource.RANDOM

    @property
    def passed(self) -> bool | None:
        """False when a gate was missed (a speed gate, measured whatever the inputs, included); otherwise True,
        or None when the function is unknown (random inputs): no quality gate runs there and none can pass."""
        if not all(g.passed for g in self.gates):
            return False
        return True if self.function_known else None

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return 100.0 * (self.accuracy_before - self.accuracy_after)

    def figure(self, key: str) -> float | None:
        value = getattr(self, key)
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, object]:
        """The report's ``verdict``; on random inputs the figures move under ``random_inputs`` (structure only)."""
        def output(o: OutputAgreement) -> dict[str, object]:
            return {"name": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel, "cosine": o.cosine,
                    "correlation": o.correlation, "correlation_ci95": _pair(o.correlation_interval), "spread": o.spread,
                    "top1_agreement": o.top1, "top1_agreement_ci95": _pair(o.top1_interval)}

        figures: dict[str, object] = {
            "top1_agreement": self.top1_agreement, "top1_agreement_ci95": _pair(self.top1_interval),
            "cosine": self.cosine, "correlation": self.correlation, "correlation_ci95": _pair(self.correlation_interval),
            "spread": self.spread, "max_abs": self.max_abs, "max_rel": self.max_rel,
            "outputs": [output(o) for o in self.outputs],
        }
        structure: dict[str, object] | None = None
        if not self.function_known:  # no headline from random inputs: the same keys, null, and the figures aside
            structure = {"samples": self.samples, **figures,
                         "note": "structure only: random inputs prove the pruned model runs, not that it works"}
            figures = {k: [] if k == "outputs" else None for k in figures}
        return {
            "source": self.source.value, "held_out": self.held_out, "function_known": self.function_known,
            "samples": self.samples, **figures,
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "accuracy_drop_points": self.accuracy_drop_points, "accuracy_drop_ci95": _pair(self.accuracy_drop_interval),
            "imprecise": bool(self.imprecise) if self.function_known else None,
            "degraded": self.degraded, "degraded_reasons": list(self.degraded_reasons),
            "gates": [{"gate": g.gate, "figure": g.figure, "threshold": g.threshold, "value": g.value, "passed": g.passed}
                      for g in self.gates],
            "passed": self.passed,
            "random_inputs": structure,
            "fitted_samples": [output(o) for o in self.fitted],
        }


#: ops through which a Softmax output stays class scores
_SCORE_PRESERVING = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})


def class_score_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph outputs computed by a Softmax / LogSoftmax, possibly through shape-only ops (module docstring)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = set()
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _SCORE_PRESERVING and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            found.add(output.name)
    return frozenset(found)


def _pair(interval: Interval | None) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


def summarise(
    source: VerdictSource,
    samples: int,
    outputs: Sequence[OutputAgreement],
    *,
    accuracy_before: float | None = None,
    accuracy_after: float | None = None,
    classes: int | None = None,
    gates: Gates | None = None,
    fitted: Sequence[OutputAgreement] = (),
    discordant: tuple[int, int] | None = None,
    class_outputs: frozenset[str] = frozenset(),
) -> Verdict:
    """The verdict over `outputs`: the worst output decides every figure (and its interval).

    `discordant`: samples only the original classified right, and only the pruned model did
    (labelled data), for the accuracy drop's interval. `class_outputs`: outputs known to be class
    scores (`class_score_outputs`); when any has a top-1 figure, they alone decide the headline top-1.
    """
    scored = [o for o in outputs if o.top1 is not None and o.name in class_outputs]
    top1_outputs = scored or [o for o in outputs if o.top1 is not None]

    def worst(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    def interval_of_worst(key: str, interval: str, among: Sequence[OutputAgreement] = outputs) -> Interval | None:
        present = [o for o in among if getattr(o, key) is not None]
        return getattr(min(present, key=lambda o: getattr(o, key)), interval) if present else None

    verdict = Verdict(
        source=source, samples=samples,
        top1_agreement=worst(o.top1 for o in top1_outputs),
        cosine=min((o.cosine for o in outputs), default=1.0),
        correlation=worst(o.correlation for o in outputs),
        spread=worst(o.spread for o in outputs),
        max_abs=max((o.max_abs for o in outputs), default=0.0),
        max_rel=max((o.max_rel for o in outputs), default=0.0),
        outputs=tuple(outputs), accuracy_before=accuracy_before, accuracy_after=accuracy_after,
        fitted=tuple(fitted),
        top1_interval=interval_of_worst("top1", "top1_interval", top1_outputs),
        correlation_interval=interval_of_worst("correlation", "correlation_interval"),
        accuracy_drop_interval=None if discordant is None else paired_drop_interval(*discordant, samples),
    )
    if gates is not None and gates.any and not verdict.function_known:
        raise UsageError(GATES_NEED_DATA)
    reasons = degraded_reasons(verdict, classes)
    results = tuple(g.check(verdict.figure(g.figure)) for g in (gates.gates() if gates is not None else ()))
    return replace(verdict, degraded_reasons=reasons, gates=results)


def degraded_reasons(v: Verdict, classes: int | None) -> tuple[str, ...]:
    """Why the pruned model no longer does the original's job, if it does not (module docstring)."""
    reasons = []
    if v.top1_agreement is not None and v.top1_agreement < TOP1_FLOOR:
        reasons.append(f"top-1 agreement {v.top1_agreement:.1%} is below {TOP1_FLOOR:.0%}")
    if v.outputs and v.cosine < COSINE_FLOOR:
        reasons.append(f"outputs point away from the original's (cosine {v.cosine:.3f}, below {COSINE_FLOOR:g})")
    if v.spread is not None and v.spread < SPREAD_FLOOR:
        reasons.append(f"outputs barely depend on the input (spread across samples {v.spread:.3g} of the original's)")
    elif v.correlation is not None and v.correlation < CORRELATION_FLOOR:
        reasons.append(f"outputs no longer follow the original's across samples (correlation {v.correlation:.3f})")
    if v.accuracy_before is not None and v.accuracy_after is not None and classes:
        chance = 1.0 / classes
        margin = v.accuracy_before - chance
        if margin > 0 and v.accuracy_after - chance < ACCURACY_MARGIN_FLOOR * margin:
            reasons.append(f"accuracy fell from {v.accuracy_before:.2%} to {v.accuracy_after:.2%} (chance is {chance:.1%})")
    return tuple(reasons)


def classes_of(outputs: Mapping[str, tuple[int, ...]]) -> int | None:
    """Number of classes of the first 2-D output, if any."""
    for shape in outputs.values():
        if len(shape) == 2 and shape[1] > 1:
            return int(shape[1])
    return None
