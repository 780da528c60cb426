"""The patching core run in the smallest passes: one row per gradient pass, one circuit per
edge-faithfulness pass; and in uneven gradient passes, whose last holds fewer rows than the others.
The checks are test_patching's own (against independent routes through the model); they must hold
however the work is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from tests.test_patching import loaded  # noqa: F401  (the module-scoped model fixture)
from tests.test_patching import test_attribution_is_exact_where_the_metric_is_linear as attribution_is_exact
from tests.test_patching import test_edge_circuits_agree_with_node_circuits as edge_circuits_agree
from tests.test_patching import N_PAIRS, _hand_built
from tests.test_patching import test_edge_scores_add_up_to_each_components_own_attribution as edge_scores_add_up
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


def _three_rows_per_pass(model: HookedTransformer, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradient passes of 3 rows for the batch test_patching builds with ``seed``: 3 + 1 of its 4."""
    pos = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=seed).tokens.clean.shape[1]
    monkeypatch.setattr(patching, "GRADIENT_TOKENS", 3 * pos)


@pytest.mark.parametrize(("size", "pos", "tokens"), [(4, 10, 30), (5, 10, 20), (3, 40, 32), (1, 10, 32)])
def test_gradient_passes_cover_every_row_once_within_the_token_budget(size: int, pos: int, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patching, "GRADIENT_TOKENS", tokens)
    zeros = torch.zeros(size, pos, dtype=torch.long)
    pairs = patching.PromptPairs(zeros, zeros, torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long))
    covered = [row for rows in patching._gradient_passes(pairs) for row in range(size)[rows]]
    assert covered == list(range(size))
    assert all(len(range(size)[rows]) * pos <= max(tokens, pos) for rows in patching._gradient_passes(pairs))


def test_edge_scores_from_uneven_gradient_passes(loaded: HookedTransformer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _three_rows_per_pass(loaded, seed=2, monkeypatch=monkeypatch)
    edge_scores_add_up(loaded)


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_from_uneven_gradient_passes(tiny_gpt2_dir: Path, attn_only: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _three_rows_per_pass(_hand_built(tiny_gpt2_dir, attn_only), seed=0, monkeypatch=monkeypatch)
    attribution_is_exact(tiny_gpt2_dir, attn_only)
