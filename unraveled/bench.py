"""``make bench``: timings taken in one run, reported as numbers and ratios.

Loads the bundled SmolLM2 twice into an empty converted-weights cache (the first load converts
the GGUF file, the second reads the cache) and prints both times and their ratio.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time

from unraveled.models import BUNDLED_SMOLLM2, load_model


def bench_model_load(name: str = BUNDLED_SMOLLM2) -> dict[str, float]:
    """Uncached and cached load times of ``name``, in seconds, measured into a fresh cache."""
    previous = os.environ.get("UNRAVELED_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["UNRAVELED_CACHE"] = cache
        try:
            started = time.perf_counter()
            load_model(name, "processed", fallback=None)
            uncached = time.perf_counter() - started
            started = time.perf_counter()
            second = load_model(name, "processed", fallback=None)
            cached = time.perf_counter() - started
        finally:
            if previous is None:
                os.environ.pop("UNRAVELED_CACHE", None)
            else:
                os.environ["UNRAVELED_CACHE"] = previous
    assert second.from_weight_cache
    return {"uncached_load_s": uncached, "cached_load_s": cached, "speedup": uncached / cached}


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    report = {"model_load": {BUNDLED_SMOLLM2: bench_model_load()}}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
