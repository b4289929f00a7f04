"""The report of one pruning run: plain data, a text table, and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .._version import __version__
from ..channels import TransformerPart, transformer_part
from .latency import NOT_SLOWER, Latency
from ..roundto import Rounding
from ..analysis.trace import Trace
from .validate import ModelStats
from .verdict import FUNCTION_UNKNOWN, Verdict

#: the report JSON's layout version (its `schema` key): raised when a key is renamed or removed, or its meaning changes
REPORT_SCHEMA = 2  # 2: a verdict on random inputs has null figures and `passed` (`random_inputs` holds them)


@dataclass(frozen=True)
class GroupRow:
    index: int
    size: int
    kept: int
    prunable: int
    macs: int
    members: tuple[str, ...]
    frozen_reasons: tuple[str, ...]
    part: TransformerPart = TransformerPart.FFN  # what the group is in a transformer (heads / hidden / ffn; ffn for every other group)
    multiple: int = 1  # the kept count of classes is a multiple of this (`roundto.Rounding.classes`), or the whole group


@dataclass(frozen=True)
class Report:
    method: str
    ratio: float
    before: ModelStats
    after: ModelStats
    verdict: Verdict | None
    groups: tuple[GroupRow, ...]
    seconds: float
    notes: tuple[str, ...] = ()
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    request: str = ""  # what was asked for, when not a plain ratio ("target MACs 0.5", ...)
    settings: dict[str, Any] = field(default_factory=dict)
    input_path: str | None = None
    output_path: str | None = None  # None when no model was written (a missed gate)
    latency: Latency | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    validated: bool = True  # a report exists only for a model that passed validation
    version: str = __version__
    schema: int = REPORT_SCHEMA

    @property
    def speed(self) -> str:
        """``faster``, ``not slower`` (within the tolerance or the noise), ``slower``, or ``unknown`` (not measured)."""
        if self.latency is None:
            return "unknown"
        gates = () if self.verdict is None else self.verdict.gates
        if any(g.gate == NOT_SLOWER and not g.passed for g in gates) or (not gates and self.latency.slower):
            return "slower"
        return "faster" if self.latency.ratio < 1.0 else "not slower"

    @property
    def rounding(self) -> dict[str, Any]:
        """What the kept counts were rounded to and why: the setting, and how many pruned groups kept each multiple."""
        auto = bool(self.settings.get("round_to_auto"))
        block = int(self.settings.get("round_to", 1))
        pruned = [g for g in self.groups if g.kept < g.size]
        counts: dict[str, int] = {}
        for g in sorted(pruned, key=lambda g: -g.multiple):
            counts[str(g.multiple)] = counts.get(str(g.multiple), 0) + 1
        why = (f"per group, the largest power of two dividing its original channel count, at most the CPU's kernel block "
               f"{block}: never breaking a multiple the original had") if auto else \
            ("no rounding" if block == 1 else "every group's kept count, or the whole group")
        return {"round_to": f"auto ({block})" if auto else str(block), "why": why, "pruned_groups_by_multiple": counts}

    @property
    def frozen(self) -> tuple[GroupRow, ...]:
        return tuple(g for g in self.groups if g.frozen_reasons)

    def to_json(self) -> str:
        data = asdict(self)
        data["verdict"] = None if self.verdict is None else self.verdict.to_dict()
        data["latency"] = None if self.latency is None else self.latency.to_dict()
        data["speed"] = self.speed
        data["rounding"] = self.rounding
        data["ratios"] = {
            "params": _ratio(self.after.params, self.before.params),
            "macs": _ratio(self.after.macs, self.before.macs),
            "file_bytes": _ratio(self.after.file_bytes, self.before.file_bytes),
        }
        return json.dumps(data, indent=2, sort_keys=True, default=str)

    def table(self, groups: bool = False, verbose: bool = False) -> str:
        b, a = self.before, self.after
        lines = [
            f"method {self.method}, {self.request or f'ratio {self.ratio:g}'}, {self.seconds:.2f} s",
            f"{'':12}{'before':>16}{'after':>16}{'kept':>9}",
            _row("params", b.params, a.params),
            _row("MACs", b.macs, a.macs),
            _row("file bytes", b.file_bytes, a.file_bytes),
        ]
        if self.latency is not None:
            lat = self.latency
            ci = "" if lat.ratio_interval is None else f", 95% {lat.ratio_interval[0]:.1%}-{lat.ratio_interval[1]:.1%}"
            threads = "single-thread CPU time, " if lat.threads == 1 and lat.clock == "thread-cpu" else ""
            lines.append(f"{'latency ms':12}{lat.before_ms:>16.3f}{lat.after_ms:>16.3f}{lat.ratio:>9.1%}"
                         f"  ({lat.speedup:.2f}x: {self.speed}; {threads}median of {lat.rounds} interleaved runs{ci})")
        else:
            lines.append(f"{'latency':12}  not measured (--no-latency): whether the model is slower is unknown, "
                         "the not-slower gate was not checked")
        lines.append(_rounding_line(self.rounding))
        if self.verdict is not None:
            lines.extend(verdict_lines(self.verdict))
        changed = [g for g in self.groups if g.kept < g.size]
        lines.append(
            f"groups: {len(self.groups)}, pruned {len(changed)}, "
            f"fully frozen {sum(1 for g in self.groups if g.prunable == 0)}"
        )
        if groups:
            lines.append(group_table(self.groups))
        reasons = sorted({r for g in self.frozen for r in g.frozen_reasons})
        shown = 40 if verbose or groups else 8
        if reasons:
            lines.append(f"frozen channels ({len(reasons)} reason{'' if len(reasons) == 1 else 's'}):")
            lines.extend(f"  - {r}" for r in reasons[:shown])
            if len(reasons) > shown:
                lines.append(f"  ... and {len(reasons) - shown} more (--groups or --report)")
        if verbose:
            lines.extend(f"note: {n}" for n in self.notes)
        elif self.notes:
            lines.append(f"notes: {len(self.notes)} (-v shows them; --report keeps them)")
        return "\n".join(lines)


def _rounding_line(r: dict[str, Any]) -> str:
    counts = r["pruned_groups_by_multiple"]
    kept = ", ".join(f"{n} group{'' if n == 1 else 's'} x{m}" for m, n in counts.items()) or "no group pruned"
    return f"rounding: {r['round_to']}: {r['why']}; pruned groups keep multiples of: {kept}"


def verdict_lines(v: Verdict) -> list[str]:
    """The verdict as the table prints it: where it was measured, its figures, gates, degradation."""
    figures = [f"cosine {v.cosine:.4f}"]
    if v.correlation is not None:
        ci = "" if v.correlation_interval is None else f" ({v.correlation_interval[0]:.2f} to {v.correlation_interval[1]:.2f})"
        figures.append(f"correlation {v.correlation:.4f}{ci}")
    if v.top1_agreement is not None:
        ci = "" if v.top1_interval is None else f" ({v.top1_interval[0]:.0%}-{v.top1_interval[1]:.0%})"
        figures.append(f"top-1 agreement {v.top1_agreement:.2%}{ci}")
    figures.append(f"max abs {v.max_abs:.3g}, max rel {v.max_rel:.3g}")
    if not v.function_known:  # the figures are structure evidence, never the headline
        lines = [f"verdict: {FUNCTION_UNKNOWN}, which prove structure, not function ({v.samples} seeded samples; "
                 "give --calib or --eval to know whether the pruned model still works)",
                 "  structure check, not a measure of function: " + ", ".join(figures)]
        return lines + _gate_lines(v)
    lines = [f"verdict on {v.samples} {v.source.description} (95% intervals in brackets):", "  " + ", ".join(figures)]
    if v.accuracy_before is not None and v.accuracy_after is not None:
        ci = "" if v.accuracy_drop_interval is None else \
            f", drop {v.accuracy_drop_interval[0]:+.1f} to {v.accuracy_drop_interval[1]:+.1f} points at 95%"
        lines.append(f"  accuracy {v.accuracy_before:.2%} -> {v.accuracy_after:.2%} "
                     f"({-(v.accuracy_drop_points or 0.0):+.2f} points{ci})")
    if v.imprecise:
        lines.append(f"  imprecise on {v.samples} samples: about {v.advised_samples} held-out samples give +-5 points")
    fitted = [o for o in v.fitted if o.top1 is not None] or list(v.fitted)
    if fitted:
        worst = min(fitted, key=lambda o: o.top1 if o.top1 is not None else o.cosine)
        figure = f"top-1 agreement {worst.top1:.2%}" if worst.top1 is not None else f"cosine {worst.cosine:.4f}"
        lines.append(f"  (on fitted calibration samples, not the verdict: {figure})")
    return lines + _gate_lines(v)


def _gate_lines(v: Verdict) -> list[str]:
    """Each gate (the speed gates too: they hold whatever the inputs), then the degradation."""
    lines = [f"  gate {'passed' if gate.passed else 'MISSED'}: {gate.message}" for gate in v.gates]
    if v.degraded:
        lines.append("  !!! DEGRADED: " + "; ".join(v.degraded_reasons))
    return lines


def _ratio(after: int, before: int) -> float:
    return after / before if before else 1.0


def _row(name: str, before: int, after: int) -> str:
    return f"{name:12}{before:>16,}{after:>16,}{_ratio(after, before):>9.1%}"


def group_rows(trace: Trace, kept: dict[int, int] | None = None, rounding: int | Rounding = 1) -> tuple[GroupRow, ...]:
    kept = kept or {}
    rounding = Rounding.of(rounding)
    rows = []
    for g in trace.groups:
        members = tuple(dict.fromkeys(f"{m.node}:{m.role}" for m in g.members))
        rows.append(GroupRow(g.index, g.size, kept.get(g.index, g.size), g.prunable, g.macs, members, g.reasons,
                             transformer_part(trace.node_kind, g), rounding.classes(g, trace)))
    return tuple(rows)


def group_table(rows: tuple[GroupRow, ...]) -> str:
    out = [f"{'group':>5} {'size':>6} {'kept':>6} {'mult':>5} {'prunable':>8} {'MACs':>14}  members / frozen because"]
    for r in rows:
        members = ", ".join(r.members[:6]) + (f", ... (+{len(r.members) - 6})" if len(r.members) > 6 else "")
        out.append(f"{r.index:>5} {r.size:>6} {r.kept:>6} {r.multiple:>5} {r.prunable:>8} {r.macs:>14,}  {members}")
        for reason in r.frozen_reasons[:3]:
            out.append(f"{'':>50}frozen: {reason}")
        if len(r.frozen_reasons) > 3:
            out.append(f"{'':>50}frozen: ... (+{len(r.frozen_reasons) - 3} more)")
    return "\n".join(out)
