"""`onnx-prune`: a thin click layer over `onnxslim_prune.api`.

Every `PruneError` becomes one line on stderr and its exit code (2 usage, 1 model/data);
nothing is written unless the pruned model validated, and then the model, its external data,
the report and the plot are written together or not at all (`atomic.Outputs`). Options that
contradict each other are usage errors; options the run does not use are named in a warning.
"""

from __future__ import annotations

import itertools
import logging
import signal
import sys
from importlib import resources
from pathlib import Path
from dataclasses import replace
from collections.abc import Callable, Mapping
from dataclasses import fields
from enum import Enum
from typing import Any

import click

from . import api, ir
from ._version import __version__
from .calib import cache as calib_cache
from .calib import memory
from .calib.split import DEFAULT_HOLDOUT
from .console import ConsoleProgress
from .atomic import Outputs
from .errors import GateError, PruneError, UsageError
from .methods import builtin  # noqa: F401  (fills the method registry)
from .methods.defaults import DefaultMethod
from .methods.base import METHODS, CommonParams, Setting, all_settings
from .planning import plot as planning_plot
from .planning import latency_search
from .planning import search as search_mod
from .planning.workers import check_workers, default_workers
from .planning.search import DEFAULT_MARGIN, DEFAULT_MAX_PROBES, Allocation, Objective, SearchSettings
from .judge.verdict import Gates, check_gates_have_data
from .judge.report import REPORT_SCHEMA, group_rows, group_table
from .roundto import Rounding, RoundTo, RoundToParam, RoundToValue, resolve
from .settings import RunSettings

log = logging.getLogger("onnxslim_prune")

SAMPLE_MODEL = "lenet300.onnx"
SAMPLE_EVAL = "fmnist_test500.npz"


def _sample(name: str) -> Path:
    return Path(str(resources.files("onnxslim_prune") / "sample" / name))


def _setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per method setting that has a flag (`methods.base.Setting`), from the Params fields."""
    for key, spec in reversed(list(_cli_settings().items())):
        assert spec.flag is not None
        field = _FIELDS[key]
        if spec.switch:
            option = click.option(f"{spec.flag}/--no-{spec.flag[2:]}", key, default=None, help=spec.help)
        elif spec.choices:
            option = click.option(spec.flag, key, type=click.Choice(list(spec.choices)), default=_choice_text(field.default),
                                  show_default=True, help=spec.help, callback=_as_member(field.default))
        elif spec.recorded:
            option = click.option(spec.flag, key, default=field.default, show_default=True, type=type(field.default),
                                  help=spec.help)
        else:
            option = click.option(spec.flag, key, type=spec.cli_type, default=None, help=spec.help)
        command = option(command)
    return command


def _choice_text(default: Any) -> Any:
    """A choice's default as the command line spells it (an enum member by its value)."""
    return default.value if isinstance(default, Enum) else default


def _as_member(default: Any) -> Callable[[click.Context, click.Parameter, Any], Any] | None:
    """For a setting whose values are an enum's (``--refit``): the option's value as the member, None kept."""
    if not isinstance(default, Enum):
        return None
    kind = type(default)
    return lambda _ctx, _param, value: None if value is None else kind(value)


def _cli_settings() -> dict[str, Setting]:
    return {k: s for k, s in all_settings().items() if s.flag}


_PARAMS: list[type[CommonParams]] = [CommonParams, *(m.params for m in METHODS.values())]
_FIELDS = {f.name: f for params in _PARAMS for f in fields(params)}


def _given_settings(values: Mapping[str, Any], *, planning_only: bool = False) -> dict[str, Any]:
    """Method settings given on the command line (unset ones, and spelled-out defaults, are left to the method)."""
    out = {}
    for key, spec in _cli_settings().items():
        value = values.get(key)
        if value is None or (spec.omit is not None and value == spec.omit) or (planning_only and not spec.planning):
            continue
        out[key] = value
    return out


