"""``make bench``, corpus atlas part: engine throughput and memory against corpus size.

- Throughput: tokens per second of the local engine and of Ray with 2 workers on the same
  slice of the bundled plays, on the bundled SmolLM2, in one run. Ray's time includes starting
  Ray, publishing the weights to a temporary converted-weights cache and each worker's model load.
- Memory: peak RSS of a whole local atlas compute (model load, tokenising the plays, streaming)
  at two corpus sizes, each in a fresh process; only the running state is kept, so the peak
  should not grow with the corpus.

Run alone with ``python -m unraveled.bench_corpus``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar
from unittest import mock

from unraveled.models import BUNDLED_SMOLLM2, load_model

logger = logging.getLogger(__name__)
T = TypeVar("T")

THROUGHPUT_TOKENS = 1024
MEMORY_TOKENS = (2048, 8192)
CONTEXT_TOKENS = 128

_PEAK_RSS_SCRIPT = """
import json, resource, sys
from unraveled.experiments.corpus_atlas import CorpusAtlasParams, compute
from unraveled.models import load_model
model = load_model(sys.argv[1], "processed").model
compute(model, CorpusAtlasParams(max_tokens=int(sys.argv[2]), context_tokens=int(sys.argv[3])), seed=0)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_engines(
    name: str = BUNDLED_SMOLLM2, tokens: int = THROUGHPUT_TOKENS, workers: int = 2
) -> dict[str, float]:
    """Tokens per second of the local and the Ray engine on the same windows."""
    from unraveled.corpus import corpus_windows
    from unraveled.engines import run_engine
    from unraveled.engines.state import AtlasSettings

    model = load_model(name, "processed").model
    windows = corpus_windows(model.tokenizer, [], CONTEXT_TOKENS, tokens, seed=0).tokens
    settings = AtlasSettings(prepend_bos=bool(model.cfg.default_prepend_bos))
    started = time.perf_counter()
    run_engine("local", model, windows, settings, progress=False)
    local_s = time.perf_counter() - started
    # A throwaway local Ray: its files and the published weights go to temporary folders, and
    # token authentication (which writes ~/.ray) is off for this cluster of one machine.
    with (
        tempfile.TemporaryDirectory(prefix="unraveled-bench-ray-", dir="/tmp") as ray_dir,
        tempfile.TemporaryDirectory() as cache,
        mock.patch.dict(
            os.environ,
            {"RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled", "UNRAVELED_CACHE": cache},
        ),
    ):
        started = time.perf_counter()
        run_engine("ray", model, windows, settings, workers=workers, progress=False)
        ray_s = time.perf_counter() - started
    n_tokens = windows.size
    return {
        "tokens": n_tokens,
        "local_s": local_s,
        f"ray_{workers}_workers_s": ray_s,
        "local_tokens_per_s": n_tokens / local_s,
        f"ray_{workers}_workers_tokens_per_s": n_tokens / ray_s,
        "ray_over_local": local_s / ray_s,
    }


def bench_memory(
    name: str = BUNDLED_SMOLLM2, sizes: tuple[int, ...] = MEMORY_TOKENS
) -> dict[str, Any]:
    """Peak RSS (MB) of a whole local atlas compute at each corpus size, each in a fresh process."""
    peaks, seconds = {}, {}
    for tokens in sizes:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_SCRIPT, name, str(tokens), str(CONTEXT_TOKENS)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[tokens] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        seconds[tokens] = time.perf_counter() - started
    smallest, largest = min(sizes), max(sizes)
    return {
        "peak_rss_mb_by_tokens": peaks,
        "seconds_by_tokens": seconds,
        "largest_over_smallest_corpus": largest / smallest,
        "peak_growth": peaks[largest] / peaks[smallest],
    }


def bench_corpus_atlas() -> dict[str, Any]:
    """Everything above, for ``make bench``; each part is logged as soon as it is measured."""
    engines = bench_engines()
    logger.warning("corpus atlas engines: %s", engines)
    memory = bench_memory()
    logger.warning("corpus atlas memory: %s", memory)
    return {"engines": engines, "memory": memory}


def bench_rows(row: Callable[..., T]) -> list[T]:
    """The measurements as rows of ``make bench``'s table; ``row`` is ``unraveled.bench.Row``.

    In ``unraveled/bench.py``: ``@bench_group`` ``def corpus_atlas() -> list[Row]: return bench_rows(Row)``.
    """
    engines, memory = bench_engines(), bench_memory()
    group = f"corpus atlas, {BUNDLED_SMOLLM2}"
    peaks = memory["peak_rss_mb_by_tokens"]
    small, large = min(peaks), max(peaks)
    return [
        row(group, f"local engine, {engines['tokens']} tokens", engines["local_s"]),
        row(
            group,
            f"ray engine, 2 workers, {engines['tokens']} tokens",
            engines["ray_2_workers_s"],
            ratio=engines["ray_over_local"],
            ratio_meaning="speed-up over the local engine",
        ),
        row(
            group,
            f"whole local atlas compute, {small} tokens",
            memory["seconds_by_tokens"][small],
            peak_mb=peaks[small],
        ),
        row(
            group,
            f"whole local atlas compute, {large} tokens",
            memory["seconds_by_tokens"][large],
            peak_mb=peaks[large],
            ratio=memory["peak_growth"],
            ratio_meaning=f"peak at {large} / peak at {small} tokens",
        ),
    ]


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    json.dump(bench_corpus_atlas(), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
