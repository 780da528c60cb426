"""Embedding computations checked against inputs with a known answer, and the parameter count
against transformers'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformer_lens import HookedTransformerConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from unraveled.experiments import embeddings
from unraveled.experiments.embeddings import default_dimension_pairs

from unraveled.geometry import (
    cosine_similarity_matrix,
    cumulative_explained_variance,
    intrinsic_dimension,
    local_neighbourhoods,
)
from unraveled.models import checkpoint_parameters, load_model


def test_intrinsic_dimension_of_a_known_spectrum() -> None:
    rng = np.random.default_rng(0)
    # Five directions carry 97% of the variance, the other 45 share the rest.
    scales = np.array([1.0] * 5 + [0.08] * 45)
    points = rng.standard_normal((4000, 50)) * scales
    cumulative = cumulative_explained_variance(points)
    assert cumulative[-1] == 1.0 and np.all(np.diff(cumulative) >= 0)
    assert intrinsic_dimension(cumulative, 0.9) == 5
    assert intrinsic_dimension(cumulative, 0.999) > 5


def test_cumulative_variance_of_exactly_planar_points() -> None:
    rng = np.random.default_rng(1)
    plane = rng.standard_normal((300, 2)) @ rng.standard_normal((2, 10))
    cumulative = cumulative_explained_variance(plane)
    assert cumulative[1] > 1 - 1e-9 and intrinsic_dimension(cumulative, 0.9) <= 2


@pytest.mark.parametrize("shape", [(400, 30), (20, 30)])
def test_cumulative_variance_matches_the_squared_singular_values(shape: tuple[int, int]) -> None:
    points = np.random.default_rng(2).standard_normal(shape) * np.linspace(3.0, 0.1, shape[1])
    singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    expected = np.cumsum(singular**2) / np.sum(singular**2)
    cumulative = cumulative_explained_variance(points.astype(np.float32))
    assert cumulative.shape == (min(shape),)  # fewer points than dimensions: one value per point
    np.testing.assert_allclose(cumulative, expected, rtol=0, atol=1e-6)


def test_local_neighbourhoods_are_nearest_points() -> None:
    line = np.arange(100, dtype=float)[:, None]
    (indices,) = local_neighbourhoods(line, 1, 5, np.random.default_rng(0))
    centre = indices[0]
    nearest_possible = np.sort(np.abs(np.arange(100) - centre))[:5]
    np.testing.assert_array_equal(np.sort(np.abs(indices - centre)), nearest_possible)


def test_cosine_similarity_matrix_known_values() -> None:
    points = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(
        cosine_similarity_matrix(points), [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-12
    )


def _config(
    name: str, architecture: str, d_vocab: int = 50257, n_ctx: int = 1024
) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=12,
        n_heads=12,
        d_model=768,
        d_head=64,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu_new",
        model_name=name,
        original_architecture=architecture,
    )


def test_dimension_pairs_are_chosen_by_model_not_by_width() -> None:
    means = np.zeros(768)
    means[[7, 3]] = [5.0, -4.0]
    spread = np.zeros(768)
    spread[[10, 11, 12, 13]] = [4, 3, 2, 1]
    pairs, rule = default_dimension_pairs(_config("gpt2", "GPT2LMHeadModel"), means, spread)
    assert (
        pairs == [[87, 138], [68, 85], [361, 724]] and "original" in rule
    )  # the original analysis's, for GPT-2 small
    for other in (
        _config("gpt-neo-125M", "GPTNeoForCausalLM", n_ctx=2048),
        _config("pythia-160m", "GPTNeoXForCausalLM", d_vocab=50304, n_ctx=2048),
        _config("my-gpt2-from-scratch", "GPT2LMHeadModel"),
    ):
        pairs, rule = default_dimension_pairs(other, means, spread)
        assert pairs == [[7, 3], [10, 11], [12, 13]] and rule.startswith("data-driven")
    no_positions, _ = default_dimension_pairs(
        _config("pythia-160m", "GPTNeoXForCausalLM"), means, None
    )
    assert no_positions[0] == [7, 3]


@pytest.fixture(scope="module")
def tiny_tied_llama_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """A Llama-shaped checkpoint with tied embeddings, as SmolLM2 has."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        vocab_size=len(gpt2_tokenizer),
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-tied-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir", "tiny_tied_llama_dir"])
def test_parameter_count_is_the_checkpoints_own(
    checkpoint: str, request: pytest.FixtureRequest, weight_cache: Path
) -> None:
    folder = request.getfixturevalue(checkpoint)
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    first = load_model(str(folder), "raw")
    again = load_model(str(folder), "raw")
    assert again.from_weight_cache
    assert checkpoint_parameters(first.model) == checkpoint_parameters(again.model) == expected
    params = embeddings.EmbeddingsParams(
        chunk_tokens=20,
        chunk_dims=8,
        listed_tokens=3,
        local_subsets=1,
        local_neighbours=50,
        projected_tokens=20,
    )
    assert embeddings.compute(again.model, params, seed=0).metrics()["parameter_count"] == expected
