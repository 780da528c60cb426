"""SAE evaluation (unraveled.sae.evaluation) against hand computations and planted answers.

The hand computations here use only the model's own hooks, ``torch.nn.functional.cross_entropy``
and the SAE's ``encode``/``decode`` on whole tensors: none of the evaluation module's code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from tests.helpers.models import SharedTinyModels
from unraveled.sae.evaluation import DENSE_THRESHOLD, evaluate_sae

HOOK = "blocks.1.hook_resid_pre"
D_MODEL = 64
EOS = 50256  # GPT-2's only special token: BOS, EOS and the document separator


@pytest.fixture(scope="module")
def model(tiny_model: SharedTinyModels, tiny_gpt2_dir: Path) -> Any:
    return tiny_model(tiny_gpt2_dir, "processed")


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    """Six windows of 12 random tokens, with the special token at the start of two of them, in
    the middle of two and at the very end of one (its loss position does not exist)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, EOS, (6, 12), generator=generator)
    for window, position in [(0, 0), (1, 0), (2, 5), (3, 11), (4, 3), (4, 7)]:
        tokens[window, position] = EOS
    return tokens


def make_sae(
    w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor
) -> StandardSAE:
    """A ReLU SAE with exactly these weights, reading ``HOOK``."""
    d_in, d_sae = w_enc.shape
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=HOOK))
    )
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
    return sae


def partial_sae(kept_dims: int = 40, seed: int = 0) -> StandardSAE:
    """A noisy copy of the first ``kept_dims`` coordinates (a feature for each sign of each):
    an imperfect reconstruction, features of many densities. The weights are scaled to the tiny
    model's activations (about 0.03 per coordinate at ``HOOK``)."""
    generator = torch.Generator().manual_seed(seed)
    d_sae = 2 * kept_dims
    eye = torch.eye(D_MODEL)[:, :kept_dims]
    w_enc = torch.cat([eye, -eye], dim=1) + 0.05 * torch.randn(D_MODEL, d_sae, generator=generator)
    b_enc = -0.03 * torch.rand(d_sae, generator=generator)
    b_enc[-4:] = -1.0  # dead: the activations' norm is about 0.3
    w_dec = w_enc.T + 0.05 * torch.randn(d_sae, D_MODEL, generator=generator)
    return make_sae(w_enc, b_enc, w_dec, 0.005 * torch.randn(D_MODEL, generator=generator))


# Planted: features 0..63 read +x_i, 64..127 read -x_i, so ReLU and the decoder [I; -I] give
# x back exactly; feature 128 never fires (zero weights, negative bias) and 129 always does
# (positive bias) but writes nothing.
DEAD, ALWAYS = 2 * D_MODEL, 2 * D_MODEL + 1


def identity_sae() -> StandardSAE:
    eye = torch.eye(D_MODEL)
    w_enc = torch.cat([eye, -eye, torch.zeros(D_MODEL, 2)], dim=1)
    b_enc = torch.zeros(2 * D_MODEL + 2)
    b_enc[DEAD], b_enc[ALWAYS] = -1.0, 1.0
    w_dec = torch.cat([eye, -eye, torch.zeros(2, D_MODEL)], dim=0)
    return make_sae(w_enc, b_enc, w_dec, torch.zeros(D_MODEL))


