"""One way to draw a figure to a PNG file: the Agg backend (no screen needed), tight layout, 120 dpi.
matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def figure(path: str | Path, ncols: int = 1, figsize: tuple[float, float] = (7, 4)):
    """Yield (pyplot, axes): one Axes, or a tuple of `ncols`; the figure is saved to `path` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield plt, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