def _methods_epilog() -> str:
    width = max(map(len, METHODS))
    lines = ["\b", "Methods (--method):"] + [f"  {m.name:<{width}}  {m.help}" for m in METHODS.values()]
    lines += ["", "\b", "Exit codes: 0 written; 1 model or data error; 2 usage error; 3 a gate missed; 130 interrupted; 143 terminated."]
    return "\n".join(lines)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `kill`), unwound as Ctrl-C is: Python's default would stop at once, leaving the
    frontier's and the reference outputs' temporary folders (gigabytes on a large model) and staged outputs behind."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _interrupted(exc: BaseException) -> None:
    """Ctrl-C (KeyboardInterrupt, click's Abort) or SIGTERM (`_Terminated`): one line and the signal's exit code."""
    terminated = isinstance(exc, _Terminated)
    click.echo("terminated" if terminated else "aborted", err=True)
    sys.exit(128 + signal.SIGTERM if terminated else 130)


class _OneLineErrors(click.Command):
    """Click's own parse errors (bad number, unknown option) as one `error:` line, exit 2; SIGTERM as Ctrl-C."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        # only where nobody chose otherwise: a process that ignores SIGTERM, or an embedding app's handler, keeps it
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except (click.exceptions.Abort, KeyboardInterrupt) as exc:
            _interrupted(exc)


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
               epilog=_methods_epilog())
@click.version_option(__version__, "--version", prog_name="onnx-prune", message="%(prog)s %(version)s")
@click.argument("model", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output path [default: MODEL.pruned.onnx].")
@click.option("--method", "method_choice", default=None, type=click.Choice(list(METHODS)), metavar="NAME",
              help="Pruning method (listed below) [default: l1; with --calib the best measured for the model's kind: "
                   "obs for transformers, thinet otherwise].")
@click.option("--ratio", default=0.5, show_default=True, type=float, help="Fraction of each group's channels to remove, in [0, 1).")
@click.option("--round-to", "round_to_value", default=RoundTo.AUTO.value, show_default=True, type=RoundToParam(),
              help="Keep channel counts at multiples of N (1: no rounding); auto: per group the original's alignment, up to "
              "the CPU kernels' channel block (16 with AVX-512, 8 with AVX2), so the pruned model is not slower.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Protect nodes whose name matches (glob); repeatable.")
@click.option("--input-shape", multiple=True, metavar="NAME:1x3x224x224", help="Fix a dynamic input shape; repeatable.")
@click.option("--criterion", default=None, help="Selection criterion of methods that take one [default: l1; merge: l1_bias].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random choices and validation inputs.")
@click.option("--calib", metavar="PATH|random", help="Calibration data: .npz/.npy, an image folder, or 'random'.")
@click.option("--calib-samples", type=int, help="Use the first N calibration samples.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Calibration batch size.")
@click.option("--size", "image_size", metavar="HxW", help="Image folders: resize to HxW [default: the model's].")
@click.option("--resize", "resize_mode", type=click.Choice(["stretch", "shorter"]), default="stretch", show_default=True,
              help="Image folders: stretch to --size, or scale the shorter side and crop the centre.")
@click.option("--mean", metavar="M[,M,M]", help="Image folders: per-channel mean (after --scale).")
@click.option("--std", metavar="S[,S,S]", help="Image folders: per-channel std (after --scale).")
@click.option("--scale", default=1 / 255, show_default=True, type=float, help="Image folders: pixel scale.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
              help="Image folders: the model input's layout.")
@click.option("--bgr", is_flag=True, help="Image folders: feed BGR instead of RGB.")
@_setting_options
@click.option("--eval", "eval_data", type=click.Path(path_type=Path),
              help=".npz with inputs (and 'labels' for accuracy): the held-out verdict; all --calib data is then fitted.")
@click.option("--calib-memory", metavar="SIZE",
              help="Most memory calibration passes keep (512M, 2G, 25%); past it they spill to disk [default: 25% of RAM].")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder of the calibration statistics cache [default: $ONNXSLIM_PRUNE_CACHE, else the platform's user cache folder].")
@click.option("--cache-size", metavar="SIZE",
              help="Most disk the statistics cache takes (500M, 2G); the least recently used entries go first [default: 2G].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the statistics cache.")
@click.option("--clear-cache", is_flag=True, help="Empty the statistics cache, print what was freed and exit (no MODEL).")
@click.option("--holdout", default=DEFAULT_HOLDOUT, show_default=True, type=float,
              help="Fraction of --calib held out for the verdict (never fitted); 0 measures on fitted samples.")
@click.option("--min-top1-agreement", type=float, metavar="F", help="Gate: held-out top-1 agreement with the original >= F.")
@click.option("--min-cosine", type=float, metavar="F", help="Gate: cosine of the outputs with the original's >= F.")
@click.option("--min-correlation", type=float, metavar="F",
              help="Gate: sample-centred correlation of the outputs with the original's >= F.")
@click.option("--max-drop", type=float, metavar="P", help="Gate: accuracy on labelled --eval data falls by at most P points.")
@click.option("--min-speedup", type=float, metavar="F",
              help="Gate: the written model's measured speedup (original / pruned latency, same run) >= F. Always on: not "
              "slower than the original (3% tolerance, beyond the noise).")
@click.option("--sensitivity", "show_sensitivity", is_flag=True,
              help="Cut each group alone at --sensitivity-ratios and print the table (with a gate: also the search's profile).")
@click.option("--sensitivity-ratios", default="0.25,0.5,0.75", show_default=True, metavar="R,R,...",
              help="Ratios each group is cut at alone (sensitivity and the search's profile).")
@click.option("--allocation", type=click.Choice([a.value for a in Allocation]), default=Allocation.AUTO.value,
              show_default=True, help="Search: per-group allocation, greedy over the sensitivity profile, the global ranking, or "
              "the closed-form predicted damage (no profile probes; auto: damage for thinet, cp, ldrf, contrib, obs, else "
              "sensitivity); given with --target-*, the sensitivity allocation meets the target.")
@click.option("--objective", type=click.Choice([o.value for o in Objective]), default=Objective.MACS.value,
              show_default=True, help="Search: what is made smallest within the gate.")
@click.option("--target-latency", type=float, metavar="F",
              help="--objective latency: the written model's measured latency <= F x the original's (same run, interleaved).")
@click.option("--max-probes", default=DEFAULT_MAX_PROBES, show_default=True, type=int,
              help="Search: most probes of the bisection (the sensitivity probes come on top).")
@click.option("--search-margin", default=DEFAULT_MARGIN, show_default=True, type=float, metavar="Z",
              help="Search: a probe passes when each gate holds with Z standard errors of its figure to spare.")
@click.option("--workers", type=int, default=None, metavar="N",
              help="Search and --sensitivity: run the profile's probes in N local processes (1: one after another) "
                   "[default: the cores].")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Search and --sensitivity: run the profile's probes as tasks on the Ray cluster at ADDRESS ('auto', "
                   "'local', ray://HOST:PORT); needs pip install 'onnxslim-prune[ray]'.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Write a PNG of the sensitivity profile and the search's probes (needs matplotlib: the [plot] extra).")
@click.option("--keep-failed", is_flag=True, help="Write the model even when a gate is missed (exit code still 3).")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time the written model against the original (the speed gates); --no-latency: the speed is unknown.")
@click.option("--dry-run", is_flag=True, help="Print the channel groups (members, size, why frozen, MACs) and stop.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--groups", "show_groups", is_flag=True, help="Print the per-group table after pruning.")
@click.option("--demo", is_flag=True, help="Prune the bundled LeNet-300-100 (Fashion-MNIST) and measure its accuracy.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug and tracebacks).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(
    model: Path | None,
    output: Path | None,
    method_choice: str | None,
    ratio: float,
    round_to_value: RoundToValue,
    exclude: tuple[str, ...],
    input_shape: tuple[str, ...],
    criterion: str | None,
    seed: int,
    calib: str | None,
    calib_samples: int | None,
    batch_size: int,
    image_size: str | None,
    resize_mode: str,
    mean: str | None,
    std: str | None,
    scale: float,
    layout: str,
    bgr: bool,
    eval_data: Path | None,
    calib_memory: str | None,
    cache_dir: Path | None,
    cache_size: str | None,
    no_cache: bool,
    clear_cache: bool,
    holdout: float,
    min_top1_agreement: float | None,
    min_cosine: float | None,
    min_correlation: float | None,
    max_drop: float | None,
    min_speedup: float | None,
    show_sensitivity: bool,
    sensitivity_ratios: str,
    allocation: str,
    objective: str,
    target_latency: float | None,
    max_probes: int,
    search_margin: float,
    workers: int | None,
    ray_address: str | None,
    plot_path: Path | None,
    keep_failed: bool,
    latency: bool,
    dry_run: bool,
    report_path: Path | None,
    show_groups: bool,
    demo: bool,
    verbose: int,
    quiet: bool,
    **settings: Any,
) -> None:
    """Prune channels of an ONNX MODEL and write a smaller, validated model.

    The verdict (how closely the pruned model follows the original) is measured on samples
    no fitting saw: --eval data, else the held-out part of --calib, else seeded random inputs
    (which prove structure, not function: the verdict then says function unknown). Gates turn it
    into an exit code for CI; they need real samples (--calib or --eval).
    """
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    console: ConsoleProgress | None = None
    try:
        _check_conflicts(model)
        cache = _cache_settings(cache_dir, cache_size, no_cache)
        if clear_cache:
            _clear_cache(cache, model is not None or demo, no_cache, quiet)
            return
        if demo:
            model = _sample(SAMPLE_MODEL)
            eval_data = eval_data or _sample(SAMPLE_EVAL)
            output = output or Path.cwd() / "lenet300.pruned.onnx"
        if model is None:
            raise UsageError("give a MODEL path (or --demo)")
        shapes = ir.parse_input_shapes(input_shape)
        method = method_choice  # None: the default for the model's kind, chosen after the run's one load
        gates = Gates(min_top1_agreement=min_top1_agreement, min_cosine=min_cosine, min_correlation=min_correlation,
                      max_drop=max_drop, min_speedup=min_speedup)
        if min_speedup is not None and not latency:
            raise UsageError("--min-speedup needs the latency measurement: drop --no-latency")
        preprocess = _preprocess(image_size, resize_mode, mean, std, scale, layout, bgr)
        pool: dict[str, Any] = dict(workers=check_workers(default_workers() if workers is None else workers, ray_address),
                    ray_address=ray_address)
        by_latency = Objective(objective) is Objective.LATENCY
        round_to = resolve(round_to_value)
        if dry_run:  # only the settings that choose the plan
            _warn_ignored("--dry-run only traces and plans; it writes and measures nothing", _RUN_ONLY + _PIXELS + tuple(
                k for k in settings if k not in _given_settings(settings, planning_only=True)))
            _dry_run(model, RunSettings(method, ratio, round_to=round_to, exclude=exclude, input_shapes=shapes, seed=seed,
                                        criterion=criterion, calib=calib, params=_given_settings(settings, planning_only=True),
                                        preprocess=preprocess))
            return
        if calib is None or not Path(calib).is_dir():
            _warn_ignored("--calib is not an image folder", _PIXELS)
        target = output or model.with_name(model.name.removesuffix(".onnx") + ".pruned.onnx")
        external = _check_paths(model, target, report_path, plot_path)
        console = None if quiet else ConsoleProgress()
        params = _given_settings(settings)
        run = RunSettings(
            method, ratio, round_to=round_to, exclude=exclude, input_shapes=shapes, seed=seed,
            criterion=criterion, calib=calib, calib_samples=calib_samples, batch_size=batch_size,
            eval_data=eval_data, preprocess=preprocess, params=params,
            holdout=holdout, gates=gates, latency=latency,
            calib_memory=None if calib_memory is None else memory.parse_size(calib_memory), cache=cache,
        )
        search_settings = SearchSettings(_floats(sensitivity_ratios, "--sensitivity-ratios") or (), max_probes,
                                         Allocation(allocation), Objective(objective), search_margin)
        searching = gates.any and _searches(params) and search_mod.searchable(method)
        targeted = _targets_with_profile(params) and search_mod.searchable(method)
        searched = timed = None
        if by_latency:
            _check_latency_request(params, method, target_latency)
            searching = targeted = False
        elif target_latency is not None:
            raise UsageError("--target-latency is the latency objective's: add --objective latency")
        measuring = show_sensitivity and not searching and not targeted and not by_latency
        _check_mode(method, gates, params, searching or targeted or by_latency, measuring, plot_path)
        check_gates_have_data(gates, calib, eval_data)  # before any work: no random figure can pass a gate
        if measuring:
            _sensitivity_only(model, run, search_settings, console, report_path, plot_path, quiet, pool)
            _closed(console)
            return
        if targeted:
            prober = _prober(model, run, console, search_settings.margin, pool)
            searched = search_mod.run_targeted(prober, search_settings, round_to)
            result = searched.result
        elif searching:
            if plot_path is not None:
                planning_plot.check_available()
            prober = _prober(model, run, console, search_settings.margin, pool)
            searched = search_mod.run_search(prober, search_settings, round_to, gates, with_sensitivity=show_sensitivity
                                             or search_settings.allocation is Allocation.SENSITIVITY)
            result = searched.result
        elif by_latency:
            prober = _prober(model, run, console, search_settings.margin, pool)
            if prober.data_free and click.get_current_context().get_parameter_source("allocation") is \
                    click.core.ParameterSource.DEFAULT:  # no data: the global ranking, not a profile on random inputs
                search_settings = replace(search_settings, allocation=Allocation.RANKING)
            timed = latency_search.run_latency_search(prober, search_settings, round_to, gates,
                                                      latency_search.LatencySettings(target_latency))
            searched, result = timed.search, timed.result
        else:
            prepared = api.prepare(model, run, progress=console, remember=False)
            _say_default(prepared.default, console)
            result = prepared.run(consume=True)
        _closed(console)
        console = None
        if searched is not None and not quiet:
            if searched.sensitivity and show_sensitivity:
                click.echo(search_mod.sensitivity_table(searched.sensitivity, searched.data_free))
            click.echo(search_mod.probe_table(searched) if timed is None else latency_search.latency_table(timed))
        report = result.report
        verdict = report.verdict
        # the speed gates are among the verdict's (`latency.speed_gates`); None: function unknown, nothing missed
        passed = verdict is None or verdict.passed is not False
        written = passed or keep_failed
        if written:
            report = replace(report, output_path=str(target))
        with Outputs() as outputs:  # model, its data, report and plot: all written or none
            if written:
                # the bytes the verdict ran are the bytes written: the model is not serialized again
                ir.stage_model(outputs, result.model, target, external=external.initializers, serialized=result.serialized)
            if report_path is not None:
                outputs.add_text(report_path, report.to_json() + "\n")
            if searched is not None and plot_path is not None:
                outputs.add_bytes(plot_path, planning_plot.render(searched.sensitivity, searched.probes,
                                                                  searched.settings.objective, searched.chosen))
            outputs.commit()
        if not quiet:
            click.echo(report.table(groups=show_groups, verbose=verbose > 0))
            click.echo(f"wrote {target}" if report.output_path else "not written: a gate was missed (--keep-failed writes it)")
        if not passed:
            missed = "; ".join(g.message for g in verdict.gates if not g.passed) if verdict is not None else ""
            raise GateError(f"gate missed: {missed}")
    except KeyboardInterrupt as exc:
        _closed(console)
        _interrupted(exc)
    except PruneError as exc:
        _closed(console)
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not bad input: still one line unless -vv asks for the traceback
        _closed(console)
        if verbose > 1:
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with -vv for details", err=True)
        sys.exit(1)


#: options only a run that prunes uses (a dry run ignores them)
_RUN_ONLY = ("output", "calib", "calib_samples", "batch_size", "eval_data", "calib_memory", "holdout", "min_top1_agreement",
             "min_cosine", "min_correlation", "max_drop", "sensitivity_ratios", "allocation", "target_latency",
             "max_probes", "search_margin", "workers", "ray_address", "plot_path", "keep_failed", "latency", "report_path", "show_groups")
#: image-folder options that only change pixel values (--size and --layout also size dynamic inputs)
_PIXELS = ("resize_mode", "mean", "std", "scale", "bgr")
#: options only a search or --sensitivity uses
_SEARCH_ONLY = ("sensitivity_ratios", "allocation", "max_probes", "search_margin", "workers", "ray_address")
#: options only a run that writes a model uses (--sensitivity without a gate only measures)
_MODEL_ONLY = ("output", "ratio", "target_macs", "target_params", "keep_failed", "show_groups")


def _given(names: tuple[str, ...] | list[str]) -> list[str]:
    """The flags of the options among `names` given on the command line (or by environment), as the user spells them."""
    ctx = click.get_current_context()
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)}
    given = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            given.append(flags.get(name, name))
    return given


def _warn_ignored(why: str, names: tuple[str, ...] | list[str]) -> None:
    """One warning naming every given option a mode does not use (never dropped silently)."""
    flags = _given(names)
    if flags:
        log.warning("%s: %s %s ignored", why, ", ".join(flags), "is" if len(flags) == 1 else "are")


def _say_default(chosen: DefaultMethod | None, console: ConsoleProgress | None) -> None:
    """A run with --calib and without --method says which method the model's kind chose (`methods.defaults`)."""
    if chosen is not None and console is not None and click.get_current_context().params.get("calib") is not None:
        console.echo(f"method: {chosen.name} ({chosen.reason}; --method to choose another)")  # no console: --quiet


