"""On real GPT-2 small, the published induction and previous-token heads top our rankings.

Runs only where GPT-2's weights can be loaded (the Hugging Face cache or the hub); elsewhere it
is skipped and says why. No package ships GPT-2's weights, so CI here skips it.
"""

from __future__ import annotations

from unraveled.experiments import head_taxonomy

from unraveled.heads import top_heads

PUBLISHED_INDUCTION_HEADS = {"5.1", "5.5", "6.9", "7.2", "7.10"}


def test_published_gpt2_heads_top_the_rankings(gpt2) -> None:  # type: ignore[no-untyped-def]
    result = head_taxonomy.compute(gpt2, head_taxonomy.HeadTaxonomyParams(), seed=0)
    top_induction = {entry["head"] for entry in top_heads(result.scores["induction"], 5)}
    assert top_induction == PUBLISHED_INDUCTION_HEADS
    assert "4.11" in {entry["head"] for entry in top_heads(result.scores["previous_token"], 5)}
