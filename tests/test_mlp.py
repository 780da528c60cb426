"""The superposition toy against closed forms, and the MLP active fraction against transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from unraveled.experiments import mlp

from tests.helpers.models import SharedTinyModels


def test_pair_angles_counts_every_pair_of_a_known_set() -> None:
    e1, e2 = np.eye(2)
    vectors = np.stack([e1, e1, -e1, e2, (e1 + e2) / math.sqrt(2)])
    # Angles: 0, 180, 90, 45 | 180, 90, 45 | 90, 135 | 45.
    angles = mlp.pair_angles(vectors)
    assert angles.n_pairs == 10 and angles.histogram_counts.sum() == 10
    assert (
        angles.histogram_counts[0] == 1 and angles.histogram_counts[-1] == 2
    )  # 0 and 180 degrees are counted
    assert angles.zoom_counts.sum() == 3
    assert angles.fraction_within_1_degree == pytest.approx(0.3)
    assert angles.pairs_more_than_45_degrees_off == 3  # 0, 180, 180; 45 and 135 are exactly 45 off
    assert angles.max_abs_cosine == pytest.approx(1.0)
    assert angles.rms_cosine == pytest.approx(
        math.sqrt((1 + 1 + 0 + 0.5 + 1 + 0 + 0.5 + 0 + 0.5 + 0.5) / 10)
    )


def test_superposition_toy_follows_the_original_and_respects_the_welch_bound() -> None:
    n, d, seed = 60, 10, 3
    toy = mlp.superposition_toy(n_vectors=n, n_dims=d, steps=150, lr=0.01, cutoff=0.01, seed=seed)
    welch = math.sqrt(
        (n - d) / (d * (n - 1))
    )  # mean over distinct pairs of cos^2 >= (N - d) / (d (N - 1))
    assert toy.angles.welch_bound_rms_cosine == pytest.approx(welch)
    unit = toy.vectors / np.linalg.norm(toy.vectors, axis=1, keepdims=True)
    cosines = [float(unit[i] @ unit[j]) for i in range(n) for j in range(i + 1, n)]
    assert toy.angles.rms_cosine == pytest.approx(math.sqrt(np.mean(np.square(cosines))), rel=1e-6)
    assert toy.angles.rms_cosine >= welch
    assert toy.angles.max_abs_cosine == pytest.approx(max(abs(c) for c in cosines), rel=1e-6)
    assert toy.angles.histogram_counts.sum() == n * (n - 1) // 2 == toy.angles.n_pairs
    assert toy.angles.pairs_more_than_45_degrees_off == sum(
        abs(c) > math.cos(math.radians(45)) for c in cosines
    )
    # Step 0 starts from unit rows: the norm penalty is zero and the loss is the hinge alone,
    # each pair counted in both orders.
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).double()
    start = start / start.norm(dim=1, keepdim=True)
    dots = start @ start.T
    hinge = sum(
        max(abs(float(dots[i, j])) - 0.01, 0.0) for i in range(n) for j in range(n) if i != j
    )
    assert toy.loss[0] == pytest.approx(hinge, rel=1e-4)
    assert toy.loss[-1] < 0.5 * toy.loss[0]
    assert (
        np.abs(np.linalg.norm(toy.vectors, axis=1) - 1).max() < 0.02
    )  # the penalty keeps rows unit length


def _toy_by_autograd(n: int, d: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's optimisation as written there: the loss through autograd, Adam on the rows."""
    vectors = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    vectors = (vectors / vectors.norm(dim=1, keepdim=True)).requires_grad_(True)
    optimiser = torch.optim.Adam([vectors], lr=0.01)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            dots = vectors @ vectors.T
            loss = (dots[off_diagonal].abs() - 0.01).relu().sum() + 1000.0 * (
                (dots.diagonal() - 1) ** 2
            ).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    return np.array(losses), vectors.detach().numpy()


def test_superposition_toy_takes_the_steps_autograd_takes_on_the_originals_loss() -> None:
    losses, vectors = _toy_by_autograd(n=50, d=8, steps=40, seed=5)
    toy = mlp.superposition_toy(n_vectors=50, n_dims=8, steps=40, lr=0.01, cutoff=0.01, seed=5)
    np.testing.assert_allclose(toy.loss, losses, rtol=1e-6)
    np.testing.assert_allclose(toy.vectors, vectors, rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_active_fraction_matches_the_neurons_firing_in_transformers(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    folder = request.getfixturevalue(checkpoint)
    model = tiny_model(folder, mlp.EXPERIMENT.weights)
    prompts = ["Alice gave Bob a goose, and he gave her a duck.", "def add(a, b): return a + b"]
    params = mlp.MlpParams(prompts=prompts, toy_vectors=8, toy_dims=4, toy_steps=1)
    result = mlp.compute(model, params, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    # What decides whether a neuron fires: GPT-2's activation output, Llama's gate projection
    # (SiLU(gate) > 0 exactly where gate > 0), read from transformers' own modules.
    gated = "llama" in checkpoint
    modules = (
        [layer.mlp.gate_proj for layer in hf.model.layers]
        if gated
        else [block.mlp.act for block in hf.transformer.h]
    )
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [
        m.register_forward_hook(lambda _m, _i, out, k=k: seen[k].append(out[0]))
        for k, m in enumerate(modules)
    ]
    with torch.no_grad():
        for prompt in prompts:
            hf(model.to_tokens(prompt))
    for handle in handles:
        handle.remove()
    expected = [float((torch.cat(outputs) > 0).float().mean()) for outputs in seen]
    np.testing.assert_allclose(result.active_fraction, expected, atol=1e-3)
    assert result.summary["gated_mlp"] is gated
    assert result.summary["active_measured_at"] == (
        "blocks.L.mlp.hook_pre" if gated else "blocks.L.mlp.hook_post"
    )


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_raw_weights_give_the_activations_folded_and_centred_weights_give(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    # The experiment reads raw weights (as the original does, and as the other seed-parity configs
    # do, so a run converts the model once); folding the norm into W_in and centring the weights
    # that write to the residual must not change mlp.hook_pre or mlp.hook_post.
    assert mlp.EXPERIMENT.weights == "raw"
    folder = request.getfixturevalue(checkpoint)
    params = mlp.MlpParams(
        prompts=["Alice gave Bob a goose, and he gave her a duck.", "def add(a, b): return a + b"],
        toy_vectors=8,
        toy_dims=4,
        toy_steps=1,
    )
    raw, processed = (
        mlp.compute(tiny_model(folder, kind), params, seed=0) for kind in ("raw", "processed")
    )
    np.testing.assert_array_equal(raw.active_fraction, processed.active_fraction)
    for layer, (from_raw, from_processed) in enumerate(
        zip(raw.post_samples, processed.post_samples, strict=True)
    ):
        np.testing.assert_allclose(
            from_raw, from_processed, rtol=1e-4, atol=1e-5, err_msg=f"layer {layer}"
        )
