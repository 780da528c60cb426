"""The patching core run in the smallest passes: one row per gradient pass, one circuit per
edge-faithfulness pass; and in uneven gradient passes, whose last holds fewer rows than the others.
The checks are test_patching's own (against independent routes through the model); they must hold
however the work is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from tests.test_patching import (
    N_PAIRS,
    _hand_built,
    loaded,  # noqa: F401  (the module-scoped model fixture)
)
from tests.test_patching import (
    test_attribution_is_exact_where_the_metric_is_linear as attribution_is_exact,
)
from tests.test_patching import test_edge_circuits_agree_with_node_circuits as edge_circuits_agree
from tests.test_patching import (
    test_edge_scores_add_up_to_each_components_own_attribution as edge_scores_add_up,
)
from unraveled import patching
from unraveled.datasets.ioi import IOIParams, ioi_batch


@pytest.fixture(autouse=True)
def smallest_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patching, "GRADIENT_TOKENS", 1)
    monkeypatch.setattr(patching, "EDGE_BUFFER_BYTES", 1)


def test_edge_scores_from_one_row_per_gradient_pass(loaded: HookedTransformer) -> None:  # noqa: F811
    edge_scores_add_up(loaded)


def test_edge_circuits_one_circuit_per_pass(loaded: HookedTransformer) -> None:  # noqa: F811
    edge_circuits_agree(loaded)


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_from_one_row_per_gradient_pass(tiny_gpt2_dir: Path, attn_only: bool) -> None:
    attribution_is_exact(tiny_gpt2_dir, attn_only)


def _three_rows_per_pass(
    model: HookedTransformer, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradient passes of 3 rows for the batch test_patching builds with ``seed``: 3 + 1 of its 4."""
    pos = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=seed).tokens.clean.shape[1]
    monkeypatch.setattr(patching, "GRADIENT_TOKENS", 3 * pos)


@pytest.mark.parametrize(
    ("size", "pos", "tokens"), [(4, 10, 30), (5, 10, 20), (3, 40, 32), (1, 10, 32)]
)
def test_gradient_passes_cover_every_row_once_within_the_token_budget(
    size: int, pos: int, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patching, "GRADIENT_TOKENS", tokens)
    zeros = torch.zeros(size, pos, dtype=torch.long)
    pairs = patching.PromptPairs(
        zeros,
        zeros,
        torch.zeros(size, dtype=torch.long),
        torch.zeros(size, dtype=torch.long),
        torch.zeros(size, dtype=torch.long),
    )
    covered = [row for rows in patching._gradient_passes(pairs) for row in range(size)[rows]]
    assert covered == list(range(size))
    assert all(
        len(range(size)[rows]) * pos <= max(tokens, pos)
        for rows in patching._gradient_passes(pairs)
    )


def test_edge_scores_from_uneven_gradient_passes(
    loaded: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_rows_per_pass(loaded, seed=2, monkeypatch=monkeypatch)
    edge_scores_add_up(loaded)


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_from_uneven_gradient_passes(
    tiny_gpt2_dir: Path, attn_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_rows_per_pass(_hand_built(tiny_gpt2_dir, attn_only), seed=0, monkeypatch=monkeypatch)
    attribution_is_exact(tiny_gpt2_dir, attn_only)


def test_edge_circuits_a_few_prompts_per_pass_equal_one_pass(
    loaded: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A circuit whose delta buffer exceeds the bound runs a few prompts per pass, each pass's
    buffer within the bound, with the logit differences of all prompts in one pass to the bit."""
    pairs = ioi_batch(loaded, IOIParams(n_pairs=5), seed=1).tokens
    n_layers = loaded.cfg.n_layers
    hooks = [
        "hook_embed",
        *(["hook_pos_embed"] if loaded.cfg.positional_embedding_type == "standard" else []),
    ]
    hooks += [f"blocks.{l}.attn.hook_z" for l in range(n_layers)] + [
        f"blocks.{l}.hook_mlp_out" for l in range(n_layers)
    ]
    hooks += [f"blocks.{l}.hook_resid_{p}" for l in range(n_layers) for p in ("pre", "mid")] + [
        f"blocks.{n_layers - 1}.hook_resid_post"
    ]
    _, corrupted_cache = patching.run_cache(loaded, pairs, "corrupted", hooks)
    valid = ~torch.isnan(
        patching.edge_attribution(loaded, pairs, corrupted_cache, base="clean").scores
    )
    kept = torch.stack(
        [
            valid,
            torch.zeros_like(valid),
            valid & (torch.rand(valid.shape, generator=torch.Generator().manual_seed(0)) < 0.5),
        ]
    )
    monkeypatch.setattr(patching, "EDGE_BUFFER_BYTES", 2**40)
    one_pass = patching.edge_circuit_logit_differences(loaded, pairs, corrupted_cache, kept)
    row_bytes = pairs.clean.shape[1] * loaded.cfg.d_model * kept.shape[1] * 4
    monkeypatch.setattr(patching, "EDGE_BUFFER_BYTES", 2 * row_bytes + 1)
    passes: list[tuple[int, int]] = []
    in_one_pass = patching._edge_circuits_in_one_pass

    def recorded(model, pairs, cache, kept):  # type: ignore[no-untyped-def]
        passes.append((kept.shape[0], pairs.size))
        return in_one_pass(model, pairs, cache, kept)

    monkeypatch.setattr(patching, "_edge_circuits_in_one_pass", recorded)
    split = patching.edge_circuit_logit_differences(loaded, pairs, corrupted_cache, kept)
    assert passes == [(1, 2), (1, 2), (1, 1)] * 3
    torch.testing.assert_close(
        split, one_pass, rtol=1e-5, atol=1e-6
    )  # float32 sums of other shapes: not always to the bit (GPT-2 small: equal)
