"""The PNG of ``--plot``: the sensitivity profile (damage against the ratio, one line per group) and the
search's probes (damage against the fraction kept, passed and missed). matplotlib is optional (the ``plot`` extra)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError

#: most groups drawn by name in the legend (the rest are drawn unnamed)
LEGEND_GROUPS = 12


def check_available() -> None:
    """Raise a usage error before any work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnxslim-prune[plot]'") from None


def plot(path: Path, rows: Sequence[Any], probes: Sequence[Any], objective: Any, chosen: int | None) -> None:
    """Write the figure to `path` (atomically; `render` gives its bytes to write with other outputs)."""
    from ..atomic import Outputs

    with Outputs() as outputs:
        outputs.add_bytes(path, render(rows, probes, objective, chosen))
        outputs.commit()


def render(rows: Sequence[Any], probes: Sequence[Any], objective: Any, chosen: int | None) -> bytes:
    """The figure as PNG bytes (one panel per part that has data)."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("sensitivity", "search") if (rows if p == "sensitivity" else probes)]
    if not panels:
        raise UsageError("--plot: nothing to draw (no prunable group was measured)")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "sensitivity":
            by_group: dict[int, list[Any]] = {}
            for r in rows:
                if r.failed is None and math.isfinite(r.damage):
                    by_group.setdefault(r.group, []).append(r)
            for i, (group, grows) in enumerate(sorted(by_group.items())):
                grows.sort(key=lambda r: r.ratio)
                ax.plot([0.0] + [r.ratio for r in grows], [0.0] + [r.damage for r in grows], marker="o", markersize=3,
                        linewidth=1, label=f"{group} {grows[0].node}"[:28] if i < LEGEND_GROUPS else None)
            ax.set_xlabel("fraction of the group's channels removed (the group alone)")
            ax.set_ylabel("damage (1 - top-1 agreement) + (1 - correlation)")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_title("sensitivity per group")
            ax.legend(fontsize=6, ncol=2)
        else:
            word = {"macs": "MACs", "latency": "latency"}.get(getattr(objective, "value", objective), "params")
            for passed, colour, label in ((True, "tab:green", "passed"), (False, "tab:red", "missed")):
                pts = [p for p in probes if p.measurement.passed == passed and math.isfinite(p.measurement.damage)]
                ax.scatter([p.measurement.kept(objective) for p in pts], [p.measurement.damage for p in pts], c=colour,
                           label=label, s=18)
            for p in probes:
                if p.index == chosen:
                    ax.scatter([p.measurement.kept(objective)], [p.measurement.damage], facecolors="none",
                               edgecolors="black", s=90, label="written")
            ax.set_xlabel(f"fraction of {word} kept")
            ax.set_ylabel("damage on the selection half")
            ax.set_title("search probes")
            ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
