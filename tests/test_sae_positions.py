"""Training, evaluation and the feature browser count the same positions and the same "active".

Against a brute-force pass written here: every window at once through ``run_with_cache`` with
GPT-2's BOS in front, ``sae.encode`` on the whole cache, the positions picked by hand (not the
first, not ``<|endoftext|>``) and a feature counted where its activation is not zero. The windows
hold the special token at a window's start, middle and end; one SAE (SAELens's AbsTopK) has
negative activations, where ``!= 0`` and ``> 0`` differ.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sae_lens import AbsTopKSAE, AbsTopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from tests.helpers.corpus import SETTINGS
from tests.helpers.models import SharedTinyModels
from tests.helpers.sae_browse import tiny_sae
from unraveled.engines.state import model_inputs
from unraveled.sae.activations import activation_chunks
from unraveled.sae.browser import BrowserSettings, feature_browser_data
from unraveled.sae.evaluation import evaluate_sae

HOOK = "blocks.1.hook_resid_pre"
EOS = 50256  # GPT-2's only special token: its BOS, EOS and the document separator


@pytest.fixture(scope="module")
def model(tiny_model: SharedTinyModels, tiny_gpt2_dir: Path) -> Any:
    return tiny_model(tiny_gpt2_dir, "processed")


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    """Seven windows of 10 random tokens, ``<|endoftext|>`` at the start of one, in the middle
    of two (twice in one) and at the end of one."""
    tokens = torch.randint(0, 1000, (7, 10), generator=torch.Generator().manual_seed(1))
    for window, position in [(0, 0), (2, 4), (3, 9), (5, 2), (5, 6)]:
        tokens[window, position] = EOS
    return tokens


def abs_topk_sae(d_in: int, d_sae: int, k: int) -> AbsTopKSAE:
    """SAELens's AbsTopK with random weights: the k largest |pre-activations|, signs kept."""
    generator = torch.Generator().manual_seed(3)
    sae = AbsTopKSAE(
        AbsTopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=HOOK))
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=generator) * 0.3)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator) / d_in**0.5)
        sae.b_dec.zero_()
    return sae.eval().requires_grad_(False)


