"""One way to draw a figure to a PNG file: the Agg backend (no screen needed), tight layout, 120 dpi.
matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch


def plot_title(model: str, dtype: str) -> str:
    """The line every figure carries on top: what model, in what dtype, on what machine."""
    return f"{model} - {dtype} - {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"


@contextlib.contextmanager
def figure(path: str | Path, ncols: int = 1, figsize: tuple[float, float] = (7, 4), title: str | None = None):
    """Yield (pyplot, axes): one Axes, or a tuple of `ncols`; the figure is saved to `path` and closed.
    `title` (e.g. `plot_title(...)`) goes above every axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    if title:
        fig.suptitle(title, fontsize=9)
    try:
        yield plt, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def readable_log_axes(ax, xticks=None, yticks=None) -> None:
    """Log axes without minor-tick labels (they collide: '3x10^3 4x10^3'); `xticks`/`yticks` (the measured
    values, e.g. contexts) become the major ticks, labelled as plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    for axis, ticks in ((ax.xaxis, xticks), (ax.yaxis, yticks)):
        if axis.get_scale() != "log":
            continue
        axis.set_minor_formatter(NullFormatter())
        if ticks:
            axis.set_major_locator(FixedLocator(sorted(set(ticks))))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
