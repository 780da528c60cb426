"""The feature browser's data against a brute-force pass over every activation at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.sae_browse import tiny_sae
from unraveled.running_stats import NO_INDEX, top_k_of_batch
from unraveled.sae.browser import BrowserSettings, feature_browser_data, logit_effects

HOOK = "blocks.1.hook_resid_pre"
SETTINGS = BrowserSettings(top_k=5, context_before=3, context_after=2, batch_windows=3)


def _windows(n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=(n, length))


def _all_activations(model, sae, windows: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Every window at once (BOS in front), through run_with_cache and sae.encode."""
    bos = model.tokenizer.bos_token_id
    tokens = torch.cat(
        [torch.full((len(windows), 1), bos), torch.as_tensor(windows, dtype=torch.long)], dim=1
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        return sae.encode(cache[HOOK]).numpy()


def test_statistics_and_top_contexts_equal_a_brute_force_pass(
    tiny_model, tiny_gpt2_dir: Path
) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    sae = tiny_sae(model.cfg.d_model, d_sae=24, hook_name=HOOK, seed=0)
    windows = _windows(7, 12)
    data = feature_browser_data(model, sae, HOOK, windows, SETTINGS)
    with_bos = _all_activations(model, sae, windows)
    acts = with_bos[:, 1:]  # the BOS position is no top token and in no statistic
    flat = acts.reshape(-1, acts.shape[-1])
    assert data.n_tokens == flat.shape[0] == 7 * 12
    np.testing.assert_allclose(data.density, (flat > 0).mean(0))
    np.testing.assert_allclose(data.max_activation, np.maximum(flat.max(0), 0), rtol=1e-5)
    np.testing.assert_allclose(data.mean_activation, flat.mean(0), rtol=1e-4, atol=1e-6)
    # Some features are dead, some rarely active (fewer than k tokens), some dense: all cases.
    active_counts = (flat > 0).sum(0)
    assert (active_counts < SETTINGS.top_k).any() and (active_counts > SETTINGS.top_k).any()
    length = windows.shape[1] + 1
    for feature in range(flat.shape[1]):
        # The k largest active values, ties to the lower global index (BOS positions excluded).
        global_index = (np.arange(len(windows))[:, None] * length + np.arange(1, length)).ravel()
        active = np.nonzero(flat[:, feature] > 0)[0]
        best = active[np.lexsort((global_index[active], -flat[active, feature]))][: SETTINGS.top_k]
        kept = np.isfinite(data.top_values[:, feature])
        assert kept.sum() == len(best)
        np.testing.assert_allclose(data.top_values[kept, feature], flat[best, feature], rtol=1e-5)
        np.testing.assert_array_equal(data.top_index[kept, feature], global_index[best])
        assert (data.top_index[~kept, feature] == NO_INDEX).all()
        for row, token in enumerate(best):
            window, position = divmod(int(global_index[token]), length)
            full = np.concatenate([[model.tokenizer.bos_token_id], windows[window]])
            values = with_bos[window, :, feature]  # contexts show BOS's value too
            for slot, offset in enumerate(range(-3, 3)):
                at = position + offset
                inside = 0 <= at < length
                assert data.context_ids[row, feature, slot] == (full[at] if inside else -1)
                expected = max(values[at], 0.0) if inside else 0.0
                assert data.context_values[row, feature, slot] == pytest.approx(expected, abs=1e-5)
        expected_counts = np.histogram(
            flat[active, feature],
            bins=np.concatenate([[0], data.bin_edges, [np.inf]]),
        )[0]
        np.testing.assert_array_equal(data.histogram[feature], expected_counts)
    assert data.vocab[int(data.context_ids[0, int(np.argmax(active_counts)), 3])]


def test_same_data_for_any_batching_and_a_split_into_streamed_batches(
    tiny_model, tiny_gpt2_dir: Path
) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    sae = tiny_sae(model.cfg.d_model, d_sae=16, hook_name=HOOK, seed=1)
    windows = _windows(6, 10, seed=1)
    whole = feature_browser_data(
        model, sae, HOOK, windows, BrowserSettings(top_k=4, batch_windows=6)
    )
    streamed = feature_browser_data(
        model, sae, HOOK, iter([windows[:1], windows[1:4], windows[4:]]), BrowserSettings(top_k=4)
    )
    # The forward pass's float rounding depends on the batch size: values agree to rounding,
    # which tokens are kept exactly.
    for name in ("top_index", "context_ids", "histogram"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(streamed, name), err_msg=name)
    for name in ("top_values", "context_values", "density", "max_activation"):
        np.testing.assert_allclose(getattr(whole, name), getattr(streamed, name), rtol=1e-5)


# Raw weights: the final LayerNorm keeps its weight and W_U is not centred, so both of what
# logit_effects applies of the norm matter.
@pytest.mark.parametrize("weights", ["processed", "raw"])
def test_promoted_and_suppressed_tokens_are_the_direction_through_final_norm_and_unembed(
    tiny_model, tiny_gpt2_dir: Path, weights: str
) -> None:
    model = tiny_model(tiny_gpt2_dir, weights)
    sae = tiny_sae(model.cfg.d_model, d_sae=8, hook_name=HOOK, seed=2)
    # Blocks of 3 of the 8 features (the last one short): every block's rows land in place.
    settings = dataclasses.replace(SETTINGS, logit_features=3)
    data = feature_browser_data(model, sae, HOOK, _windows(2, 6), settings)
    # Independent route: the model's own final norm and unembedding on each decoder direction
    # as a residual stream, minus those of a zero residual stream (the biases): the logit effect
    # up to the norm's positive scale.
    with torch.no_grad():
        directions = sae.W_dec[:, None, :]
        through = model.unembed(model.ln_final(directions))[:, 0]
        zero = model.unembed(model.ln_final(torch.zeros_like(directions)))[:, 0]
        expected = (through - zero).numpy()
    effects = logit_effects(model, sae).numpy()
    scale = np.linalg.norm(effects, axis=1) / np.linalg.norm(expected, axis=1)
    np.testing.assert_allclose(effects, expected * scale[:, None], rtol=1e-3, atol=1e-4)
    n = SETTINGS.logit_tokens
    np.testing.assert_array_equal(data.promoted_ids, np.argsort(-expected, axis=1)[:, :n])
    np.testing.assert_array_equal(data.suppressed_ids, np.argsort(expected, axis=1)[:, :n])
    assert (data.suppressed_logits < 0).all() and (data.promoted_logits > 0).all()


def test_inactive_values_are_never_top_tokens_in_any_split() -> None:
    # Feature 0 is active on 2 tokens only: the other rows stay unfilled however the windows
    # are split, so merged parts equal the direct computation.
    values = np.full((4, 5, 2), -np.inf, dtype=np.float32)
    values[1, 2, 0], values[3, 0, 0] = 2.0, 1.0
    values[:, :, 1] = np.arange(20, dtype=np.float32).reshape(4, 5)
    ids = np.arange(20).reshape(4, 5)
    direct = top_k_of_batch(values, ids, np.arange(4) * 5, 3, 1, 1)
    merged = top_k_of_batch(values[:2], ids[:2], np.arange(2) * 5, 3, 1, 1).merge(
        top_k_of_batch(values[2:], ids[2:], np.arange(2, 4) * 5, 3, 1, 1)
    )
    for top in (direct, merged):
        np.testing.assert_array_equal(top.values[:, 0], [2.0, 1.0, -np.inf])
        np.testing.assert_array_equal(top.index[:, 0], [7, 15, NO_INDEX])
        np.testing.assert_array_equal(top.context_ids[2, 0], [-1, -1, -1])
        np.testing.assert_array_equal(top.index[:, 1], [19, 18, 17])