def hand_losses(model: Any, sae: StandardSAE, tokens: torch.Tensor) -> dict[str, float]:
    """Clean, spliced and zero-ablated next-token losses with plain hooks, and the fraction."""
    kept = tokens != EOS

    def splice(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        reconstruction = sae.decode(sae.encode(activation))
        return torch.where(kept[..., None], reconstruction, activation)

    def zero(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(activation)

    losses = {}
    with torch.no_grad():
        for name, hooks in [("clean", []), ("spliced", [(HOOK, splice)]), ("zero", [(HOOK, zero)])]:
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            per_token = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
            ).view(tokens.shape[0], -1)
            losses[name] = float(per_token[kept[:, :-1]].mean())
    losses["recovered"] = (losses["zero"] - losses["spliced"]) / (losses["zero"] - losses["clean"])
    return losses


def hand_sparsity(model: Any, sae: StandardSAE, tokens: torch.Tensor) -> dict[str, Any]:
    """L0, MSE, variance explained and density over all kept tokens at once."""
    kept = tokens != EOS
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        features = sae.encode(cache[HOOK])
        reconstruction = sae.decode(features).double()
    x = cache[HOOK].double()
    squared_error = (x - reconstruction).pow(2).sum(-1)  # [window, pos]
    variance = (x[kept] - x[kept].mean(0)).pow(2).sum(-1).mean()
    mse_per_window = np.array([float(squared_error[w][kept[w]].mean()) for w in range(len(tokens))])
    active = features[kept] != 0  # [token, feature]
    return {
        "n_tokens": int(kept.sum()),
        "l0": float(active.sum(-1).double().mean()),
        "l0_per_token": active.sum(-1),
        "mse": float(squared_error[kept].mean()),
        "explained_variance": float(1 - squared_error[kept].mean() / variance),
        "mse_per_window": mse_per_window,
        "explained_variance_per_window": 1 - mse_per_window / float(variance),
        "density": active.double().mean(0).numpy(),
        "x": x[kept],
    }


def test_ce_loss_recovered_equals_plain_hooks(model: Any, windows: torch.Tensor) -> None:
    sae = partial_sae()
    evaluation = evaluate_sae(model, sae, HOOK, windows, batch_windows=4)
    expected = hand_losses(model, sae, windows)
    # The tiny model is untrained (its loss is near uniform's), but zeroing the hook still moves
    # it, and the fraction is neither an exact (1) nor a useless (0) reconstruction's.
    assert abs(expected["zero"] - expected["clean"]) > 0.02, expected
    assert min(abs(expected["recovered"]), abs(expected["recovered"] - 1)) > 0.05, expected
    assert evaluation.ce_loss_clean == pytest.approx(expected["clean"], rel=1e-5)
    assert evaluation.ce_loss_spliced == pytest.approx(expected["spliced"], rel=1e-5)
    assert evaluation.ce_loss_zero_ablation == pytest.approx(expected["zero"], rel=1e-5)
    # Losses agree to float32 rounding (about 1e-6 of 10.8); their difference of about 0.04 makes
    # that 3e-4 of the fraction.
    assert evaluation.ce_loss_recovered == pytest.approx(expected["recovered"], abs=1e-3)
    assert evaluation.metrics()["ce_loss_recovered"] == evaluation.ce_loss_recovered
    # Positions before the last whose token is not the special one.
    assert evaluation.ce_loss_tokens == int((windows[:, :-1] != EOS).sum())


def test_sparsity_and_reconstruction_equal_hand_computation(
    model: Any, windows: torch.Tensor
) -> None:
    sae = partial_sae()
    evaluation = evaluate_sae(model, sae, HOOK, windows, batch_windows=4)
    expected = hand_sparsity(model, sae, windows)
    assert evaluation.n_tokens == expected["n_tokens"] == windows.numel() - 6
    assert evaluation.l0 == pytest.approx(expected["l0"], rel=1e-9)
    assert 1 < evaluation.l0 < sae.cfg.d_sae - 1  # neither all nor none active
    counts = np.bincount(expected["l0_per_token"].numpy(), minlength=sae.cfg.d_sae + 1)
    np.testing.assert_array_equal(evaluation.l0_counts, counts)
    assert evaluation.mse == pytest.approx(expected["mse"], rel=1e-6)
    assert evaluation.explained_variance == pytest.approx(expected["explained_variance"], rel=1e-6)
    assert 0.05 < evaluation.explained_variance < 0.95
    np.testing.assert_allclose(evaluation.mse_per_window, expected["mse_per_window"], rtol=1e-6)
    np.testing.assert_allclose(
        evaluation.explained_variance_per_window,
        expected["explained_variance_per_window"],
        rtol=1e-6,
    )
    np.testing.assert_allclose(evaluation.feature_density, expected["density"], rtol=1e-12)
    assert list(evaluation.dead_features) == list(range(sae.cfg.d_sae - 4, sae.cfg.d_sae))
    np.testing.assert_array_equal(
        evaluation.dead_features, np.flatnonzero(expected["density"] == 0)
    )
    dense = np.flatnonzero(expected["density"] > DENSE_THRESHOLD)
    assert 0 < len(dense) < sae.cfg.d_sae - 4
    np.testing.assert_array_equal(evaluation.dense_features, dense)


def test_exact_reconstruction_recovers_everything(model: Any, windows: torch.Tensor) -> None:
    evaluation = evaluate_sae(model, identity_sae(), HOOK, windows, batch_windows=4)
    expected = hand_sparsity(model, identity_sae(), windows)
    x = expected["x"]
    assert evaluation.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert evaluation.mse == pytest.approx(0.0, abs=1e-9)
    assert evaluation.ce_loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert evaluation.ce_loss_spliced == pytest.approx(evaluation.ce_loss_clean, abs=1e-6)
    # One feature per nonzero coordinate, by its sign, plus the always-on one.
    assert evaluation.l0 == pytest.approx(float((x != 0).sum(-1).double().mean()) + 1)
    density = evaluation.feature_density
    np.testing.assert_allclose(density[:D_MODEL], (x > 0).double().mean(0).numpy())
    np.testing.assert_allclose(density[D_MODEL:DEAD], (x < 0).double().mean(0).numpy())
    assert density[DEAD] == 0 and density[ALWAYS] == 1
    assert list(evaluation.dead_features) == [DEAD]
    assert ALWAYS in evaluation.dense_features
    metrics = evaluation.metrics()
    assert metrics["dead_features"] == 1
    assert metrics["dead_fraction"] == pytest.approx(1 / (2 * D_MODEL + 2))


def test_zero_reconstruction_recovers_nothing(model: Any, windows: torch.Tensor) -> None:
    """Nothing excluded: the zero SAE's splice is then exactly the zero ablation."""
    zero = make_sae(
        torch.zeros(D_MODEL, 32), torch.zeros(32), torch.zeros(32, D_MODEL), torch.zeros(D_MODEL)
    )
    evaluation = evaluate_sae(
        model, zero, HOOK, windows, batch_windows=4, exclude_special_tokens=False
    )
    assert evaluation.n_tokens == windows.numel()
    assert evaluation.ce_loss_tokens == windows[:, :-1].numel()
    assert evaluation.ce_loss_spliced == pytest.approx(evaluation.ce_loss_zero_ablation)
    assert evaluation.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert evaluation.l0 == 0
    assert len(evaluation.dead_features) == 32
    assert len(evaluation.dense_features) == 0
    # Reconstructing 0: the error is the whole second moment, E||x||^2 = Var + ||E[x]||^2.
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=HOOK)
    x = cache[HOOK].flatten(0, 1).double()
    assert evaluation.mse == pytest.approx(float(x.pow(2).sum(-1).mean()), rel=1e-6)
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    assert evaluation.explained_variance == pytest.approx(
        1 - float(x.pow(2).sum(-1).mean()) / variance, rel=1e-6
    )


