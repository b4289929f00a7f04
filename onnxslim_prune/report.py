"""The report of one pruning run: plain data, a text table, and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .passes.trace import Trace
from .validate import Agreement, ModelStats


@dataclass(frozen=True)
class GroupRow:
    index: int
    size: int
    kept: int
    prunable: int
    macs: int
    members: tuple[str, ...]
    frozen_reasons: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    method: str
    ratio: float
    before: ModelStats
    after: ModelStats
    agreement: Agreement | None
    groups: tuple[GroupRow, ...]
    seconds: float
    notes: tuple[str, ...] = ()
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    request: str = ""  # what was asked for, when not a plain ratio ("target MACs 0.5", ...)

    @property
    def frozen(self) -> tuple[GroupRow, ...]:
        return tuple(g for g in self.groups if g.frozen_reasons)

    def to_json(self) -> str:
        data = asdict(self)
        data["ratios"] = {
            "params": _ratio(self.after.params, self.before.params),
            "macs": _ratio(self.after.macs, self.before.macs),
            "file_bytes": _ratio(self.after.file_bytes, self.before.file_bytes),
        }
        return json.dumps(data, indent=2, sort_keys=True)

    def table(self, groups: bool = False) -> str:
        b, a = self.before, self.after
        lines = [
            f"method {self.method}, {self.request or f'ratio {self.ratio:g}'}, {self.seconds:.2f} s",
            f"{'':12}{'before':>16}{'after':>16}{'kept':>9}",
            _row("params", b.params, a.params),
            _row("MACs", b.macs, a.macs),
            _row("file bytes", b.file_bytes, a.file_bytes),
        ]
        if self.agreement is not None:
            ag = self.agreement
            top1 = "" if ag.top1 is None else f", top-1 agreement {ag.top1:.2%}"
            lines.append(
                f"outputs vs original ({ag.samples} {ag.inputs}): max abs {ag.max_abs:.3g}, max rel {ag.max_rel:.3g}, "
                f"cosine {ag.cosine:.6f}{top1}"
            )
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(f"accuracy: {self.accuracy_before:.2%} -> {self.accuracy_after:.2%}")
        changed = [g for g in self.groups if g.kept < g.size]
        lines.append(
            f"groups: {len(self.groups)}, pruned {len(changed)}, "
            f"fully frozen {sum(1 for g in self.groups if g.prunable == 0)}"
        )
        if groups:
            lines.append(group_table(self.groups))
        reasons = sorted({r for g in self.frozen for r in g.frozen_reasons})
        if reasons:
            lines.append(f"frozen channels ({len(reasons)} reason{'' if len(reasons) == 1 else 's'}):")
            lines.extend(f"  - {r}" for r in reasons[:40])
            if len(reasons) > 40:
                lines.append(f"  ... and {len(reasons) - 40} more (see --report)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ratio(after: int, before: int) -> float:
    return after / before if before else 1.0


def _row(name: str, before: int, after: int) -> str:
    return f"{name:12}{before:>16,}{after:>16,}{_ratio(after, before):>9.1%}"


def group_rows(trace: Trace, kept: dict[int, int] | None = None) -> tuple[GroupRow, ...]:
    kept = kept or {}
    rows = []
    for g in trace.groups:
        members = tuple(dict.fromkeys(f"{m.node}:{m.role}" for m in g.members))
        rows.append(GroupRow(g.index, g.size, kept.get(g.index, g.size), g.prunable, g.macs, members, g.reasons))
    return tuple(rows)


def group_table(rows: tuple[GroupRow, ...]) -> str:
    out = [f"{'group':>5} {'size':>6} {'kept':>6} {'prunable':>8} {'MACs':>14}  members / frozen because"]
    for r in rows:
        members = ", ".join(r.members[:6]) + (f", ... (+{len(r.members) - 6})" if len(r.members) > 6 else "")
        out.append(f"{r.index:>5} {r.size:>6} {r.kept:>6} {r.prunable:>8} {r.macs:>14,}  {members}")
        for reason in r.frozen_reasons[:3]:
            out.append(f"{'':>44}frozen: {reason}")
        if len(r.frozen_reasons) > 3:
            out.append(f"{'':>44}frozen: ... (+{len(r.frozen_reasons) - 3} more)")
    return "\n".join(out)
