"""The patching core run in the smallest passes: one row per gradient pass, one circuit per
edge-faithfulness pass; and in uneven gradient passes, whose last holds fewer rows than the others.
The checks are test_patching's own (against independent routes through the model); they must hold
however the work is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from tests.helpers.patching import (
    N_PAIRS,
    check_attribution_is_exact_where_the_metric_is_linear,
    check_edge_circuits_agree_with_node_circuits,
    check_edge_scores_add_up_to_each_components_own_attribution,
    hand_built,
)
from unraveled.datasets.ioi import IOIParams, ioi_batch
from unraveled.patching import (
    PromptPairs,
    circuit_hooks,
    edge_attribution,
    edge_circuit_metric,
    edge_circuit_passes,
    gradient_passes,
    run_cache,
)


def test_edge_scores_from_one_row_per_gradient_pass(tiny_gpt2_or_llama: HookedTransformer) -> None:
    check_edge_scores_add_up_to_each_components_own_attribution(
        tiny_gpt2_or_llama, tokens_per_pass=1
    )


def test_edge_circuits_one_circuit_per_pass(tiny_gpt2_or_llama: HookedTransformer) -> None:
    check_edge_circuits_agree_with_node_circuits(tiny_gpt2_or_llama, buffer_bytes=1)


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_from_one_row_per_gradient_pass(tiny_gpt2_dir: Path, attn_only: bool) -> None:
    check_attribution_is_exact_where_the_metric_is_linear(
        tiny_gpt2_dir, attn_only, tokens_per_pass=1
    )


def _three_rows_per_pass(model: HookedTransformer, seed: int) -> int:
    """Tokens per gradient pass of 3 rows for the batch the checks build with ``seed``: 3 + 1
    of its 4."""
    return 3 * ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=seed).tokens.clean.shape[1]


@pytest.mark.parametrize(
    ("size", "pos", "tokens"), [(4, 10, 30), (5, 10, 20), (3, 40, 32), (1, 10, 32)]
)
def test_gradient_passes_cover_every_row_once_within_the_token_budget(
    size: int, pos: int, tokens: int
) -> None:
    zeros = torch.zeros(size, pos, dtype=torch.long)
    pairs = PromptPairs(
        zeros,
        zeros,
        torch.zeros(size, dtype=torch.long),
        torch.zeros(size, dtype=torch.long),
        torch.zeros(size, dtype=torch.long),
    )
    passes = gradient_passes(pairs, tokens)
    covered = [row for rows in passes for row in range(size)[rows]]
    assert covered == list(range(size))
    assert all(len(range(size)[rows]) * pos <= max(tokens, pos) for rows in passes)


def test_edge_scores_from_uneven_gradient_passes(tiny_gpt2_or_llama: HookedTransformer) -> None:
    check_edge_scores_add_up_to_each_components_own_attribution(
        tiny_gpt2_or_llama, tokens_per_pass=_three_rows_per_pass(tiny_gpt2_or_llama, seed=2)
    )


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_from_uneven_gradient_passes(tiny_gpt2_dir: Path, attn_only: bool) -> None:
    tokens = _three_rows_per_pass(hand_built(tiny_gpt2_dir, attn_only), seed=0)
    check_attribution_is_exact_where_the_metric_is_linear(
        tiny_gpt2_dir, attn_only, tokens_per_pass=tokens
    )


def test_edge_circuits_a_few_prompts_per_pass_equal_one_pass(
    tiny_gpt2_or_llama: HookedTransformer,
) -> None:
    """A circuit whose delta buffer exceeds the bound runs a few prompts per pass, each pass's
    buffer within the bound, every circuit and prompt once, with the results of all prompts in
    one pass."""
    model = tiny_gpt2_or_llama
    pairs = ioi_batch(model, IOIParams(n_pairs=5), seed=1).tokens
    _, corrupted_cache = run_cache(model, pairs, "corrupted", circuit_hooks(model))
    valid = ~torch.isnan(edge_attribution(model, pairs, corrupted_cache, base="clean").scores)
    kept = torch.stack(
        [
            valid,
            torch.zeros_like(valid),
            valid & (torch.rand(valid.shape, generator=torch.Generator().manual_seed(0)) < 0.5),
        ]
    )
    one_pass = edge_circuit_metric(model, pairs, corrupted_cache, kept, buffer_bytes=2**40)
    row_bytes = pairs.clean.shape[1] * model.cfg.d_model * kept.shape[1] * 4
    bound = 2 * row_bytes + 1
    passes = edge_circuit_passes(model, pairs, kept.shape[0], kept.shape[1], bound)
    covered = sorted(
        (circuit, row)
        for one in passes
        for circuit in range(kept.shape[0])[one.circuits]
        for row in range(pairs.size)[one.rows]
    )
    assert covered == [(c, r) for c in range(kept.shape[0]) for r in range(pairs.size)]
    assert all(
        len(range(kept.shape[0])[one.circuits]) * len(range(pairs.size)[one.rows]) * row_bytes
        <= bound
        for one in passes
    )
    assert len(passes) > kept.shape[0]  # a circuit's prompts did not fit in one pass
    split = edge_circuit_metric(model, pairs, corrupted_cache, kept, buffer_bytes=bound)
    # float32 sums of other shapes: not always to the bit
    torch.testing.assert_close(split, one_pass, rtol=1e-5, atol=1e-6)