def test_streaming_in_batches_equals_one_batch(model: Any, windows: torch.Tensor) -> None:
    sae = partial_sae()
    whole = evaluate_sae(model, sae, HOOK, windows, batch_windows=len(windows))
    for batch_windows in (1, 4):
        streamed = evaluate_sae(model, sae, HOOK, windows, batch_windows=batch_windows)
        for name, value in whole.metrics().items():
            assert streamed.metrics()[name] == pytest.approx(value, rel=1e-6), name
        np.testing.assert_array_equal(streamed.feature_counts, whole.feature_counts)
        np.testing.assert_array_equal(streamed.l0_counts, whole.l0_counts)
        for name in (
            "mse_per_window",
            "ce_loss_clean_per_window",
            "ce_loss_spliced_per_window",
            "ce_loss_zero_ablation_per_window",
        ):
            np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-5)


def test_special_tokens_are_excluded_as_sae_lens_does(model: Any, windows: torch.Tensor) -> None:
    """By default the tokenizer's special tokens (get_special_token_ids, as run_evals); ``[]``
    or False excludes nothing."""
    sae = partial_sae()
    default = evaluate_sae(model, sae, HOOK, windows, batch_windows=6)
    assert default.excluded_token_ids == (EOS,)
    assert default.n_tokens == int((windows != EOS).sum())
    # Excluding none counts every position, and changes the numbers.
    everything = evaluate_sae(model, sae, HOOK, windows, batch_windows=6, exclude_special_tokens=[])
    assert everything.excluded_token_ids == ()
    assert everything.n_tokens == windows.numel()
    assert everything.mse != pytest.approx(default.mse)
    assert default.metrics()["excluded_token_ids"] == [EOS]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_windows": 0}, "batch_windows: expected at least 1"),
        ({"windows": torch.zeros(0, 12, dtype=torch.long)}, "at least one window"),
        ({"windows": torch.full((2, 12), EOS)}, "every position holds an excluded token"),
        ({"hook_name": "blocks.1.mlp.hook_post"}, "expected an activation [window, pos, 64]"),
    ],
)
def test_bad_input_is_refused(
    model: Any, windows: torch.Tensor, change: dict[str, Any], message: str
) -> None:
    arguments = {"hook_name": HOOK, "windows": windows, "batch_windows": 2} | change
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        evaluate_sae(model, partial_sae(), **arguments)


def test_ce_loss_recovered_is_nan_with_a_reason_where_zero_ablation_changes_nothing() -> None:
    from unraveled.sae.evaluation import recovered_loss

    # Known answers: halfway between zero-ablation (4) and clean (2) recovers half.
    assert recovered_loss(2.0, 3.0, 4.0) == (0.5, None)
    assert recovered_loss(2.0, 2.0, 4.0) == (1.0, None)
    # Zero-ablating a hook the loss doesn't depend on: no division by ~0, a stated reason.
    value, reason = recovered_loss(2.0, 2.5, 2.0 + 1e-6)
    assert math.isnan(value)
    assert reason is not None and "doesn't depend on it" in reason