def brute_force(model: Any, sae: Any, windows: torch.Tensor) -> dict[str, Any]:
    """Every window at once with BOS in front; the positions and activity chosen by hand."""
    tokens = torch.cat([torch.full((len(windows), 1), EOS), windows], dim=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        features = sae.encode(cache[HOOK])
    counted = torch.ones(tokens.shape, dtype=torch.bool)
    counted[:, 0] = False  # the prepended BOS
    counted &= tokens != EOS  # the documents' separators inside the windows
    active = features[counted] != 0  # [token, feature]
    return {
        "activations": cache[HOOK][counted],
        "n_tokens": int(counted.sum()),
        "counts": active.sum(0).numpy(),
        "features": features[counted].numpy(),
    }


@pytest.mark.parametrize("kind", ["relu", "abs_topk"])
def test_browser_density_equals_the_evaluation_table_and_a_hand_count(
    model: Any, windows: torch.Tensor, kind: str
) -> None:
    d_in = model.cfg.d_model
    sae = tiny_sae(d_in, 24, HOOK, seed=0) if kind == "relu" else abs_topk_sae(d_in, 24, k=4)
    expected = brute_force(model, sae, windows)
    assert expected["n_tokens"] == 7 * 10 - 5
    if kind == "abs_topk":  # the case where != 0 and > 0 disagree
        assert (expected["features"] < 0).any()
    evaluation = evaluate_sae(model, sae, HOOK, windows, batch_windows=3, prepend_bos=True)
    settings = BrowserSettings(top_k=5, context_before=2, context_after=1, batch_windows=2)
    browser = feature_browser_data(model, sae, HOOK, windows.numpy(), settings)

    assert evaluation.n_tokens == browser.n_tokens == expected["n_tokens"]
    np.testing.assert_array_equal(evaluation.feature_counts, expected["counts"])
    np.testing.assert_array_equal(evaluation.feature_density, expected["counts"] / 65)
    # The evaluation's density table and the browser's: the same numbers, exactly.
    table = next(t for t in evaluation.tables() if t.name == "sae_evaluation_features")
    np.testing.assert_array_equal(browser.density, table.columns["density"])
    # Every active value is in the histogram, whatever its sign.
    np.testing.assert_array_equal(browser.histogram.sum(1), expected["counts"])
    # No top context sits on the BOS or a separator, and every one is active.
    length = windows.shape[1] + 1
    kept = np.isfinite(browser.top_values)
    window, position = np.divmod(browser.top_index[kept], length)
    assert (position > 0).all()
    assert (windows.numpy()[window, position - 1] != EOS).all()
    assert (browser.top_values[kept] != 0).all()
    np.testing.assert_array_equal(kept.sum(0), np.minimum(expected["counts"], settings.top_k))


def test_training_activations_are_the_evaluated_positions(
    model: Any, windows: torch.Tensor
) -> None:
    sae = tiny_sae(model.cfg.d_model, 24, HOOK, seed=0)
    expected = brute_force(model, sae, windows)
    chunks = list(activation_chunks(model, HOOK, windows.numpy(), 3, prepend_bos=True))
    got = torch.cat(chunks)
    assert len(got) == expected["n_tokens"]
    torch.testing.assert_close(got, expected["activations"], rtol=1e-5, atol=1e-5)
    evaluation = evaluate_sae(model, sae, HOOK, windows, batch_windows=7, prepend_bos=True)
    assert evaluation.n_tokens == len(got)


def test_a_tokenizer_without_bos_is_refused_alike_by_the_atlas_and_the_sae(
    model: Any, windows: torch.Tensor
) -> None:
    """The atlas once put token id 0 in front where the SAE refused; both now refuse, alike."""
    no_bos = copy.copy(model)  # shares the weights; only the tokenizer below is its own
    no_bos.tokenizer = copy.deepcopy(model.tokenizer)
    no_bos.tokenizer.bos_token = None
    assert no_bos.tokenizer.bos_token_id is None and model.tokenizer.bos_token_id == EOS
    message = "tokenizer has no BOS token"
    with pytest.raises(ValueError, match=message):
        model_inputs(no_bos, windows.numpy(), dataclasses.replace(SETTINGS, prepend_bos=True))
    with pytest.raises(ValueError, match=message):
        list(activation_chunks(no_bos, HOOK, windows.numpy(), 3, prepend_bos=True))
    # Without BOS both paths run the bare windows.
    bare = model_inputs(no_bos, windows.numpy(), SETTINGS)
    assert torch.equal(bare.cpu(), windows)
    assert len(torch.cat(list(activation_chunks(no_bos, HOOK, windows.numpy(), 3, False)))) > 0


def test_top_contexts_rank_by_size_and_show_the_sign(model: Any, windows: torch.Tensor) -> None:
    """An AbsTopK SAE's top contexts are its k largest |a| by hand, values shown signed."""
    sae = abs_topk_sae(model.cfg.d_model, 24, k=4)
    tokens = torch.cat([torch.full((len(windows), 1), EOS), windows], dim=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        features = sae.encode(cache[HOOK]).numpy()  # [window, pos, feature]
    counted = np.ones(tokens.shape, dtype=bool)
    counted[:, 0] = False
    counted &= tokens.numpy() != EOS
    window, position = np.nonzero(counted)
    global_index = window * tokens.shape[1] + position
    values = features[window, position]  # [token, feature]
    settings = BrowserSettings(top_k=5, context_before=2, context_after=1, batch_windows=2)
    browser = feature_browser_data(model, sae, HOOK, windows.numpy(), settings)
    negative_on_top = 0
    for feature in range(values.shape[1]):
        active = np.nonzero(values[:, feature] != 0)[0]
        size = np.abs(values[active, feature])
        best = active[np.lexsort((global_index[active], -size))][: settings.top_k]
        kept = np.isfinite(browser.top_values[:, feature])
        assert kept.sum() == len(best)
        np.testing.assert_array_equal(browser.top_index[kept, feature], global_index[best])
        np.testing.assert_allclose(
            browser.top_values[kept, feature], values[best, feature], rtol=1e-5, atol=1e-6
        )
        negative_on_top += int((values[best, feature] < 0).sum())
    assert negative_on_top > 0  # the case where ranking by a and by |a| differ
