"""Matplotlib helpers: consistent figure sizes, heatmaps with colour bars, per-layer grids."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from numpy.typing import NDArray

PANEL_INCHES = (5.0, 4.2)
# Characters of a token shown as a tick label. GPT-2's longest tokens (runs of "-", "_", "=") are
# over 60 characters: drawn whole, one label is wider than a heatmap panel and constrained layout
# gives up; even at two dozen characters it squeezes the heatmaps into a corner of the figure.
# 13 keeps GPT-2's BOS token, "<|endoftext|>", whole.
MAX_LABEL_CHARS = 13


def token_label(token: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    r"""A token as a tick label: escaped, and cut to ``max_chars`` characters when longer.

    Escaped is ``repr`` without its quotes: a newline shows as ``\n``. A cut label ends in ``…``,
    counted in the ``max_chars``.
    """
    label = repr(token)[1:-1]
    return label if len(label) <= max_chars else label[: max_chars - 1] + "…"


def panels(
    n_cols: int,
    n_rows: int = 1,
    width_ratios: list[float] | None = None,
    projection_3d: set[int] | None = None,
) -> tuple[MplFigure, list[Axes]]:
    """A figure of ``n_rows`` x ``n_cols`` panels, flattened; those in ``projection_3d`` are 3D."""
    figure = MplFigure(
        figsize=(PANEL_INCHES[0] * n_cols, PANEL_INCHES[1] * n_rows), layout="constrained"
    )
    grid = figure.add_gridspec(n_rows, n_cols, width_ratios=width_ratios)
    axes = [
        figure.add_subplot(
            grid[index // n_cols, index % n_cols],
            projection="3d" if index in (projection_3d or set()) else None,
        )
        for index in range(n_rows * n_cols)
    ]
    return figure, axes


def grid_shape(n_panels: int, max_cols: int = 6) -> tuple[int, int]:
    """(rows, cols) for ``n_panels`` per-layer panels: near square, at most ``max_cols`` wide."""
    cols = min(max_cols, math.ceil(math.sqrt(n_panels)))
    return math.ceil(n_panels / cols), cols


def layer_grid(
    n_panels: int, panel_inches: float = 3.0, max_cols: int = 6
) -> tuple[MplFigure, list[Axes]]:
    """One small panel per layer (or head), unused trailing panels hidden."""
    rows, cols = grid_shape(n_panels, max_cols)
    figure = MplFigure(figsize=(panel_inches * cols, panel_inches * rows), layout="constrained")
    axes = list(np.atleast_1d(figure.subplots(rows, cols)).ravel())
    for unused in axes[n_panels:]:
        unused.set_visible(False)
    return figure, axes[:n_panels]


def heatmap(
    axes: Axes,
    values: Float[NDArray, "rows cols"],
    title: str,
    xlabel: str,
    ylabel: str,
    cmap: str = "viridis",
    colorbar_label: str = "",
    centre_zero: bool = False,
) -> None:
    """A heatmap with a colour bar; ``centre_zero`` makes a diverging scale symmetric about 0."""
    limits = {}
    if centre_zero:
        bound = float(np.nanmax(np.abs(values))) or 1.0
        limits = {"vmin": -bound, "vmax": bound}
    image = axes.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
    axes.figure.colorbar(image, ax=axes, label=colorbar_label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
