"""On real GPT-2 small, path patching finds the IOI circuit's heads as Wang et al. (2022) did:
the name movers 9.6 and 9.9 among the senders that lower the logit difference most through the
direct path to the logits, and the S-inhibition heads 7.3, 7.9, 8.6, 8.10 among those that lower
it most through the name movers' queries (9.6, 9.9, 10.0, at the last token).

Runs only where GPT-2's weights can be loaded (the Hugging Face cache or the hub); elsewhere it
is skipped and says why. No package ships GPT-2's weights, so CI here skips it.
"""

from __future__ import annotations

import numpy as np
from unraveled.experiments import path_patching

from unraveled.datasets.ioi import IOIParams

NAME_MOVERS = {"9.6", "9.9"}
S_INHIBITION = {"7.3", "7.9", "8.6", "8.10"}


def _most_negative(relative: np.ndarray, k: int) -> list[str]:
    n_heads = relative.shape[1]
    order = np.argsort(np.nan_to_num(relative, nan=np.inf), axis=None, kind="stable")[:k]
    return [f"{i // n_heads}.{i % n_heads}" for i in order]


def test_path_patching_finds_name_movers_and_s_inhibition_heads(gpt2) -> None:  # type: ignore[no-untyped-def]
    params = path_patching.PathPatchingParams(ioi=IOIParams(n_pairs=32, corruption="abc"))
    result = path_patching.compute(gpt2, params, seed=0)
    assert result.receivers == ["9.6", "9.9", "10.0"]
    to_logits = _most_negative(result.relative(result.to_logits), 5)
    assert NAME_MOVERS <= set(to_logits), to_logits
    to_queries = _most_negative(result.relative(result.to_receivers), 6)
    assert len(S_INHIBITION & set(to_queries)) >= 3, to_queries
