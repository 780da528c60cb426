"""Small params for running every experiment on the tiny models (tests/test_api_experiments.py,
tests/test_bridge.py): what those tests check doesn't depend on the sizes, so the smallest that
run are used."""

from __future__ import annotations

from typing import Any

TINY_PARAMS: dict[str, dict[str, Any]] = {
    "embeddings": {
        "local_neighbours": 100,
        "chunk_tokens": 50,
        "local_subsets": 2,
        "first_dims": 4,
    },
    "mlp": {"toy_vectors": 50, "toy_dims": 10, "toy_steps": 20},
    "token_journey": {"umap_fit_tokens": 60, "token_index": 2},
    "head_taxonomy": {"repeat_batch": 2, "repeat_length": 8},
    "ioi_circuit": {"ioi": {"n_pairs": 2}, "random_draws": 2, "edge_counts": [30]},
    "attribution_patching": {"ioi": {"n_pairs": 2}},
    "causal_tracing": {"n_facts": 1, "noise_samples": 1, "window": 1, "max_traced_tokens": None},
    # The corpus's first windows: "spread" would read and tokenize the whole bundled corpus.
    "corpus_atlas": {
        "context_tokens": 16,
        "top_k": 3,
        "max_tokens": 32,
        "browser_samples": 1,
        "sample": "first",
    },
    "steering": {"layer": 1, "max_new_tokens": 2, "n_samples": 1},
    # The tiny model's context is short: windows of 16 tokens, a few hundred tokens to train on.
    "sae_features": {
        "width": 8,
        "k": 2,
        "training_tokens": 64,
        "batch_tokens": 32,
        "buffer_tokens": 64,
        "eval_tokens": 32,
        "context_tokens": 16,
        "sample": "first",
        "batch_windows": 2,
        "planted_check": False,
        "attribution_pairs": 2,
        "attribution_top": 2,
    },
}
