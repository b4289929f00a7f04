"""What a method is: a `MethodSpec` with typed, validated settings (`Params`), in one registry.

A method turns an analysed model into an `MethodOutcome`: what to remove (`plan`), full-size
constants to substitute before slicing (`overrides`, e.g. merged outgoing weights), and
an optional `finish` step run on the pruned model (e.g. least-squares reconstruction).

Settings. Every setting a method reads is a field of a frozen `Params` dataclass, written
once with its type, default, check and (where the CLI offers it) flag and help line
(`setting`). `CommonParams` holds those every method honours (budgets, blocks,
reconstruction); a method adds its own in a subclass (`MergeParams`, `LcpParams`). The
user's settings stay a plain mapping in `Options.params` (what the report records);
`parse_params` checks them once, in one message style, and `Context.params` gives the
typed object the method reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..channels import TransformerPart, Trace
from ..errors import UsageError
from ..analysis.plan import Plan
from ..recover import DEFAULT_LR, DEFAULT_SECONDS, DEFAULT_STEPS
from ..roundto import Rounding

Scores = Mapping[int, np.ndarray]
Check = Callable[[str, Any], None]


# ----------------------------------------------------------------------------- checks (one message style)


def number(low: float, high: float, *, low_open: bool = False, integer: bool = False) -> Check:
    """A check: a finite number (an integer with `integer`) in [low, high] (or (low, high])."""

    def check(key: str, value: Any) -> None:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{key} must be a number, got {value!r}") from None
        inside = (x > low if low_open else x >= low) and x <= high
        if not math.isfinite(x) or not inside or (integer and x != int(x)):
            kind = "an integer" if integer else "a number"
            raise UsageError(f"{key} must be {kind} in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")

    return check


def choice(*choices: Any) -> Check:
    """A check: one of `choices`."""

    def check(key: str, value: Any) -> None:
        if value not in choices:
            bad_choice(key, value, choices)

    return check


def bad_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    raise UsageError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


class Refit(str, Enum):
    """What the refit of `methods.reconstruct` solves (``--refit``)."""

    #: weights and bias by least squares
    LS = "ls"
    #: the bias only: plain pruning's weights, each refitted layer's output mean restored (FLAP-style)
    MEAN = "mean"


class BudgetAllocation(str, Enum):
    """How a budget (``--target-macs`` / ``--target-params``) is shared among the groups (`methods.budget`)."""

    #: one global order of per-group normalised scores (`budget.Ranking`)
    RANKING = "ranking"
    #: least total predicted reconstruction damage per MAC saved (`budget.damage_plan`; data-driven methods)
    DAMAGE = "damage"


class DepthGain(str, Enum):
    """Whether a budget shared by damage weighs each layer's damage by its measured gain to the outputs
    (`methods.depthgain`), and in what the outputs' error is measured."""

    #: every layer's damage counts as it is
    OFF = "off"
    #: the error of every real token of the outputs, as the verdict compares them
    TOKENS = "tokens"
    #: the error of each sample's outputs averaged over its real tokens (a sentence embedding)
    POOLED = "pooled"


#: how residual blocks are ranked (`methods.blocks`)
BLOCK_CRITERIA = ("output", "norm")
FRACTION = number(0.0, 1.0, low_open=True)
BOOL = choice(True, False)
POSITIVE_INT = number(1, math.inf, integer=True)


def _ratio(key: str, value: Any) -> None:
    number(0.0, 1.0)(key, value)
    if float(value) >= 1.0:
        raise UsageError(f"{key} must be a number in [0, 1), got {value!r}")


RATIO = _ratio


def group_fractions(key: str, value: Any) -> None:
    """A check: ``((group index, fraction removed in [0, 1)), ...)``, each group once."""
    try:
        pairs = [(int(g), float(r)) for g, r in value]
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be pairs (group index, fraction), got {value!r}") from None
    if len({g for g, _ in pairs}) != len(pairs) or any(g < 0 or not 0.0 <= r < 1.0 for g, r in pairs):
        raise UsageError(f"{key} needs distinct group indices >= 0 and fractions in [0, 1), got {value!r}")