def _prober(model: Path, run: RunSettings, console: ConsoleProgress | None, margin: float,
            pool: Mapping[str, Any]) -> search_mod.Prober:
    """A search's probes of `model` (loaded once, here); a run without --method gets its default from that load."""
    prober = search_mod.Prober(ir.load_model(model), run, progress=console, margin=margin, **pool)
    _say_default(prober.default, console)
    return prober


def _check_conflicts(model: Path | None) -> None:
    """Options that contradict each other are a usage error, before any work (docs/usage.md)."""
    ctx = click.get_current_context()
    values = ctx.params
    if values.get("demo") and model is not None:
        raise UsageError(f"--demo prunes the bundled sample model: drop {model} or --demo")
    if values.get("quiet") and values.get("verbose"):
        raise UsageError("-q/--quiet and -v/--verbose contradict each other: give one")
    if values.get("dry_run") and values.get("show_sensitivity"):
        raise UsageError("--dry-run only plans and --sensitivity measures the model: give one")
    budgets = _given(["target_macs", "target_params"])
    if budgets and _given(["ratio"]):
        raise UsageError(f"--ratio and {' and '.join(budgets)} are two budgets: give --ratio or the target")


def _check_mode(method: str | None, gates: Gates, params: Mapping[str, Any], searches: bool, measuring: bool,
                plot_path: Path | None) -> None:
    """Once the mode is known (search, --sensitivity alone, or one prune): its conflicts and ignored options."""
    if plot_path is not None and not searches and not measuring:
        raise UsageError("--plot draws the sensitivity profile and the search's probes: add --sensitivity or a gate "
                         "without --ratio (a search)")
    if measuring:
        if gates.any:  # --ratio or a --target-* with a gate and --sensitivity: which one was meant is unclear
            raise UsageError("--sensitivity with a gate searches, but " + " and ".join(
                _given(["ratio", "target_macs", "target_params"]) or ["the budget"])
                + " fixes the budget: drop it to search, or drop --sensitivity")
        _warn_ignored("--sensitivity without a gate only measures and writes no model", _MODEL_ONLY)
        return
    if not searches:
        _warn_ignored("no search or --sensitivity runs", _SEARCH_ONLY)
        if gates.any and _searches(params) and not search_mod.searchable(method):
            log.warning("--method %s chooses its own allocation, so a gate without --ratio does not search: "
                        "it prunes with the default --ratio %g and checks the gate", method, click.get_current_context().params["ratio"])
    if not gates.any and Objective(click.get_current_context().params["objective"]) is not Objective.LATENCY:
        _warn_ignored("no gate is given, so every validated model is written", ["keep_failed"])


