"""The patching core run in the smallest passes: one row per gradient pass, one circuit per
edge-faithfulness pass. The checks are test_patching's own (against independent routes through
the model); they must hold however the work is split."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformer_lens import HookedTransformer

from tests.test_patching import loaded  # noqa: F401  (the module-scoped model fixture)
from tests.test_patching import test_attribution_is_exact_where_the_metric_is_linear as attribution_is_exact
from tests.test_patching import test_edge_circuits_agree_with_node_circuits as edge_circuits_agree
from tests.test_patching import test_edge_scores_add_up_to_each_components_own_attribution as edge_scores_add_up
from unraveled import patching


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