@dataclass(frozen=True)
class Setting:
    """How one `Params` field is given (CLI flag, help) and checked."""

    check: Check
    flag: str | None = None  # the CLI option; None: API only (``params={...}``)
    help: str = ""
    #: the CLI passes the value even when the user left it at its default (so the report records it)
    recorded: bool = False
    #: a value the CLI leaves out (the default spelled out); never recorded
    omit: Any = None
    #: the setting changes which channels are removed (a dry run passes it on)
    planning: bool = True
    #: CLI: a --name/--no-name flag pair with no default (None: the method decides)
    switch: bool = False
    choices: tuple[str, ...] = ()
    cli_type: type | None = None  # click's type when the field's default does not tell it

    def name(self, key: str) -> str:
        """The name in messages: the flag, else the key."""
        return self.flag or key


def setting(default: Any, check: Check, **how: Any) -> Any:
    """A `Params` field: its default, written once, and its `Setting`."""
    return field(default=default, metadata={"setting": Setting(check, **how)})


P = TypeVar("P", bound="CommonParams")


@dataclass(frozen=True)
class CommonParams:
    """Settings every method honours. Field order is the order the CLI passes (and the report records) them."""

    target_macs: float | None = setting(None, FRACTION, flag="--target-macs", cli_type=float,
                                        help="Prune until MACs fall to this fraction (shared among groups by --budget-allocation).")
    target_params: float | None = setting(None, FRACTION, flag="--target-params", cli_type=float,
                                          help="Prune until parameters fall to this fraction (shared by --budget-allocation).")
    max_ratio: float = setting(0.9, FRACTION, flag="--max-ratio", recorded=True, help="Budgets: most any group may lose.")
    budget_allocation: str | None = setting(
        None, choice(*(a.value for a in BudgetAllocation)), flag="--budget-allocation",
        choices=tuple(a.value for a in BudgetAllocation),
        help="Budgets: share them by predicted reconstruction damage per MAC saved, or by the global normalised "
             "ranking [default: damage for thinet, cp, ldrf, contrib, obs; ranking for the other methods].")
    min_width: float = setting(0.125, number(0.0, 1.0), flag="--min-width", cli_type=float,
                               help="Budgets by damage: least fraction of a group's channels kept, unless removing "
                                    "more costs no predicted damage [default: 0.125].")
    blocks: float | None = setting(None, number(0.0, 1.0), flag="--blocks", cli_type=float,
                                   help="Also remove this fraction of removable residual blocks.")
    calib_positions: int | None = setting(None, POSITIVE_INT, flag="--calib-positions", planning=False, cli_type=int,
                                          help="Spatial positions sampled per image for Gram matrices.")
    reconstruct: bool | None = setting(None, BOOL, flag="--reconstruct", switch=True, planning=False,
                                       help="Least-squares refit of consumers [default: on with --calib].")
    error_correction: bool | None = setting(None, BOOL, flag="--error-correction", switch=True, planning=False,
                                            help="The refit also fits every linear layer downstream of a cut, in order, "
                                                 "so later layers correct earlier cuts [default: on; off with --recover on a transformer].")
    refit: Refit = setting(Refit.LS, choice(*(r.value for r in Refit)), flag="--refit",
                           choices=tuple(r.value for r in Refit), omit=Refit.LS, planning=False,
                         help="What the refit changes: ls, weights and bias by least squares; mean, the bias only, "
                              "so each refitted layer keeps its output mean (FLAP-style bias compensation).")
    correction_horizon: int | None = setting(None, number(0, math.inf, integer=True), flag="--correction-horizon",
                                             planning=False, cli_type=int,
                                             help="Error correction: refit at most this many layers past a consumer "
                                                  "[default: every layer downstream].")
    bias_correction: bool | None = setting(None, BOOL, flag="--bias-correction", switch=True, planning=False,
                                           help="Layers the refit cannot solve (depthwise, grouped, transposed, 3-D convs) "
                                                "get their output mean restored through the bias [default: on].")
    token_weights: bool | None = setting(None, BOOL, flag="--token-weights", switch=True,
                                         help="Sequence models: leave padding tokens (attention_mask 0) out of the "
                                              "statistics, refits and verdict, and weigh a token's error before a "
                                              "LayerNormalization by 1 / its variance there, as the norm does [default: on].")
    depth_gain: str | None = setting(
        None, choice(*(d.value for d in DepthGain)), flag="--depth-gain", choices=tuple(d.value for d in DepthGain),
        help="Budgets by damage: weigh each layer's damage by how much a small error there grows on its way to the "
             "outputs, measured on the calibration data (tokens: every token of the outputs; pooled: each sample's "
             "mean over its tokens) [default: pooled on post-LayerNorm transformers, off otherwise].")
    #: a per-group allocation ``((group, fraction removed), ...)``, unlisted groups kept whole, in place of
    #: the uniform --ratio (the gated search of `planning.search` sets it; API only)
    group_ratios: tuple[tuple[int, float], ...] | None = setting(None, group_fractions)
    #: base ridge alpha of the refit, relative to the mean input variance (`methods.reconstruct` docstring)
    ridge: float = setting(1e-6, number(0.0, math.inf))
    #: LDRF: fraction of the output variance the embedding keeps
    energy: float = setting(0.995, FRACTION)
    residual_targets: bool = setting(True, BOOL)
    block_criterion: str = setting("output", choice(*BLOCK_CRITERIA))
    block_samples: int = setting(128, POSITIVE_INT)
    recover: bool | None = setting(None, BOOL, flag="--recover", switch=True, planning=False,
                                   help="Label-free recovery after the refit: Adam steps on each block's weights toward the "
                                        "original's block outputs (needs --calib and the [recover] extra).")
    recover_steps: int = setting(DEFAULT_STEPS, POSITIVE_INT, flag="--recover-steps", planning=False, cli_type=int,
                                 help=f"--recover: gradient steps per block [default: {DEFAULT_STEPS}].")
    recover_lr: float = setting(DEFAULT_LR, number(0.0, 1.0, low_open=True), flag="--recover-lr", planning=False,
                                cli_type=float, help=f"--recover: Adam's learning rate, cosine-decayed; a block whose guard rejects its steps "
                                     f"tries again at a tenth of it, and the blocks after one kept so (its first try not cut by the clock) start "
                                     f"there [default: {DEFAULT_LR:g}].")
    recover_time: float = setting(DEFAULT_SECONDS, number(0.0, math.inf, low_open=True), flag="--recover-time",
                                  planning=False, cli_type=float,
                                  help=f"--recover: the recovery's time budget in seconds, its network guard included [default: {DEFAULT_SECONDS:g}].")
    heads: float | None = setting(None, RATIO, flag="--heads", cli_type=float,
                                  help="Transformers: fraction of each layer's attention heads removed [default: --ratio]; "
                                       "with --target-*: the most they may lose.")
    ffn: float | None = setting(None, RATIO, flag="--ffn", cli_type=float,
                                help="Transformers: fraction of FFN neurons (every other group) removed [default: --ratio]; "
                                     "with --target-*: the most they may lose.")
    hidden: float | None = setting(None, RATIO, flag="--hidden", cli_type=float,
                                   help="Transformers: fraction of the hidden size removed [default: --ratio]; with --target-*: "
                                        "the most it may lose.")

    def __post_init__(self) -> None:
        # an enum setting given by its value (``params={"refit": "mean"}``) is held as the member (checked before:
        # `check_options`)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, Enum) and value is not None and not isinstance(value, type(f.default)):
                object.__setattr__(self, f.name, type(f.default)(value))

    def allocation(self, default: BudgetAllocation) -> BudgetAllocation:
        """``--budget-allocation`` as given, else `default` (the method's)."""
        return default if self.budget_allocation is None else BudgetAllocation(self.budget_allocation)

    def part_setting(self, part: TransformerPart) -> float | None:
        """``--heads`` / ``--ffn`` / ``--hidden`` of a group of `part`, None when not given."""
        return {TransformerPart.HEADS: self.heads, TransformerPart.FFN: self.ffn, TransformerPart.HIDDEN: self.hidden}[part]

    def part_ratio(self, part: TransformerPart, ratio: float) -> float:
        """The uniform ratio of a group of `part`: its own setting, else `ratio` (--ratio)."""
        own = self.part_setting(part)
        return ratio if own is None else own

    @classmethod
    def parse(cls: type[P], values: Mapping[str, Any]) -> P:
        """The typed settings of `values` (keys of other methods are left out; None means the default)."""
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in own and v is not None})