def _searches(params: Mapping[str, Any]) -> bool:
    """A gate without --ratio or a --target-* asks for the smallest model within it."""
    source = click.get_current_context().get_parameter_source("ratio")
    given = source is not None and source is not click.core.ParameterSource.DEFAULT
    return not given and params.get("target_macs") is None and params.get("target_params") is None


def _check_latency_request(params: Mapping[str, Any], method: str | None, target: float | None) -> None:
    """--objective latency chooses the allocation: no --ratio or --target-macs/params beside it."""
    source = click.get_current_context().get_parameter_source("ratio")
    if source is not None and source is not click.core.ParameterSource.DEFAULT:
        raise UsageError("--objective latency chooses the ratios: drop --ratio")
    if params.get("target_macs") is not None or params.get("target_params") is not None:
        raise UsageError("--objective latency takes --target-latency, not --target-macs/--target-params")
    if not search_mod.searchable(method):
        search_mod.check_searchable(method, params)


def _targets_with_profile(params: Mapping[str, Any]) -> bool:
    """--target-macs / --target-params with an explicit --allocation sensitivity: the greedy allocation meets it."""
    source = click.get_current_context().get_parameter_source("allocation")
    given = source is not None and source is not click.core.ParameterSource.DEFAULT
    wants = click.get_current_context().params.get("allocation") == Allocation.SENSITIVITY.value
    return given and wants and (params.get("target_macs") is not None or params.get("target_params") is not None)


