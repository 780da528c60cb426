"""Figures of an SAE's evaluation: feature density, L0 and variance explained, CE-loss bars.

Each renderer draws one ``SAEEvaluation`` (``unraveled.sae.evaluation``) and never sees the model;
``evaluation_figures`` names and captions the three for an experiment's ``render``. Every title
says how many tokens and windows were evaluated, and each headline number its spread: L0's
standard deviation over tokens, the others' standard error over the held-out windows
(``unraveled.sae.spread``), drawn as a band or error bars.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure as MplFigure

from unraveled.experiment import Figure
from unraveled.render.figures import panels
from unraveled.sae.evaluation import DENSE_THRESHOLD, SAEEvaluation
from unraveled.sae.spread import l0_spread, window_spreads

# A single panel wide enough for its three-line title.
WIDE_PANEL_INCHES = (7.0, 4.8)
# Histogram bins per decade of density.
BINS_PER_DECADE = 8
# The CE-loss bars: their order, labels and colours.
CE_BARS = (
    ("ce_loss_clean", "clean", "tab:green"),
    ("ce_loss_spliced", "SAE spliced in", "tab:blue"),
    ("ce_loss_zero_ablation", "zero-ablated", "tab:red"),
)


def _evaluated(evaluation: SAEEvaluation) -> str:
    return f"{evaluation.n_tokens:,} tokens, {evaluation.n_windows:,} held-out windows"


def density_figure(evaluation: SAEEvaluation) -> MplFigure:
    """Histogram of log10 feature density over the live features; dead ones counted in the title.

    A dead feature has density 0, which has no logarithm: it is left out of the bars and counted
    in the title instead. The dashed line is the dense threshold.
    """
    density = evaluation.feature_density
    live = np.log10(density[density > 0])
    figure, (axes,) = panels(1)
    figure.set_size_inches(WIDE_PANEL_INCHES)
    # From the lowest density one token can give (1 / tokens) to 1, whole decades (one at least).
    lowest = min(-1.0, np.floor(np.log10(1 / evaluation.n_tokens)))
    edges = np.linspace(lowest, 0, int(-lowest) * BINS_PER_DECADE + 1)
    axes.hist(live, bins=edges, color="tab:blue")
    axes.axvline(
        np.log10(DENSE_THRESHOLD),
        color="black",
        linestyle="--",
        label=f"dense: active on > {DENSE_THRESHOLD:.0%} of tokens",
    )
    n_dead, n_dense = len(evaluation.dead_features), len(evaluation.dense_features)
    d_sae = len(density)
    axes.set(
        title=f"Feature density over {_evaluated(evaluation)}\n"
        f"{n_dead:,} of {d_sae:,} features dead (never active, not drawn),\n"
        f"{n_dense:,} dense (active on > {DENSE_THRESHOLD:.0%})",
        xlabel="log10(fraction of tokens the feature is active on)",
        ylabel="features",
    )
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(True, alpha=0.4)
    return figure


def sparsity_figure(evaluation: SAEEvaluation) -> MplFigure:
    """L0 per token (histogram, mean marked) beside the variance explained per window.

    The variance panel shades the overall fraction +- its standard error over windows.
    """
    figure, (l0_axes, variance_axes) = panels(2)
    counts = evaluation.l0_counts
    # Up to the largest L0 any token had: a wide SAE's counts are mostly empty beyond it.
    shown = int(np.flatnonzero(counts).max()) + 1
    l0_axes.stairs(counts[:shown], np.arange(shown + 1) - 0.5, fill=True, color="tab:blue")
    l0_axes.axvline(evaluation.l0, color="black", linestyle="--", label="mean")
    l0_sd = l0_spread(evaluation).sd
    l0_axes.set(
        title=f"L0: {evaluation.l0:.1f} active features per token (mean; SD {l0_sd:.2g})\n"
        f"over {_evaluated(evaluation)}",
        xlabel="active features at a token",
        ylabel="tokens",
    )
    l0_axes.legend(fontsize=8)

    per_window = evaluation.explained_variance_per_window
    per_window = per_window[~np.isnan(per_window)]
    variance_axes.hist(per_window, bins=min(30, max(5, len(per_window) // 3)), color="tab:purple")
    variance_axes.axvline(
        evaluation.explained_variance, color="black", linestyle="--", label="all windows"
    )
    spreads = window_spreads(evaluation)
    variance, mse = spreads["explained_variance"], spreads["mse"]
    if not np.isnan(variance.standard_error):
        variance_axes.axvspan(
            evaluation.explained_variance - variance.standard_error,
            evaluation.explained_variance + variance.standard_error,
            color="black",
            alpha=0.15,
            label="± standard error",
        )
    variance_axes.set(
        title=f"Variance explained: {evaluation.explained_variance:.3f} "
        f"± {variance.standard_error:.2g}\nMSE {evaluation.mse:.3g} ± {mse.standard_error:.2g}\n"
        f"± standard error over {variance.n} windows (bars: per window)",
        xlabel="fraction of variance explained",
        ylabel="windows",
    )
    variance_axes.legend(fontsize=8)
    for axes in (l0_axes, variance_axes):
        axes.grid(True, alpha=0.4)
    return figure


def ce_loss_figure(evaluation: SAEEvaluation) -> MplFigure:
    """The clean, spliced and zero-ablation losses as bars, each window's loss as a dot.

    Each bar carries +- its standard error over windows; the title gives CE loss recovered with
    the standard error of the per-window recovered fractions.
    """
    figure, (axes,) = panels(1)
    figure.set_size_inches(WIDE_PANEL_INCHES)
    spreads = window_spreads(evaluation)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, evaluation.n_windows)
    for position, (name, label, colour) in enumerate(CE_BARS):
        height = getattr(evaluation, name)
        axes.bar(position, height, color=colour, alpha=0.6, label=label)
        axes.errorbar(
            position,
            height,
            yerr=spreads[name].standard_error,
            color="black",
            capsize=6,
            linewidth=1.5,
            zorder=4,
        )
        axes.scatter(
            position + jitter,
            getattr(evaluation, f"{name}_per_window"),
            s=6,
            color="black",
            alpha=0.5,
            zorder=3,
        )
    axes.set_xticks(range(len(CE_BARS)), [label for _, label, _ in CE_BARS])
    recovered = spreads["ce_loss_recovered"]
    axes.set(
        title=(
            f"CE loss recovered: {evaluation.ce_loss_recovered:.3f} "
            f"± {recovered.standard_error:.2g} = (zero - spliced) / (zero - clean)\n"
            if evaluation.ce_loss_recovered_undefined_because is None
            else f"CE loss recovered undefined: {evaluation.ce_loss_recovered_undefined_because}\n"
        )
        + f"{evaluation.ce_loss_tokens:,} next-token predictions, {evaluation.n_windows:,} "
        "held-out windows\n(dots: per window; ± and error bars: standard error over windows)",
        ylabel="mean next-token loss (nats)",
    )
    axes.grid(True, axis="y", alpha=0.4)
    return figure


def evaluation_figures(
    evaluation: SAEEvaluation, first_number: int = 1, provenance: str | None = None
) -> list[Figure]:
    """The three figures, named ``NN_sae_...`` from ``first_number`` on, with captions.

    Args:
        evaluation: The evaluation drawn.
        first_number: The first figure's number.
        provenance: What the SAE is (e.g. how many tokens and steps trained it), above each
            figure and at the start of each caption; None: nothing added.
    """
    drawn = [
        (
            "sae_feature_density",
            density_figure(evaluation),
            "Feature density on held-out windows (log scale); dead features counted apart",
        ),
        (
            "sae_l0_and_variance_explained",
            sparsity_figure(evaluation),
            "Active features per token, and the fraction of variance explained per window",
        ),
        (
            "sae_ce_loss",
            ce_loss_figure(evaluation),
            "Next-token loss clean, with the SAE spliced in and zero-ablated; CE loss recovered",
        ),
    ]
    if provenance is not None:
        for _, figure, _ in drawn:
            figure.suptitle(provenance, fontsize=9, color="#5b6478")
        drawn = [(name, figure, f"{provenance}. {caption}") for name, figure, caption in drawn]
    return [
        Figure(f"{number:02d}_{name}", figure, caption)
        for number, (name, figure, caption) in enumerate(drawn, start=first_number)
    ]