#: Neuron Merging's selection criteria and scales (see `methods.merge`)
MERGE_CRITERIA = ("l1", "l1_bias", "l2", "fpgm")
MERGE_SCALES = ("norm", "projection")


@dataclass(frozen=True)
class MergeParams(CommonParams):
    merge_threshold: float | None = setting(None, number(0.0, 1.0), flag="--merge-threshold", cli_type=float,
                                            help="merge: minimum cosine similarity [default: 0.45 dense, 0.1 conv].")
    merge_scale: str = setting("norm", choice(*MERGE_SCALES), flag="--merge-scale", choices=MERGE_SCALES, omit="norm",
                               help="merge: scale of a merged neuron, the paper's norm ratio or the least-squares projection.")


@dataclass(frozen=True)
class LcpParams(CommonParams):
    lcp_iterations: int = setting(60, POSITIVE_INT)
    lcp_population: int = setting(12, POSITIVE_INT)
    lcp_samples: int = setting(256, POSITIVE_INT)
    lcp_tournament: int = setting(4, POSITIVE_INT)


#: the norms `methods.lowrank` measures a layer's output error in (`methods.lowrank.OutputMetric`)
LOWRANK_METRICS = ("energy", "channel")


@dataclass(frozen=True)
class LowRankParams(CommonParams):
    lowrank_metric: str = setting("energy", choice(*LOWRANK_METRICS), flag="--lowrank-metric", choices=LOWRANK_METRICS,
                                  omit="energy", help="lowrank: the output error's norm, the outputs' energy or every "
                                                      "channel alike (standardised).")


