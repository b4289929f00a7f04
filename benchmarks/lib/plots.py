"""Plot helpers of the benchmarks (matplotlib, Agg backend: no display needed).

    from lib.plots import pyplot, percent_axes, save
    plt = pyplot()                             # None without matplotlib (the `bench` extra): skip the plot
    fig, ax = plt.subplots(); percent_axes(ax, "MACs kept", "accuracy"); save(fig, out / "x.png")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DPI = 110

#: the Fashion-MNIST models' names in plots and tables
PRETTY = {
    "fmnist_lenet300": "LeNet-300-100",
    "fmnist_resnet56": "ResNet-56 (BN folded)",
    "fmnist_vgg_slim_bn": "VGG-slim (BN folded)",
    "fmnist_vgg_slim_bn_unfused": "VGG-slim (BN kept)",
}


def pretty(model: str) -> str:
    return PRETTY.get(model, model)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (the `bench` extra): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percent_axes(ax: Any, xlabel: str, ylabel: str, *, y_percent: bool = True) -> None:
    """Both axes (or only x) as percentages of 1, labelled, with a light grid."""
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if y_percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def save(fig: Any, path: Path, dpi: int = DPI) -> Path:
    """Write `fig` to `path` (folders made) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
