"""Figures and tables of attribution patching on SAE features (``unraveled.sae.attribution``).

Draw only: they read a ``FeatureAttribution`` and never the model.
"""

from __future__ import annotations

import numpy as np

from unraveled.experiment import Figure, Table
from unraveled.render.figures import panels
from unraveled.sae.attribution import FeatureAttribution


def attribution_figure(
    result: FeatureAttribution, name: str = "feature_attribution", metric: str = "logit difference"
) -> Figure:
    """The top features' attribution estimate beside exact patching: bars, and a scatter.

    Left: per top feature (largest ``|estimate|`` first), the estimate and the exact effect of
    restoring it from the clean into the corrupted run, as paired bars. Right: estimate against
    exact, with the diagonal and Pearson's correlation over the features drawn. The title gives
    the total clean - corrupted difference and the SAE error term's estimate, that one +- its
    standard error over the pairs, and how many pairs.
    """
    from unraveled.spread import spread

    figure, (bars, scatter) = panels(2, width_ratios=[1.6, 1.0])
    features = result.top_features
    estimate = result.estimate[features]
    positions = np.arange(len(features))
    bars.bar(positions - 0.2, estimate, width=0.4, label="attribution estimate", color="#2457c5")
    bars.bar(positions + 0.2, result.exact, width=0.4, label="exact patching", color="#e76f51")
    bars.axhline(0, color="#5b6478", linewidth=0.8)
    bars.set_xticks(positions, [str(f) for f in features], rotation=90 if len(features) > 12 else 0)
    bars.set(
        xlabel="feature (largest |estimate| first)",
        ylabel=f"change in mean {metric}",
        title="Restoring one feature from clean into corrupted",
    )
    bars.legend()
    scatter.scatter(estimate, result.exact, color="#2457c5", s=18)
    values = np.concatenate([estimate, result.exact])
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    scatter.plot([low, high], [low, high], color="#5b6478", linewidth=0.8, linestyle="--")
    scatter.set(
        xlabel="attribution estimate",
        ylabel="exact patching",
        title=f"Estimate vs exact: Pearson r = {result.correlation:.3f} over {len(features)} "
        "features",
    )
    error = spread(result.error_estimate_per_pair)
    figure.suptitle(
        f"SAE features at {result.hook_name}, mean over {result.n_pairs} pairs: clean - "
        f"corrupted {metric} {result.total:.3f}; SAE error term's estimate "
        f"{result.error_estimate:.3f} ± {error.standard_error:.2g} (standard error over pairs)"
    )
    return Figure(
        name,
        figure,
        f"Attribution patching on SAE features at {result.hook_name}, top {len(features)} "
        "features patched exactly, with the correlation",
    )


def attribution_table(
    result: FeatureAttribution, browser_page: str | None = None, name: str = "feature_attribution"
) -> Table:
    """One row per top feature: its estimate, exact effect and (given the page) browser link.

    Args:
        result: The attribution.
        browser_page: File stem of the feature browser page in ``views/`` (None: no links).
        name: The table's file stem.
    """
    from unraveled.render.feature_browser import feature_href

    columns: dict[str, np.ndarray] = {
        "feature": result.top_features,
        "estimate": result.estimate[result.top_features],
        "exact": result.exact,
    }
    if browser_page is not None:
        columns["browser"] = np.array(
            [f"views/{feature_href(browser_page, int(f))}" for f in result.top_features]
        )
    return Table(
        name,
        columns,
        f"top features of the attribution at {result.hook_name}: estimate and exact change of "
        "the mean metric when restored from clean into corrupted",
    )
