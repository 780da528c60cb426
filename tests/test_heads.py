"""Head scores on hand-made patterns with a known answer, and on a tiny model whose head is
wired (through a hook) to be a perfect induction head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from unraveled.experiments import head_taxonomy

from unraveled.heads import duplicate_token_score, induction_score, previous_token_score, top_heads
from unraveled.models import load_model


def _one_hot_pattern(n: int, key_of_query: list[int]) -> torch.Tensor:
    pattern = torch.zeros(n, n)
    pattern[torch.arange(n), torch.tensor(key_of_query)] = 1.0
    return pattern


def test_scores_on_hand_made_patterns() -> None:
    period, n = 3, 7  # BOS, a b c, a b c
    induction = _one_hot_pattern(n, [0, 0, 0, 0, 2, 3, 4])  # copy queries 4,5,6 -> 2,3,4
    previous = _one_hot_pattern(n, [0, 0, 1, 2, 3, 4, 5])
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    patterns = torch.stack([induction, previous, uniform])[None]  # [layer=1, head=3, q, k]
    tokens = torch.tensor([50256, 10, 11, 12, 10, 11, 12])
    np.testing.assert_allclose(
        induction_score(patterns, period)[0], [1.0, 0.0, (1 / 5 + 1 / 6 + 1 / 7) / 3], rtol=1e-6
    )
    np.testing.assert_allclose(
        previous_token_score(patterns)[0],
        [1 / 6, 1.0, np.mean([1 / k for k in range(2, 8)])],
        rtol=1e-6,
    )
    duplicate = _one_hot_pattern(n, [0, 0, 0, 0, 1, 2, 3])
    np.testing.assert_allclose(duplicate_token_score(duplicate[None, None], tokens)[0, 0], 1.0)
    np.testing.assert_allclose(
        duplicate_token_score(uniform[None, None], tokens)[0, 0],
        np.mean([1 / 5, 1 / 6, 1 / 7]),
        rtol=1e-6,
    )
    assert duplicate_token_score(uniform[None, None], torch.arange(n))[0, 0] == 0
    with pytest.raises(ValueError, match="needs at least"):
        induction_score(patterns, 4)


def test_top_heads_ranks_and_names() -> None:
    scores = np.array([[0.1, 0.9], [0.5, -0.2]])
    assert [entry["head"] for entry in top_heads(scores, 3)] == ["0.1", "1.0", "0.0"]
    assert top_heads(scores, 1, lowest=True) == [{"head": "1.1", "score": pytest.approx(-0.2)}]


def test_wired_induction_head_ranks_first(tiny_gpt2_dir: Path, warm_weight_cache: Path) -> None:
    model = load_model(
        str(tiny_gpt2_dir), "processed"
    ).model  # a model of its own: this test wires a head
    params = head_taxonomy.HeadTaxonomyParams(
        repeat_batch=2, repeat_length=10, prompts=["a b c a b c"]
    )
    wired_layer, wired_head, period = 1, 2, params.repeat_length

    def make_induction_head(pattern: torch.Tensor, hook) -> torch.Tensor:  # type: ignore[no-untyped-def]
        n = pattern.shape[-1]
        if n == 2 * period + 1:  # only the repeated random sequences
            queries = torch.arange(period + 1, n)
            pattern[:, wired_head] = 0.0
            pattern[:, wired_head, torch.arange(period + 1), torch.arange(period + 1)] = 1.0
            pattern[:, wired_head, queries, queries - period + 1] = 1.0
        return pattern

    model.add_hook(
        f"blocks.{wired_layer}.attn.hook_pattern", make_induction_head, is_permanent=True
    )
    try:
        result = head_taxonomy.compute(model, params, seed=0)
    finally:
        model.reset_hooks(including_permanent=True)
    assert result.scores["induction"][wired_layer, wired_head] == pytest.approx(1.0)
    assert top_heads(result.scores["induction"], 1)[0]["head"] == "1.2"
    assert result.viewed_heads[0] == "1.2"


def test_repeated_sequences_in_small_passes_equal_one_pass(
    tiny_model, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The repeated sequences run a few per pass (never all patterns at once), with every score,
    the viewed patterns and tokens equal to the bit to one pass over all of them."""
    from unraveled.activations import collect_activations
    from unraveled.analysis import attention_sink_by_head, stack_patterns

    model = tiny_model(tiny_gpt2_dir, "processed")
    params = head_taxonomy.HeadTaxonomyParams(
        repeat_batch=5, repeat_length=12, prompts=["a b c a b c", "one two one"]
    )
    monkeypatch.setattr(head_taxonomy, "REPEATED_ROWS_PER_PASS", 2)
    rows_seen: list[int] = []
    model.add_hook(
        "blocks.0.attn.hook_pattern", lambda pattern, hook: rows_seen.append(pattern.shape[0])
    )
    try:
        result = head_taxonomy.compute(model, params, seed=3)
    finally:
        model.reset_hooks()
    # Really split: no pass over more than two of the five repeated sequences.
    assert max(rows_seen) <= 2

    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    tokens = head_taxonomy.repeated_random_tokens(
        model, params.repeat_batch, params.repeat_length, 3
    )
    everything = collect_activations(model, tokens, hooks, logits=False)
    natural = collect_activations(model, params.prompts, hooks, logits=False)
    patterns = [
        stack_patterns(everything.cache, n_layers, row) for row in range(params.repeat_batch)
    ]
    natural_patterns = [
        (stack_patterns(natural.cache, n_layers, row)[..., :n, :n], natural.tokens[row, :n])
        for row, n in enumerate(natural.lengths)
    ]

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).mean(dim=0)

    expected = {
        "induction": mean([induction_score(p, params.repeat_length) for p in patterns]),
        "previous_token": (
            mean([previous_token_score(p) for p in patterns])
            + mean([previous_token_score(p) for p, _ in natural_patterns])
        )
        / 2,
        "duplicate_token": (
            mean([duplicate_token_score(p, t) for p, t in zip(patterns, tokens, strict=True)])
            + mean([duplicate_token_score(p, t) for p, t in natural_patterns])
        )
        / 2,
        "first_token": (
            mean([attention_sink_by_head(p) for p in patterns])
            + mean([attention_sink_by_head(p) for p, _ in natural_patterns])
        )
        / 2,
    }
    for name, values in expected.items():
        np.testing.assert_array_equal(result.scores[name], values.numpy())
    viewed = [tuple(int(part) for part in name.split(".")) for name in result.viewed_heads]
    np.testing.assert_array_equal(
        result.repeated_patterns,
        torch.stack([patterns[0][layer, head] for layer, head in viewed]).numpy(),
    )
    assert result.repeated_tokens == everything.str_tokens[0]
