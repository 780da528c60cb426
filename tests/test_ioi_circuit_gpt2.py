"""On real GPT-2 small, the heads edge attribution patching finds for IOI include the published
circuit's (Wang et al. 2022): name movers 9.6, 9.9, 10.0; S-inhibition 7.3, 7.9, 8.6, 8.10;
induction 5.5, 6.9; duplicate-token 0.1, 3.0; previous-token 2.2, 4.11.

Runs only where GPT-2's weights can be loaded (the Hugging Face cache or the hub); elsewhere it
is skipped and says why. No package ships GPT-2's weights, so CI here skips it.
"""

from __future__ import annotations

import numpy as np
from unraveled.experiments import ioi_circuit

from unraveled.datasets.ioi import IOIParams

NAME_MOVERS = {"9.6", "9.9", "10.0"}
S_INHIBITION = {"7.3", "7.9", "8.6", "8.10"}
PUBLISHED = NAME_MOVERS | S_INHIBITION | {"5.5", "6.9", "0.1", "3.0", "2.2", "4.11"}


def test_edge_attribution_finds_the_published_ioi_heads(gpt2) -> None:  # type: ignore[no-untyped-def]
    params = ioi_circuit.IOICircuitParams(ioi=IOIParams(n_pairs=32), circuit_sizes=[10, 20, 40])
    result = ioi_circuit.compute(gpt2, params, seed=0)
    heads = [i for i, node in enumerate(result.nodes) if "." in node]
    ranked = [result.nodes[i] for i in sorted(heads, key=lambda i: -abs(result.node_scores[i]))]
    assert len(NAME_MOVERS & set(ranked[:10])) >= 2, ranked[:10]
    assert len(S_INHIBITION & set(ranked[:20])) >= 2, ranked[:20]
    assert len(PUBLISHED & set(ranked[:30])) >= 6, ranked[:30]
    # Name movers copy the name they attend to: corrupting them lowers the logit difference.
    assert np.mean([result.node_scores[result.nodes.index(h)] for h in NAME_MOVERS]) < 0
    assert result.faithfulness[-2] > 0.5  # 40 components keep most of the logit difference
