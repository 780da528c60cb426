"""The SAE evaluation's figures (unraveled.sae.figures) draw the numbers their titles name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Polygon, Rectangle, StepPatch

from unraveled.sae.evaluation import SAEEvaluation
from unraveled.sae.figures import (
    ce_loss_figure,
    density_figure,
    evaluation_figures,
    sparsity_figure,
)

# 10 features over 1000 tokens: two dead, two dense (> 10%), the rest spread over decades.
FEATURE_COUNTS = np.array([0, 0, 1, 3, 10, 30, 60, 99, 101, 1000])


@pytest.fixture
def evaluation() -> SAEEvaluation:
    return SAEEvaluation(
        hook_name="blocks.1.hook_resid_pre",
        n_windows=4,
        window_tokens=251,
        excluded_token_ids=(50256,),
        n_tokens=1000,
        l0=1.5,
        l0_counts=np.array([100, 400, 400, 100, 0, 0, 0, 0, 0, 0, 0]),
        mse=0.25,
        explained_variance=0.8,
        mse_per_window=np.array([0.2, 0.3, 0.25, 0.25]),
        explained_variance_per_window=np.array([0.84, 0.76, 0.8, np.nan]),
        feature_counts=FEATURE_COUNTS,
        ce_loss_clean=3.0,
        ce_loss_spliced=3.5,
        ce_loss_zero_ablation=8.0,
        ce_loss_tokens=996,
        ce_loss_clean_per_window=np.array([2.9, 3.1, 3.0, 3.0]),
        ce_loss_spliced_per_window=np.array([3.4, 3.6, 3.5, 3.5]),
        ce_loss_zero_ablation_per_window=np.array([7.9, 8.1, 8.0, 8.0]),
    )


def test_density_histogram_counts_live_features_and_names_the_dead(
    evaluation: SAEEvaluation,
) -> None:
    axes = density_figure(evaluation).axes[0]
    bars = [patch for patch in axes.patches if isinstance(patch, Rectangle)]
    edges = [bar.get_x() for bar in bars] + [bars[-1].get_x() + bars[-1].get_width()]
    # Bins from 1 / 1000 tokens (10^-3) to 1; the eight live features each in the bin of its
    # log10 density, no bar for the two dead ones.
    assert edges[0] == pytest.approx(-3) and edges[-1] == pytest.approx(0)
    live = np.log10(FEATURE_COUNTS[2:] / 1000)
    expected, _ = np.histogram(live, bins=edges)
    np.testing.assert_array_equal([bar.get_height() for bar in bars], expected)
    assert expected.sum() == 8
    title = axes.get_title()
    assert "2 of 10 features dead" in title
    assert "2 dense" in title
    assert "1,000 tokens, 4 held-out windows" in title
    assert evaluation.metrics()["dead_features"] == 2


def test_l0_and_variance_panels_draw_the_counts(evaluation: SAEEvaluation) -> None:
    l0_axes, variance_axes = sparsity_figure(evaluation).axes
    (stairs,) = [patch for patch in l0_axes.patches if isinstance(patch, StepPatch)]
    # Up to the largest L0 any token had.
    np.testing.assert_array_equal(stairs.get_data().values, [100, 400, 400, 100])
    assert l0_axes.lines[0].get_xdata()[0] == 1.5
    assert "L0: 1.5 active features per token" in l0_axes.get_title()
    assert "1,000 tokens" in l0_axes.get_title()
    # The three windows with tokens, one each; the overall fraction marked.
    bars = [
        patch.get_height()
        for patch in variance_axes.patches
        if isinstance(patch, Rectangle) and patch.get_label() != "± standard error"
    ]
    assert sum(bars) == 3
    assert variance_axes.lines[0].get_xdata()[0] == 0.8
    assert "Variance explained: 0.800" in variance_axes.get_title()


def test_ce_bars_are_the_three_losses(evaluation: SAEEvaluation) -> None:
    axes = ce_loss_figure(evaluation).axes[0]
    heights = [patch.get_height() for patch in axes.patches]
    assert heights == [3.0, 3.5, 8.0]
    labels = [tick.get_text() for tick in axes.get_xticklabels()]
    assert labels == ["clean", "SAE spliced in", "zero-ablated"]
    # Per window, a dot at each loss.
    dots = [
        collection.get_offsets()[:, 1]
        for collection in axes.collections
        if isinstance(collection, PathCollection)
    ]
    np.testing.assert_allclose(dots[1], evaluation.ce_loss_spliced_per_window)
    title = axes.get_title()
    assert f"CE loss recovered: {(8.0 - 3.5) / (8.0 - 3.0):.3f}" in title
    assert "996 next-token predictions, 4 held-out windows" in title


def test_evaluation_figures_are_numbered_from_the_first(evaluation: SAEEvaluation) -> None:
    names = [figure.name for figure in evaluation_figures(evaluation, first_number=3)]
    assert names == ["03_sae_feature_density", "04_sae_l0_and_variance_explained", "05_sae_ce_loss"]


def _band(axes) -> tuple[float, float]:  # the shaded +- standard error, as (low, high)
    (band,) = [patch for patch in axes.patches if patch.get_label() == "± standard error"]
    x = (
        band.get_xy()[:, 0]
        if isinstance(band, Polygon)
        else [band.get_x(), band.get_x() + band.get_width()]
    )
    return float(np.min(x)), float(np.max(x))


def test_variance_band_is_the_standard_error_over_windows(evaluation: SAEEvaluation) -> None:
    l0_axes, variance_axes = sparsity_figure(evaluation).axes
    # By hand: the three windows with tokens explain 0.84, 0.76, 0.8: deviations +-0.04 and 0
    # from their mean, variance (0.04^2 * 2) / 2, sd 0.04, standard error 0.04 / sqrt(3).
    standard_error = 0.04 / np.sqrt(3)
    low, high = _band(variance_axes)
    assert low == pytest.approx(0.8 - standard_error)
    assert high == pytest.approx(0.8 + standard_error)
    title = variance_axes.get_title()
    assert f"0.800 ± {standard_error:.2g}" in title
    assert "standard error over 3 windows" in title
    # MSE per window 0.2, 0.3, 0.25, 0.25: sd sqrt(0.005 / 3), over 4 windows.
    assert f"MSE 0.25 ± {np.sqrt(0.005 / 3) / 2:.2g}" in title
    # L0 over 1000 tokens, 100 / 400 / 400 / 100 at 0 / 1 / 2 / 3 features, mean 1.5:
    # sum of squared deviations 100 * 2.25 * 2 + 400 * 0.25 * 2 = 650.
    assert f"SD {np.sqrt(650 / 999):.2g}" in l0_axes.get_title()


def _error_bars(axes) -> list[tuple[float, float]]:
    spans = []
    for container in axes.containers:
        if isinstance(container, ErrorbarContainer):
            (segment,) = container.lines[2][0].get_segments()
            spans.append((float(segment[0][1]), float(segment[1][1])))
    return spans


def test_ce_error_bars_and_recovered_are_the_standard_error_over_windows(
    evaluation: SAEEvaluation,
) -> None:
    uneven = dataclasses.replace(
        evaluation,
        ce_loss_spliced_per_window=np.array([3.4, 3.8, 3.5, 3.3]),
        ce_loss_zero_ablation_per_window=np.array([7.9, 8.1, 8.0, 8.3]),
    )
    axes = ce_loss_figure(uneven).axes[0]
    # By hand, over the 4 windows: clean 2.9, 3.1, 3.0, 3.0 (mean 3.0, squares 0.01 + 0.01);
    # spliced 3.4, 3.8, 3.5, 3.3 (mean 3.5, squares 0.01 + 0.09 + 0 + 0.04); zero-ablated
    # 7.9, 8.1, 8.0, 8.3 (mean 8.075, squares 0.030625 + 0.000625 + 0.005625 + 0.050625).
    standard_errors = [
        np.sqrt(0.02 / 3) / 2,
        np.sqrt(0.14 / 3) / 2,
        np.sqrt(0.0875 / 3) / 2,
    ]
    drawn = _error_bars(axes)
    assert len(drawn) == 3
    for (low, high), height, error in zip(drawn, [3.0, 3.5, 8.0], standard_errors, strict=True):
        assert low == pytest.approx(height - error)
        assert high == pytest.approx(height + error)
    # Recovered per window, (zero - spliced) / (zero - clean): 4.5/5, 4.3/5, 4.5/5, 5.0/5.3.
    recovered = np.array([4.5 / 5, 4.3 / 5, 4.5 / 5, 5.0 / 5.3])
    deviations = recovered - recovered.sum() / 4
    recovered_error = np.sqrt((deviations**2).sum() / 3) / 2
    assert f"CE loss recovered: {(8.0 - 3.5) / (8.0 - 3.0):.3f} ± {recovered_error:.2g}" in (
        axes.get_title()
    )


def test_planted_title_counts_the_bars_above_the_line() -> None:
    from unraveled.experiments.sae_features import PlantedRecovery, planted_figure

    # Five planted directions, three above the 0.9 line (0.9 itself is not above it).
    cosines = np.array([0.95, 0.5, 0.91, 0.9, 0.99])
    axes = planted_figure(PlantedRecovery(cosines, seconds=1.0), "topk").figure.axes[0]
    heights = [patch.get_height() for patch in axes.patches if isinstance(patch, Rectangle)]
    assert heights == [0.99, 0.95, 0.91, 0.9, 0.5]
    assert "3 of 5 (60%) recovered" in axes.get_title()


def test_planted_caption_gives_the_seeds_range_only_for_the_architecture_it_was_measured_on() -> (
    None
):
    from unraveled.experiments.sae_features import PlantedRecovery, planted_figure

    cosines = np.array([0.95, 0.5])
    topk = planted_figure(PlantedRecovery(cosines, seconds=1.0), "topk")
    standard = planted_figure(PlantedRecovery(cosines, seconds=1.0), "standard")
    assert "seeds 0 to 7 for TopK" in topk.caption
    assert "moves with the seed" in standard.caption
    assert "of 64" not in standard.caption