def settings_of(params: type[CommonParams]) -> dict[str, Setting]:
    """field name -> `Setting` of a `Params` class, in field order."""
    return {f.name: f.metadata["setting"] for f in fields(params)}


# ----------------------------------------------------------------------------- what a method sees and returns


@dataclass(frozen=True)
class Options:
    method: str = "l1"
    ratio: float = 0.5
    round_to: Rounding = Rounding()  # an int given here is `Rounding(n)`
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    criterion: str = "l1"
    calib: str | None = None
    calib_samples: int | None = None
    batch_size: int = 32
    params: Mapping[str, Any] = field(default_factory=dict)  # the user's settings, as given (see `parse_params`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "round_to", Rounding.of(self.round_to))


@dataclass
class Context:
    model: onnx.ModelProto  # the original, untouched
    graph: gs.Graph  # the working graph, rewritten by apply
    trace: Trace
    options: Options
    input_shapes: Mapping[str, tuple[int, ...]]
    opset: int
    calibration: Any = None  # calib.CalibrationSet when --calib was given
    progress: Callable[[int, int], None] | None = None
    notes: list[str] = field(default_factory=list)  # shared steps (budgets) report here

    @property
    def params(self) -> CommonParams:
        """The method's typed settings (`MethodSpec.params` of `options.method`)."""
        spec = METHODS.get(self.options.method)
        return (spec.params if spec is not None else CommonParams).parse(self.options.params)


@dataclass(frozen=True)
class MethodOutcome:
    plan: Plan
    overrides: Mapping[tuple[str, int], np.ndarray] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    finish: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    needs_calibration: bool = False


Importance = Callable[[Context], Scores]
Planner = Callable[[Context, Scores], Plan]
Compensation = Callable[[Context, Plan], MethodOutcome]


def no_compensation(ctx: Context, plan: Plan) -> MethodOutcome:
    return MethodOutcome(plan)


