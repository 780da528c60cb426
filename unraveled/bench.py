"""``make bench``: timings taken in one run, reported as numbers and ratios.

- Model load: the bundled SmolLM2 loaded twice into an empty converted-weights cache (the first
  load converts the GGUF file, the second reads the cache).
- token_journey: its compute with the default params (UMAP fitted on 10,000 token embeddings),
  against the 160 s the original ``3_tokens_journey.py`` took on this kind of machine.
- activation_patching: its compute with the default params on SmolLM2 (30 layers) and on a
  randomly initialised model of GPT-2 small's shape (12 layers, d_model 768; GPT-2's weights
  can't be had here, and the amount of computation does not depend on them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from unittest import mock

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

from unraveled.bench_tracing import bench_causal_tracing
from unraveled.models import BUNDLED_SMOLLM2, load_model


def bench_model_load(name: str = BUNDLED_SMOLLM2) -> dict[str, float]:
    """Uncached and cached load times of ``name``, in seconds, measured into a fresh cache."""
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"UNRAVELED_CACHE": cache}):
        started = time.perf_counter()
        load_model(name, "processed", fallback=None)
        uncached = time.perf_counter() - started
        started = time.perf_counter()
        second = load_model(name, "processed", fallback=None)
        cached = time.perf_counter() - started
    assert second.from_weight_cache
    return {"uncached_load_s": uncached, "cached_load_s": cached, "speedup": uncached / cached}


ORIGINAL_TOKEN_JOURNEY_S = 160.0


def bench_token_journey(name: str = BUNDLED_SMOLLM2) -> dict[str, float]:
    """Wall time of token_journey's compute with default params, twice (numba caches warm up)."""
    from experiments import token_journey

    model = load_model(name, "raw", fallback=None).model
    times = []
    for _ in range(2):
        started = time.perf_counter()
        token_journey.compute(model, token_journey.TokenJourneyParams(), seed=0)
        times.append(time.perf_counter() - started)
    return {
        "first_run_s": times[0],
        "second_run_s": times[1],
        "original_script_s": ORIGINAL_TOKEN_JOURNEY_S,
        "speedup_vs_original_first_run": ORIGINAL_TOKEN_JOURNEY_S / times[0],
    }


def _gpt2_small_shaped(tokenizer: PreTrainedTokenizerBase) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LNPre", seed=0,
    )
    return HookedTransformer(cfg, tokenizer).eval()


def bench_activation_patching() -> dict[str, float]:
    """Wall time of activation_patching's compute with default params, per model."""
    from experiments import activation_patching

    smollm2 = load_model(BUNDLED_SMOLLM2, "processed", fallback=None).model
    timings = {}
    for name, model in ((BUNDLED_SMOLLM2, smollm2), ("gpt2-small-shaped (random weights)", _gpt2_small_shaped(smollm2.tokenizer))):
        started = time.perf_counter()
        activation_patching.compute(model, activation_patching.ActivationPatchingParams(), seed=0)
        timings[f"{name}_s"] = time.perf_counter() - started
    return timings


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    report = {
        "model_load": {BUNDLED_SMOLLM2: bench_model_load()},
        "token_journey": {BUNDLED_SMOLLM2: bench_token_journey()},
        "activation_patching": bench_activation_patching(),
    }
    report["causal_tracing"] = {BUNDLED_SMOLLM2: bench_causal_tracing()}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