def _sensitivity_only(model: Path, run: RunSettings, settings: SearchSettings, console: Any,
                      report_path: Path | None, plot_path: Path | None, quiet: bool, pool: Mapping[str, Any]) -> None:
    """--sensitivity without a gate: the table, the report and the plot; no model is written."""
    if plot_path is not None:
        planning_plot.check_available()
    prober = _prober(model, run, console, DEFAULT_MARGIN, pool)
    method = prober.method
    proxy = prober.data_free
    outcome = search_mod.run_sensitivity(prober, settings, Rounding.of(run.round_to), proxy)
    _closed(console)
    with Outputs() as outputs:
        if report_path is not None:
            import json

            data = {"schema": REPORT_SCHEMA, "method": method, "input_path": str(model), "sensitivity": outcome.report}
            outputs.add_text(report_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        if plot_path is not None:
            outputs.add_bytes(plot_path, planning_plot.render(outcome.rows, (), settings.objective, None))
        outputs.commit()
    if not quiet:
        click.echo(search_mod.sensitivity_table(outcome.rows, proxy))
        click.echo("no model written: --sensitivity without a gate only measures (add --max-drop or --min-* to search)")


def _cache_settings(directory: Path | None, size: str | None, disabled: bool) -> calib_cache.CacheSettings:
    if disabled and (directory is not None or size is not None):
        raise UsageError(f"--no-cache conflicts with {'--cache-dir' if directory is not None else '--cache-size'}: give one")
    max_bytes = calib_cache.DEFAULT_MAX_BYTES if size is None else calib_cache.parse_cache_size(size)
    return calib_cache.CacheSettings(directory=directory, enabled=not disabled, max_bytes=max_bytes)


def _clear_cache(cache: calib_cache.CacheSettings, with_model: bool, disabled: bool, quiet: bool) -> None:
    """--clear-cache: a command of its own (no model is read)."""
    if with_model:
        raise UsageError("--clear-cache takes no MODEL: clear the cache, then run the model")
    if disabled:
        raise UsageError("--clear-cache conflicts with --no-cache: give one")
    freed = calib_cache.clear_cache(cache)
    if not quiet:
        click.echo(f"cleared {freed.entries} cache entries ({calib_cache.human_bytes(freed.bytes)}) from {freed.directory}")


def _closed(console: ConsoleProgress | None) -> None:
    if console is not None:
        console.close()
    return None


def _dry_run(model: Path, run: RunSettings) -> None:
    """Print every group and what the method would keep, where that needs no data; write nothing."""
    if not model.is_file():
        raise UsageError(f"{model}: {'not a file' if model.exists() else 'no such file'}")
    dry = api.plan_only(model, run)
    analysis, plan, method, round_to = dry.analysis, dry.plan, dry.method, Rounding.of(run.round_to)
    quantized = api.quantized_ops(analysis.model)
    if quantized:
        click.echo(f"the model is quantized in QOperator form ({', '.join(quantized)}), which is not pruned: quantize "
                   "with QuantFormat.QDQ, or prune the float model and quantize it afterwards")
    rows = group_rows(analysis.trace, None if plan is None else {g.group: g.kept for g in plan.groups}, round_to)
    for note in analysis.notes:
        click.echo(f"note: {note}")
    click.echo(group_table(rows))
    frozen = sum(1 for g in analysis.trace.groups if g.is_frozen)
    click.echo(f"{len(analysis.trace.groups)} groups, {frozen} fully frozen")
    if plan is None:
        click.echo(f"kept counts: --method {method} chooses them from data or a search; run without --dry-run")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def _preprocess(
    size: str | None, resize: str, mean: str | None, std: str | None, scale: float, layout: str, bgr: bool
) -> Any:
    from .calib import Preprocess

    hw: tuple[int, int] | None = None
    if size is not None:
        try:
            h, w = (int(v) for v in size.lower().split("x"))
            hw = (h, w)
        except ValueError:
            raise UsageError(f"--size expects HxW, got {size!r}") from None
    return Preprocess(
        size=hw, resize=resize, mean=_floats(mean, "--mean") or (0.0,), std=_floats(std, "--std") or (1.0,),  # type: ignore[arg-type]
        scale=scale, layout=layout, channel_order="BGR" if bgr else "RGB",  # type: ignore[arg-type]
    )


def _check_paths(model: Path, target: Path | None, report_path: Path | None, plot_path: Path | None = None) -> ir.ExternalData:
    """Input exists; output and report are files in existing folders and never one of the input's files.

    Returns the input's external-data references (read from the file without loading its
    tensors: the model itself is parsed once, by `api.prune`).
    """
    if not model.exists():
        raise UsageError(f"{model}: no such file")
    if not model.is_file():
        raise UsageError(f"{model}: not a file")
    named = [(flag, path) for flag, path in (("output", target), ("--report", report_path), ("--plot", plot_path))
             if path is not None]
    external = ir.external_data_of(model)
    inputs_data = external.files
    for flag, path in named:
        if path.resolve() == model.resolve():
            raise UsageError(f"{flag} {path} is the input model; choose another path")
        if path.resolve() in inputs_data:
            raise UsageError(f"{flag} {path} is the input model's external data; choose another path")
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file name")
        ir.check_writable_folder(path.resolve().parent)  # before any work, not after it
    for (first, path), (flag, other) in itertools.combinations(named, 2):
        if path.resolve() == other.resolve():
            raise UsageError(f"{flag} {other} is the {'output model' if first == 'output' else 'report'}; choose another path")
    if target is None:
        return external
    # the output's external data (when it has any) is written beside it as NAME.data
    output_data = target.resolve().with_name(target.name + ".data")
    for flag, path in named[1:]:
        if path.resolve() == output_data:
            raise UsageError(f"{flag} {path} is the output model's external data file; choose another path")
    if output_data in inputs_data or output_data == model.resolve():
        raise UsageError(
            f"output {target} would write its external data to {output_data.name}, a file of the input model; "
            "choose another output name"
        )
    return external


if __name__ == "__main__":  # pragma: no cover
    main()
