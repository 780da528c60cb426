"""Attribution patching on SAE features against exact patching, on a norm-free tiny model.

With no final norm, the logit difference is linear in the last block's output, so at
``blocks.1.hook_resid_post`` (the last) the estimate of each feature equals exact patching, and
the features' estimates and the error's add up to the clean - corrupted difference. One block
earlier the metric goes through a block's attention and MLP: the estimate is only an estimate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.patching import hand_built
from tests.helpers.sae_browse import tiny_sae
from unraveled.datasets.ioi import IOIParams, ioi_batch
from unraveled.patching import logit_differences
from unraveled.sae.attribution import feature_attribution

LINEAR_HOOK = "blocks.1.hook_resid_post"
NONLINEAR_HOOK = "blocks.0.hook_resid_post"


def _setup(tiny_gpt2_dir: Path, hook: str):  # type: ignore[no-untyped-def]
    model = hand_built(tiny_gpt2_dir, attn_only=False)
    sae = tiny_sae(model.cfg.d_model, d_sae=48, hook_name=hook, seed=3, bias=0.0)
    pairs = ioi_batch(model, IOIParams(n_pairs=4), seed=0).tokens
    return model, sae, pairs


def _exact_by_hand(model, sae, hook, pairs, feature):  # type: ignore[no-untyped-def]
    """Independent route: cache both runs' activations, then run the corrupted prompts with the
    hook's activation replaced by corrupted + (clean - corrupted feature) x decoder row."""
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean, names_filter=hook)
        clean_f = sae.encode(clean[hook])[..., feature]

        def replace(activation, hook):  # type: ignore[no-untyped-def]
            delta = clean_f - sae.encode(activation)[..., feature]
            return activation + delta[..., None] * sae.W_dec[feature]

        patched = model.run_with_hooks(pairs.corrupted, fwd_hooks=[(hook, replace)])
        return float(logit_differences(patched, pairs).mean())


def test_estimate_equals_exact_patching_and_adds_up_where_the_metric_is_linear(
    tiny_gpt2_dir: Path,
) -> None:
    model, sae, pairs = _setup(tiny_gpt2_dir, LINEAR_HOOK)
    result = feature_attribution(model, sae, LINEAR_HOOK, pairs, top=6, max_rows=8)
    clean = float(logit_differences(model(pairs.clean), pairs).mean())
    corrupted = float(logit_differences(model(pairs.corrupted), pairs).mean())
    assert result.clean_metric == pytest.approx(clean, abs=1e-4)
    assert result.corrupted_metric == pytest.approx(corrupted, abs=1e-4)
    assert abs(result.total) > 0.1  # the pairs differ: a test that can fail
    np.testing.assert_allclose(result.estimate[result.top_features], result.exact, atol=1e-4)
    for rank, feature in enumerate(result.top_features[:3]):
        by_hand = _exact_by_hand(model, sae, LINEAR_HOOK, pairs, int(feature)) - corrupted
        assert result.exact[rank] == pytest.approx(by_hand, abs=1e-4)
    assert result.correlation == pytest.approx(1.0, abs=1e-6)
    # Ordered by |estimate|, largest first, and not all negligible.
    magnitudes = np.abs(result.estimate[result.top_features])
    assert (np.diff(magnitudes) <= 0).all() and magnitudes[0] > 0.01
    assert magnitudes[0] == np.abs(result.estimate).max()
    # The features' estimates and the error's add up to clean - corrupted: with clean and
    # corrupted swapped anywhere, the sum would be corrupted - clean (total is far from 0).
    assert abs(result.error_estimate) > 0.01  # a random SAE leaves a large error
    assert result.estimate.sum() + result.error_estimate == pytest.approx(result.total, abs=1e-3)


def test_estimate_is_only_an_estimate_further_from_the_logits(tiny_gpt2_dir: Path) -> None:
    model, sae, pairs = _setup(tiny_gpt2_dir, NONLINEAR_HOOK)
    result = feature_attribution(model, sae, NONLINEAR_HOOK, pairs, top=4)
    gap = np.abs(result.estimate[result.top_features] - result.exact).max()
    assert gap > 0.01 * np.abs(result.exact).max()
    for rank, feature in enumerate(result.top_features[:2]):
        by_hand = _exact_by_hand(model, sae, NONLINEAR_HOOK, pairs, int(feature))
        assert result.exact[rank] == pytest.approx(by_hand - result.corrupted_metric, abs=1e-4)


def test_figure_draws_estimate_and_exact_where_their_labels_say() -> None:
    from unraveled.sae.attribution import FeatureAttribution
    from unraveled.sae.figures_attribution import attribution_figure, attribution_table

    result = FeatureAttribution(
        hook_name=LINEAR_HOOK,
        clean_metric=2.0,
        corrupted_metric=-1.0,
        estimate=np.array([0.1, -2.0, 0.5, 1.0]),
        error_estimate_per_pair=np.array([0.2, 0.6, 0.1, 0.7]),
        top_features=np.array([1, 3, 2]),
        exact=np.array([-1.5, 0.9, 0.7]),
        correlation=0.9,
    )
    figure = attribution_figure(result).figure
    bars, scatter = figure.axes
    drawn = {
        container.get_label(): [patch.get_height() for patch in container.patches]
        for container in bars.containers
    }
    assert drawn == {"attribution estimate": [-2.0, 1.0, 0.5], "exact patching": [-1.5, 0.9, 0.7]}
    assert [t.get_text() for t in bars.get_xticklabels()] == ["1", "3", "2"]
    np.testing.assert_array_equal(
        scatter.collections[0].get_offsets(), [[-2.0, -1.5], [1.0, 0.9], [0.5, 0.7]]
    )
    assert "r = 0.900 over 3 features" in scatter.get_title()
    suptitle = figure.get_suptitle()
    assert "3.000" in suptitle and "over 4 pairs" in suptitle
    # The error term's estimate: mean 0.4 of the four pairs, deviations -0.2, 0.2, -0.3, 0.3:
    # sd sqrt(0.26 / 3), standard error that / 2.
    assert f"0.400 ± {np.sqrt(0.26 / 3) / 2:.2g}" in suptitle
    table = attribution_table(result, browser_page="feature_browser")
    assert list(table.columns["browser"]) == [
        f"views/feature_browser.html#feature-{i}" for i in (1, 3, 2)
    ]
    np.testing.assert_array_equal(table.columns["exact"], result.exact)