@dataclass(frozen=True)
class MethodSpec:
    """One pruning method: everything `api`, the CLI and `--help` need to know of it.

    A method is either the composition ``compensation(ctx, planner(ctx, importance(ctx)))``
    or, for one that interleaves selection and fitting, its own `run`. `plan_only` methods
    (importance and planner need neither data nor a search) show their plan in a dry run.
    """

    name: str
    help: str  # the one line of `--help`
    params: type[CommonParams] = CommonParams
    importance: Importance | None = None
    planner: Planner | None = None
    compensation: Compensation = no_compensation
    run: Callable[[Context], MethodOutcome] | None = None
    needs_data: bool = False
    plan_only: bool = False
    #: the --criterion values it takes (empty: it ignores --criterion; None: any criterion)
    criteria: tuple[str, ...] | None = ()
    #: the criterion used when --criterion is not given (methods that take one)
    default_criterion: str = "l1"
    #: the fraction of residual blocks removed before tracing (default: the `blocks` setting)
    block_fraction: Callable[[Options], float | None] | None = None
    #: the MACs target when no budget is given (LCP: 1 - ratio); None: a uniform ratio
    default_macs: Callable[[float], float] | None = None
    #: the report's words for what was asked, when neither a budget nor --blocks says it
    request: Callable[[Options], str] | None = None
    #: warnings of settings this method ignores, beyond those derived from `params`
    ignored: Callable[[Options], list[str]] | None = None

    def __call__(self, ctx: Context) -> MethodOutcome:
        if self.run is not None:
            return self.run(ctx)
        return self.compensation(ctx, self.plan(ctx))

    def plan(self, ctx: Context) -> Plan:
        """The plan of importance + planner (what a dry run shows)."""
        assert self.importance is not None and self.planner is not None, f"{self.name} has no plan of its own"
        return self.planner(ctx, self.importance(ctx))

    def blocks_to_remove(self, options: Options) -> float | None:
        if self.block_fraction is not None:
            return self.block_fraction(options)
        return self.params.parse(options.params).blocks


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


def all_settings() -> dict[str, Setting]:
    """Every setting of every registered method (common ones first, then each method's own)."""
    out = settings_of(CommonParams)
    for spec in METHODS.values():
        out.update(settings_of(spec.params))
    return out


# ----------------------------------------------------------------------------- validation, once


def check_options(options: Options) -> tuple[str, ...]:
    """Raise `UsageError` for a bad value or an unknown setting; warn of settings the method ignores."""
    spec = get_method(options.method)
    if isinstance(options.seed, bool) or not isinstance(options.seed, (int, np.integer)) or options.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {options.seed!r}")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {options.batch_size}")
    if options.calib_samples is not None and options.calib_samples < 1:
        raise UsageError(f"--calib-samples must be a positive integer, got {options.calib_samples}")
    known = all_settings()
    unknown = sorted(set(options.params) - set(known))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key, value in options.params.items():
        if value is not None:
            known[key].check(known[key].name(key), value)
    params, method = options.params, options.method
    if spec.criteria and options.criterion not in spec.criteria:
        bad_choice(f"--criterion (with --method {method})", options.criterion, spec.criteria)
    warnings = []
    takers = [s.name for s in METHODS.values() if s.criteria != ()]
    if options.criterion != "l1" and spec.criteria == ():
        warnings.append(f"--criterion is used by --method {' and '.join(takers)} only; {method} ignores it")
    own = settings_of(spec.params)
    for other in METHODS.values():  # flags of another method's own settings
        extra = {k: s for k, s in settings_of(other.params).items() if k not in own and s.flag}
        if other is not spec and any(params.get(k) is not None for k in extra):
            flags = " and ".join(s.flag for s in extra.values() if s.flag)
            warnings.append(f"{flags} are used by --method {other.name} only; {method} ignores them")
    if any(params.get(k) is not None for k in ("recover_steps", "recover_lr", "recover_time")) and not params.get("recover"):
        warnings.append("--recover-steps, --recover-lr and --recover-time are used with --recover only; ignored")
    if params.get("reconstruct") and options.calib is None:
        warnings.append("--reconstruct needs calibration data (--calib); nothing is refitted")
    if spec.ignored is not None:
        warnings.extend(spec.ignored(options))
    return tuple(warnings)
