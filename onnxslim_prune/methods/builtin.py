"""Every built-in method, registered in one place (the order is the order of `--help`).

Adding a method is one `MethodSpec` here: its settings (a `Params` subclass), its `--help`
line, whether it needs calibration data and whether a dry run can show its plan follow
from it; `api` and the CLI know no method names.
"""

from __future__ import annotations

from collections.abc import Callable

from . import activation, contribution, datadriven, lowrank, merge, nisp
from .budget import choose_plan
from .lcp import lcp
from ..analysis.plan import Plan
from ..analysis.score import CRITERIA, score_groups
from .base import MERGE_CRITERIA, Context, Importance, LcpParams, LowRankParams, MergeParams, MethodSpec, Options, MethodOutcome, Scores, register

CRITERION_HELP = {
    "l1": "smallest L1 norm of a channel's weights removed (Li et al. 2017)",
    "l1_bias": "smallest L1 norm of weights and bias removed (the Neuron Merging authors' ranking)",
    "l2": "smallest L2 norm removed (Li et al. 2017)",
    "bn": "smallest BatchNorm scale |gamma| removed (Network Slimming, Liu et al. 2017)",
    "fpgm": "channels nearest the geometric median removed (He et al. 2019)",
    "random": "seeded random channels removed (a control)",
}


def criterion_scores(name: str | None) -> Importance:
    """Importance by a data-free criterion of `analysis.score` (None: the --criterion option)."""

    def importance(ctx: Context) -> Scores:
        return score_groups(ctx.trace, ctx.graph, name or ctx.options.criterion, ctx.options.seed)

    importance.__doc__ = f"`{name or '--criterion'}` scores of every prunable group."
    return importance


def _no_channels(ctx: Context) -> MethodOutcome:
    """Block pruning happens before tracing (`methods.blocks.prune_blocks`); no channel is removed here."""
    return MethodOutcome(Plan(()))


def _layer_ignores(options: Options) -> list[str]:
    if any(options.params.get(k) is not None for k in ("target_macs", "target_params", "blocks")):
        return ["--method layer removes the fraction --ratio of the residual blocks; budgets and --blocks are ignored"]
    return []


for _name, _help in CRITERION_HELP.items():
    assert _name in CRITERIA
    register(MethodSpec(_name, _help, importance=criterion_scores(_name), planner=choose_plan, plan_only=True))

register(MethodSpec(
    "merge", "Neuron Merging (Kim et al. 2020): prune by --criterion (default l1_bias, the authors' ranking), merge similar neurons into kept ones; data-free",
    params=MergeParams, importance=criterion_scores(None), planner=choose_plan, compensation=merge.merge_outcome,
    plan_only=True, criteria=MERGE_CRITERIA, default_criterion="l1_bias",
))
_DATA_DRIVEN: tuple[tuple[str, Callable[[Context], MethodOutcome], str], ...] = (
    ("thinet", datadriven.thinet, "ThiNet (Luo et al. 2017): greedy minimal next-layer change + least squares"),
    ("cp", datadriven.cp, "Channel Pruning (He et al. 2017): LASSO selection + least squares"),
    ("ldrf", datadriven.ldrf, "LDRF (Chen et al. 2019): embedding-space selection + closed-form recomposition"),
    ("nisp", nisp.nisp, "NISP (Yu et al. 2018): final-response importance propagated back"),
    *((stat.name, stat, stat.help) for stat in activation.ACTIVATION_CRITERIA),
    ("contrib", contribution.contrib, "output-contribution importance (a label-free stand-in for Kwon et al. 2022's Fisher) + least squares"),
    ("kwon", contribution.kwon, "contrib with one global cost-equal ranking of heads and FFN neurons (after Kwon et al. 2022's mask search) + least squares"),
    ("obs", contribution.obs, "error left after refitting the other inputs (OBS block form) + least squares"),
)
for _name, _run, _help in _DATA_DRIVEN:
    register(MethodSpec(_name, f"{_help}; needs --calib", run=_run, needs_data=True))
register(MethodSpec(
    "lowrank", "activation-aware low-rank decomposition (LDRF's, as in ASVD, SVD-LLM, BALF): each Conv/Gemm/MatMul split in "
               "two through the principal subspace of its outputs, ranks by least damage per MAC saved; needs --calib",
    params=LowRankParams, run=lowrank.lowrank, needs_data=True, default_macs=lambda ratio: 1.0 - ratio, ignored=lowrank.ignored,
))
register(MethodSpec(
    "lcp", "layer-compensated pruning (Chin et al. 2018): a learned global ranking under a MACs target",
    params=LcpParams, run=lcp, criteria=None, default_macs=lambda ratio: 1.0 - ratio,
))
register(MethodSpec(
    "layer", "block pruning: remove the fraction --ratio of the residual blocks", run=_no_channels,
    block_fraction=lambda options: options.ratio,
    request=lambda options: f"residual blocks removed: fraction {options.ratio:g}", ignored=_layer_ignores,
))
