"""The ``corpus_atlas`` row group: engine throughput, and memory against corpus size.

- Throughput: tokens per second of the local engine and of Ray with 2 workers on the same
  windows of the bundled plays, on the bundled SmolLM2, in one process, keeping the state the
  experiment's default params keep (``atlas_settings``). Ray's time includes starting Ray,
  publishing the weights to the converted-weights cache the model was loaded from (a run on Ray
  does the same) and each worker's model load.
- Memory: peak RSS of a whole local atlas compute at its default params (model load, tokenising
  the plays, streaming) at two corpus sizes, each in a fresh process; only the running state is
  kept, so the peak should not grow with the corpus.

Run alone with ``python -m benchmarks.bench --only corpus_atlas``.
"""

from __future__ import annotations

import tempfile
import time

from benchmarks.processes import call_in_child
from benchmarks.table import Row

THROUGHPUT_TOKENS = 1024
MEMORY_TOKENS = (2048, 8192)
RAY_WORKERS = 2


def engine_seconds(name: str, tokens: int, workers: int) -> dict[str, float]:
    """Seconds of the local and the Ray engine on the same ``tokens`` tokens of windows.

    Called in a process of its own (``call_in_child``), whose environment keeps Ray's files in a
    temporary folder and its token authentication (which writes ``~/.ray``) off.
    """
    from unraveled.experiments.corpus_atlas import CorpusAtlasParams, atlas_settings

    from unraveled.corpus import corpus_windows
    from unraveled.engines import run_engine
    from unraveled.models import load_model

    model = load_model(name, "processed").model
    params = CorpusAtlasParams()
    windows = corpus_windows(model.tokenizer, [], params.context_tokens, tokens, seed=0).tokens
    settings = atlas_settings(params, prepend_bos=bool(model.cfg.default_prepend_bos))
    started = time.perf_counter()
    run_engine("local", model, windows, settings, progress=False)
    local_s = time.perf_counter() - started
    started = time.perf_counter()
    run_engine("ray", model, windows, settings, workers=workers, progress=False)
    ray_s = time.perf_counter() - started
    return {"tokens": float(windows.size), "local_s": local_s, "ray_s": ray_s}


def atlas_compute(name: str, tokens: int) -> None:
    """The experiment's whole local compute at its default params on ``tokens`` tokens.

    Called in a process of its own (``call_in_child``), whose peak is the measurement.
    """
    from unraveled.experiments.corpus_atlas import CorpusAtlasParams, compute

    from unraveled.models import load_model

    model = load_model(name, "processed").model
    compute(model, CorpusAtlasParams(max_tokens=tokens), seed=0)


def corpus_atlas_rows(name: str) -> list[Row]:
    """The measurements above as rows of ``make bench``'s table."""
    group = f"corpus atlas, {name}"
    with tempfile.TemporaryDirectory(prefix="unraveled-bench-ray-", dir="/tmp") as ray_dir:
        engines = call_in_child(
            engine_seconds,
            name,
            THROUGHPUT_TOKENS,
            RAY_WORKERS,
            environment={"RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled"},
        ).value
    tokens = int(engines["tokens"])
    rows = [
        Row(group, f"local engine, {tokens} tokens", engines["local_s"]),
        Row(
            group,
            f"ray engine, {RAY_WORKERS} workers, {tokens} tokens",
            engines["ray_s"],
            ratio=engines["local_s"] / engines["ray_s"],
            ratio_meaning="speed-up over the local engine",
        ),
    ]
    small, large = min(MEMORY_TOKENS), max(MEMORY_TOKENS)
    runs = {size: call_in_child(atlas_compute, name, size) for size in (small, large)}
    rows.append(
        Row(
            group,
            f"whole local atlas compute, {small} tokens",
            runs[small].seconds,
            runs[small].peak_mb,
        )
    )
    rows.append(
        Row(
            group,
            f"whole local atlas compute, {large} tokens",
            runs[large].seconds,
            runs[large].peak_mb,
            ratio=runs[large].peak_mb / runs[small].peak_mb,
            ratio_meaning=f"peak at {large} / peak at {small} tokens",
        )
    )
    return rows
