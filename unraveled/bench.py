"""``make bench``: timings taken in one run, reported as numbers and ratios.

- Model load: the bundled SmolLM2 loaded twice into an empty converted-weights cache (the first
  load converts the GGUF file, the second reads the cache).
- token_journey: its compute with the default params (UMAP fitted on 10,000 token embeddings),
  against the 160 s the original ``3_tokens_journey.py`` took on this kind of machine.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from unittest import mock

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


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    report = {
        "model_load": {BUNDLED_SMOLLM2: bench_model_load()},
        "token_journey": {BUNDLED_SMOLLM2: bench_token_journey()},
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
