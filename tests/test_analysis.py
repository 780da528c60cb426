"""Shared attention and residual-stream computations, on inputs with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from unraveled.experiments.layernorm import layer_norm_toy

from tests.helpers.models import SharedTinyModels
from unraveled.activations import collect_activations
from unraveled.analysis import (
    attention_entropy_by_head,
    attention_sink_by_head,
    attention_to_first_token,
    cosine_to_targets,
    hidden_state_hook_names,
    hidden_states,
    last_token_attention,
    spread_across_layers,
)


def _causal_uniform(n: int) -> torch.Tensor:
    """Each query attends uniformly to itself and every earlier key."""
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def test_attention_statistics_on_hand_made_patterns() -> None:
    n = 4
    uniform = _causal_uniform(n)
    sink = torch.zeros(n, n)
    sink[:, 0] = 1.0
    patterns = torch.stack([torch.stack([uniform, sink])])  # [layer=1, head=2, q, k]
    to_first = attention_to_first_token(patterns)
    np.testing.assert_allclose(to_first[0], (1 / torch.arange(1, n + 1) + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        last_token_attention(patterns)[0], [(0.25 + 1) / 2, 0.125, 0.125, 0.125], rtol=1e-6
    )
    # The sink score averages queries 1..: query 0 can only attend to position 0.
    np.testing.assert_allclose(
        attention_sink_by_head(patterns)[0], [(1 / 2 + 1 / 3 + 1 / 4) / 3, 1.0], rtol=1e-6
    )
    self_only = torch.eye(n)[
        None, None
    ]  # every query attends to itself: no sink at all, no 1/n floor
    assert attention_sink_by_head(self_only)[0, 0] == 0.0
    expected_uniform_entropy = sum(math.log(k) for k in range(1, n + 1)) / n
    np.testing.assert_allclose(
        attention_entropy_by_head(patterns)[0], [expected_uniform_entropy, 0.0], atol=1e-6
    )


def test_cosine_to_targets_on_controlled_states() -> None:
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    states = torch.stack(
        [targets, torch.tensor([[0.0, 3.0], [-2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    )
    np.testing.assert_allclose(
        cosine_to_targets(states, targets), [[1, 1], [0, 0], [2**-0.5, 2**-0.5]], atol=1e-6
    )


def test_spread_ignores_padding_and_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    states = torch.tensor(rng.standard_normal((3, 2, 5, 4)), dtype=torch.float32)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    padded = states.clone()
    padded[:, 1, 3:] = 1e6  # garbage at pad positions must not matter
    distance, trace = spread_across_layers(padded, mask)
    for layer in range(3):
        real = states[layer, 1, :3].numpy().astype(np.float64)
        centred = real - real.mean(axis=0)
        assert distance[layer, 1].item() == pytest.approx(
            np.linalg.norm(centred, axis=1).mean(), rel=1e-5
        )
        assert trace[layer, 1].item() == pytest.approx(np.trace(np.cov(real.T)), rel=1e-5)


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_hidden_states_match_transformers_output_hidden_states(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    folder = request.getfixturevalue(checkpoint)
    model = tiny_model(folder, "raw")
    text = "He killed two birds with one stone"
    acts = collect_activations(
        model, [text], hidden_state_hook_names(model.cfg.n_layers), prepend_bos=False
    )
    ours = hidden_states(model, acts.cache)[:, 0]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = torch.stack(hf(acts.tokens, output_hidden_states=True).hidden_states)[:, 0]
    assert (
        ours.shape == theirs.shape == (model.cfg.n_layers + 1, acts.lengths[0], model.cfg.d_model)
    )
    assert (ours - theirs).abs().max().item() < 1e-4


def test_layer_norm_toy_lands_on_the_plane_at_radius_sqrt3() -> None:
    points = layer_norm_toy(np.random.default_rng(0).standard_normal((50, 3)))
    np.testing.assert_allclose(points.sum(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), math.sqrt(3), rtol=1e-12)
