"""On real GPT-2 small: its published parameter count, and the original analysis's dimension pairs.

Runs only where GPT-2's weights can be loaded (the Hugging Face cache or the hub); elsewhere it
is skipped and says why. No package ships GPT-2's weights, so CI here skips it.
"""

from __future__ import annotations

from unraveled.experiments import embeddings

from unraveled.models import checkpoint_parameters

# wte 50257x768 + wpe 1024x768 + 12 blocks of 7,087,872 + ln_f 2x768; lm_head is tied to wte.
GPT2_SMALL_PARAMETERS = 124_439_808


def test_gpt2_small_parameter_count_and_dimension_pairs(gpt2_raw) -> None:  # type: ignore[no-untyped-def]
    assert checkpoint_parameters(gpt2_raw) == GPT2_SMALL_PARAMETERS
    params = embeddings.EmbeddingsParams(
        local_subsets=1, local_neighbours=200, projected_tokens=100
    )
    result = embeddings.compute(gpt2_raw, params, seed=0)
    assert result.dimension_pairs == [[87, 138], [68, 85], [361, 724]]
    assert result.metrics()["parameter_count"] == GPT2_SMALL_PARAMETERS
